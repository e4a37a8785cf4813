//! Runs the kernels' parallel loops on torch's own OpenMP team (`qalora_core::parallel::Executor`).
//!
//! Right after a torch op, torch's OpenMP threads are still awake (they spin before they
//! sleep), while rayon's workers have gone to sleep: waking them cost 0.1-0.5 ms a call on
//! the 2-vCPU machine of benches/RESULTS.md, more than a small kernel takes, and they then
//! competed with the spinning OpenMP threads for the same cores. Handing the tasks to the
//! OpenMP team instead (libgomp's `GOMP_parallel`, what `#pragma omp parallel` compiles to)
//! puts them on threads that are already running, with torch's thread count.
//!
//! The symbols are looked up in the process (torch loads its libgomp before this module);
//! where they are missing, or `QALORA_THREAD_POOL=rayon`, the kernels keep rayon.

use std::any::Any;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use qalora_core::parallel::{set_executor, Executor};

type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type MaxThreadsFn = unsafe extern "C" fn() -> c_int;

#[derive(Clone, Copy)]
struct Gomp {
    parallel: ParallelFn,
    max_threads: MaxThreadsFn,
}

#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

const RTLD_LAZY: c_int = 0x1;
const RTLD_NOLOAD: c_int = 0x4;

/// libgomp's entry points, from the libgomp already loaded (torch's), else none.
fn gomp() -> Option<Gomp> {
    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
    *GOMP.get_or_init(|| {
        // SAFETY: dlopen with RTLD_NOLOAD only returns a handle to a library already loaded
        // (it never loads one); dlsym reads the symbol tables. Both take NUL-terminated names.
        unsafe {
            let lib = dlopen(c"libgomp.so.1".as_ptr(), RTLD_LAZY | RTLD_NOLOAD);
            let find = |name: &CStr| {
                let in_lib = if lib.is_null() { std::ptr::null_mut() } else { dlsym(lib, name.as_ptr()) };
                // Else the process's global scope (RTLD_DEFAULT is the null handle on glibc).
                if in_lib.is_null() {
                    dlsym(std::ptr::null_mut(), name.as_ptr())
                } else {
                    in_lib
                }
            };
            let (parallel, max_threads) = (find(c"GOMP_parallel"), find(c"omp_get_max_threads"));
            if parallel.is_null() || max_threads.is_null() {
                return None;
            }
            // SAFETY: these are libgomp's exported functions with these C signatures
            // (GOMP_parallel is the ABI entry that `#pragma omp parallel` compiles to).
            Some(Gomp {
                parallel: std::mem::transmute::<*mut c_void, ParallelFn>(parallel),
                max_threads: std::mem::transmute::<*mut c_void, MaxThreadsFn>(max_threads),
            })
        }
    })
}

fn threads() -> usize {
    match gomp() {
        // SAFETY: a plain query of the calling thread's OpenMP settings.
        Some(g) => unsafe { (g.max_threads)() }.max(1) as usize,
        None => 1,
    }
}

/// What the team's threads share: the tasks, the next one to take, the first panic.
struct Team<'a> {
    job: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// Each thread of the team takes tasks until none is left. A panic must not unwind
/// through libgomp's C frames: it is caught, the remaining tasks are skipped, and `run`
/// resumes it on the calling thread.
extern "C" fn member(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `run` keeps alive until GOMP_parallel returns.
    let team = unsafe { &*(data as *const Team) };
    loop {
        let t = team.next.fetch_add(1, Ordering::Relaxed);
        if t >= team.tasks {
            return;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| (team.job)(t))) {
            team.next.store(team.tasks, Ordering::Relaxed);
            team.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            return;
        }
    }
}

fn run(tasks: usize, job: &(dyn Fn(usize) + Sync)) {
    let Some(g) = gomp() else {
        (0..tasks).for_each(job);
        return;
    };
    let team = Team { job, tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
    let width = threads().min(tasks).max(1) as c_uint;
    // SAFETY: `member` only reads `team` (atomics and a mutex for shared state), which
    // outlives the call: GOMP_parallel returns after every thread of the team has finished.
    unsafe { (g.parallel)(member, &team as *const Team as *mut c_void, width, 0) };
    if let Some(p) = team.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
}

/// Uses `pool` ("openmp" or "rayon") for the kernels' parallel loops; false when OpenMP was
/// asked for and is not in this process.
pub fn use_pool(pool: &str) -> bool {
    match pool {
        "openmp" if gomp().is_some() => {
            set_executor(Some(Executor { threads, run }));
            true
        }
        "rayon" => {
            set_executor(None);
            true
        }
        _ => false,
    }
}

/// At import: OpenMP when present, unless QALORA_THREAD_POOL=rayon.
pub fn choose_default() {
    if std::env::var("QALORA_THREAD_POOL").as_deref() != Ok("rayon") {
        use_pool("openmp");
    }
}
