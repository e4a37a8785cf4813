//! The kernels' thread pool, and row-parallel loops with a work threshold, so small tensors
//! do not pay rayon's start-up.
//!
//! The hot loops run as tasks on an [`Executor`] when the host registered one (the binding
//! registers torch's own OpenMP team, whose threads are already awake right after a torch
//! op: waking rayon's sleeping workers there was measured at 0.1-0.5 ms a call), else on
//! rayon.
//!
//! All parallel work runs on [`pool`], never on rayon's global pool: a process forked after
//! a pool has run (a `DataLoader` worker, `multiprocessing` with the fork start method)
//! inherits the pool's state but none of its threads, so the first parallel call in the
//! child would wait forever for workers that do not exist there. A fork handler forgets the
//! parent's pool in the child, which builds its own on first use.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use rayon::prelude::*;

/// Below this many elements of work a loop runs on the calling thread.
pub const PARALLEL_THRESHOLD: usize = 1 << 15;

/// The same for streaming loops (a load and a store or two per element, e.g. pooling): one
/// core streams a 512 x 1536 activation in about 0.1 ms, while waking the pool's workers
/// right after a torch op (whose OpenMP threads still spin on every core) was measured at
/// 0.3-0.5 ms a call inside a training step.
pub const STREAMING_THRESHOLD: usize = 1 << 22;

/// This process's pool; null until first use, and again in a freshly forked child.
static POOL: AtomicPtr<rayon::ThreadPool> = AtomicPtr::new(ptr::null_mut());

/// The kernels' thread pool for this process, built on first use (`RAYON_NUM_THREADS`
/// threads if set, else one per logical CPU).
///
/// # Panics
/// If the operating system refuses to start its threads (the binding reports the panic as
/// an internal error).
pub fn pool() -> &'static rayon::ThreadPool {
    let current = POOL.load(Ordering::Acquire);
    if !current.is_null() {
        // SAFETY: non-null values of POOL come from `Box::into_raw` below and are never
        // freed (a pool lives as long as its process), so the reference is valid forever.
        return unsafe { &*current };
    }
    fork::watch();
    let fresh = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("qalora-{i}"))
        .build()
        .expect("could not start the kernels' worker threads");
    let fresh = Box::into_raw(Box::new(fresh));
    match POOL.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: `fresh` was just leaked from a Box and is now owned by POOL for good.
        Ok(_) => unsafe { &*fresh },
        Err(winner) => {
            // Another thread of this process built one first: use it, and shut ours down
            // (dropping a pool ends its threads).
            // SAFETY: `fresh` never left this function, so this is its only owner.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above, `winner` came from `Box::into_raw` and is never freed.
            unsafe { &*winner }
        }
    }
}

/// Runs `f` with [`pool`] as the pool of any parallel iterator inside it; the caller waits.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// The number of threads of [`pool`].
pub fn threads() -> usize {
    pool().current_num_threads()
}

#[cfg(unix)]
mod fork {
    use std::sync::atomic::Ordering;
    use std::sync::Once;

    extern "C" {
        fn pthread_atfork(
            prepare: Option<unsafe extern "C" fn()>,
            parent: Option<unsafe extern "C" fn()>,
            child: Option<unsafe extern "C" fn()>,
        ) -> i32;
    }

    /// Runs in a forked child before `fork` returns there: the parent's pool has no threads
    /// in this process, so it is forgotten (leaked: its memory was copied, its threads were
    /// not, and tearing it down would wait on them), and so is a registered executor. Two
    /// atomic operations, as a fork handler must be (async-signal-safe).
    unsafe extern "C" fn forget_parent_pool() {
        super::POOL.store(std::ptr::null_mut(), Ordering::Release);
        super::FORKS.fetch_add(1, Ordering::AcqRel);
    }

    /// Registers the handler, once per process tree (a child inherits it).
    pub fn watch() {
        static REGISTERED: Once = Once::new();
        REGISTERED.call_once(|| {
            // SAFETY: registers a handler that only stores a null pointer into an atomic;
            // the function lives for the whole program.
            let rc = unsafe { pthread_atfork(None, None, Some(forget_parent_pool)) };
            // Without the handler a forked child could hang: refuse to run instead.
            assert_eq!(rc, 0, "could not register the fork handler of the kernels' thread pool");
        });
    }
}

#[cfg(not(unix))]
mod fork {
    /// No fork on this platform.
    pub fn watch() {}
}

/// Another thread pool the kernels may run on: `run(tasks, job)` calls `job(t)` once for
/// every t in 0..tasks on up to `threads()` threads (the caller among them) and returns when
/// all calls have returned. `job` never unwinds out of `run` (it catches panics itself).
#[derive(Clone, Copy)]
pub struct Executor {
    pub threads: fn() -> usize,
    pub run: fn(tasks: usize, job: &(dyn Fn(usize) + Sync)),
}

/// The registered executor (a leaked Box), or null for rayon.
static EXECUTOR: AtomicPtr<Executor> = AtomicPtr::new(ptr::null_mut());
/// Bumped by the fork handler: a forked child runs on rayon (its own pool), never on an
/// executor registered before the fork (an OpenMP team does not survive fork).
static FORKS: AtomicUsize = AtomicUsize::new(0);
static EXECUTOR_EPOCH: AtomicUsize = AtomicUsize::new(0);

/// Registers `executor` for the parallel loops of this process (None: back to rayon).
pub fn set_executor(executor: Option<Executor>) {
    fork::watch();
    let fresh = executor.map_or(ptr::null_mut(), |e| Box::into_raw(Box::new(e)));
    EXECUTOR_EPOCH.store(FORKS.load(Ordering::Acquire), Ordering::Release);
    // The previous one is leaked: another thread may still be reading it.
    EXECUTOR.store(fresh, Ordering::Release);
}

fn executor() -> Option<Executor> {
    let e = EXECUTOR.load(Ordering::Acquire);
    if e.is_null() || EXECUTOR_EPOCH.load(Ordering::Acquire) != FORKS.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: non-null values come from `Box::into_raw` in `set_executor` and are never freed.
    Some(unsafe { *e })
}

/// Whether the parallel loops run on a registered executor (not rayon).
pub fn has_executor() -> bool {
    executor().is_some()
}

/// Threads the parallel loops run on (the executor's, else rayon's pool's).
pub fn parallel_threads() -> usize {
    executor().map_or_else(threads, |e| (e.threads)()).max(1)
}

/// Calls `job(t)` for every t in 0..tasks, in parallel, and returns when all are done.
pub fn for_each_task(tasks: usize, job: impl Fn(usize) + Sync) {
    if tasks <= 1 {
        (0..tasks).for_each(job);
        return;
    }
    match executor() {
        Some(e) => (e.run)(tasks, &job),
        None => install(|| (0..tasks).into_par_iter().for_each(&job)),
    }
}

/// A raw pointer that tasks share; each task touches only its own disjoint range.
struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
impl<T> Shared<T> {
    // A method, so closures capture the whole (Sync) wrapper rather than its raw field.
    fn ptr(self) -> *mut T {
        self.0
    }
}
// SAFETY: used only by `for_each_chunk`, whose tasks write disjoint ranges of one
// exclusively borrowed slice of `T: Send`.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Shared<T> {}

/// Calls `f(c, chunk)` for each `chunk_len`-long chunk of `out` (the last may be shorter),
/// one task per chunk, in parallel.
pub fn for_each_chunk<T: Send>(out: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, chunk_len) = (out.len(), chunk_len.max(1));
    let base = Shared(out.as_mut_ptr());
    for_each_task(len.div_ceil(chunk_len), |c| {
        let start = c * chunk_len;
        let end = (start + chunk_len).min(len);
        // SAFETY: each task has its own c, so the ranges [start, end) are disjoint and lie
        // inside `out`, which this call borrows exclusively until every task has returned.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.ptr().add(start), end - start) };
        f(c, chunk)
    });
}

/// Rows (or tiles) per task for `rows` of them: a few tasks per thread balance the load.
pub fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(parallel_threads() * 4).max(1)
}

/// Calls `f(row_index, row)` for each `row_len`-long chunk of `out`, in parallel when `work`
/// (elements touched) is large enough.
pub fn for_each_row<T, F>(out: &mut [T], row_len: usize, work: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    for_each_row_above(out, row_len, work, PARALLEL_THRESHOLD, f)
}

/// [`for_each_row`] with its own threshold: parallel from `threshold` elements of work.
pub fn for_each_row_above<T, F>(out: &mut [T], row_len: usize, work: usize, threshold: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if work < threshold {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let per = rows_per_task(out.len().div_ceil(row_len));
        for_each_chunk(out, per * row_len, |c, rows| {
            rows.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(c * per + i, r))
        });
    }
}

/// Like [`for_each_row`], with a scratch value made once per worker (`init`) and handed to
/// each call, so rows can reuse a buffer without allocating.
pub fn for_each_row_with<T, S, I, F>(out: &mut [T], row_len: usize, work: usize, init: I, f: F)
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if work < PARALLEL_THRESHOLD {
        let mut scratch = init();
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(&mut scratch, i, r));
    } else {
        let per = rows_per_task(out.len().div_ceil(row_len));
        for_each_chunk(out, per * row_len, |c, rows| {
            let mut scratch = init();
            rows.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(&mut scratch, c * per + i, r))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_process_and_loops_run_on_it() {
        let first = pool() as *const rayon::ThreadPool;
        assert_eq!(first, pool() as *const _);
        assert!(threads() >= 1);
        let mut out = vec![0usize; PARALLEL_THRESHOLD * 2];
        for_each_row(&mut out, 64, PARALLEL_THRESHOLD * 2, |i, r| {
            // Parallel rows run on the kernels' pool, not on rayon's global one.
            let on_pool = rayon::current_thread_index().is_some()
                && std::thread::current().name().is_some_and(|n| n.starts_with("qalora-"));
            r.fill(if on_pool { i + 1 } else { 0 });
        });
        assert!(out.chunks(64).enumerate().all(|(i, r)| r.iter().all(|&v| v == i + 1)));
    }

    /// An executor of three scoped threads pulling tasks from a counter (what the binding's
    /// OpenMP executor does), counting its calls.
    static EXECUTOR_CALLS: AtomicUsize = AtomicUsize::new(0);

    fn three_threads(tasks: usize, job: &(dyn Fn(usize) + Sync)) {
        EXECUTOR_CALLS.fetch_add(1, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| loop {
                    let t = next.fetch_add(1, Ordering::Relaxed);
                    if t >= tasks {
                        break;
                    }
                    job(t);
                });
            }
        });
    }

    #[test]
    fn loops_run_on_a_registered_executor_with_the_same_results() {
        let rows = |out: &mut Vec<usize>| {
            for_each_row(out, 7, PARALLEL_THRESHOLD * 2, |i, r| {
                r.iter_mut().enumerate().for_each(|(j, v)| *v = i * 7 + j)
            });
        };
        let with = |out: &mut Vec<usize>| {
            for_each_row_with(
                out,
                5,
                PARALLEL_THRESHOLD * 2,
                || vec![1usize; 5],
                |s, i, r| r.iter_mut().zip(s.iter()).for_each(|(v, one)| *v = i + one),
            );
        };
        let len = PARALLEL_THRESHOLD * 2 + 3; // a partial last row and last task
        let (mut a, mut b) = (vec![0usize; len - len % 7], vec![0usize; len - len % 5]);
        rows(&mut a);
        with(&mut b);
        set_executor(Some(Executor { threads: || 3, run: three_threads }));
        assert!(has_executor() && parallel_threads() == 3);
        let (mut a2, mut b2) = (vec![0usize; a.len()], vec![0usize; b.len()]);
        rows(&mut a2);
        with(&mut b2);
        let mut chunks = vec![0usize; 1000];
        for_each_chunk(&mut chunks, 64, |c, o| o.iter_mut().for_each(|v| *v = c));
        set_executor(None);
        assert!(!has_executor());
        assert!(EXECUTOR_CALLS.load(Ordering::Relaxed) >= 3);
        assert_eq!(a, a2);
        assert_eq!(b, b2);
        assert!(a.iter().enumerate().all(|(i, &v)| v == i));
        assert!(chunks.iter().enumerate().all(|(i, &c)| c == i / 64));
    }

    /// Every kernel, at sizes that run in parallel, leaves rayon's global pool unbuilt: a
    /// kernel that used it directly would hang in a forked child.
    #[test]
    fn no_kernel_uses_the_global_pool() {
        use crate::matmul::exact::qmatmul_with;
        use crate::matmul::{int8, GroupParams};
        use crate::testutil::{random_codes, random_f32};
        use crate::{group_pool, merge, pack, quant, Isa, ParamDtype, QuantLayout};

        let (n, k, g) = (1024usize, 512usize, 32usize);
        let layout = QuantLayout::new(n, k, 4, g).unwrap();
        let w = random_f32(n * k, 1);
        let mut packed = vec![0u8; layout.packed_len()];
        let (mut s, mut m) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
        quant::quantize(&w, layout, ParamDtype::F16, &mut packed, &mut s, &mut m).unwrap();
        let mut dense = vec![0f32; n * k];
        quant::dequantize(&packed, &s, &m, layout, &mut dense).unwrap();
        let codes = random_codes(n * k, 4, 2);
        pack::pack(&codes, n, k, 4, &mut packed).unwrap();
        let mut unpacked = vec![0u8; n * k];
        pack::unpack(&packed, n, k, 4, &mut unpacked).unwrap();
        let mut pooled = vec![0f32; n * k / g];
        group_pool::group_pool(&w, k, g, &mut pooled).unwrap();
        group_pool::group_pool_backward(&pooled, k, g, &mut dense).unwrap();
        let (a, b) = (random_f32(8 * k / g, 3), random_f32(n * 8, 4));
        let mut merged = vec![0f32; n * k / g];
        merge::merge_offsets(&m, n, k / g, &a, &b, 8, 0.5, g, &mut merged).unwrap();
        let x = random_f32(4 * k, 5);
        let mut y = vec![0f32; 4 * n];
        let params = GroupParams::F32 { scales: &s, offsets: &m };
        qmatmul_with(&x, 4, &packed, params, layout, &mut y, Isa::detect()).unwrap();
        int8::qmatmul_int8_with(&x, 4, &packed, params, layout, &mut y, Isa::detect()).unwrap();
        assert!(rayon::ThreadPoolBuilder::new().num_threads(1).build_global().is_ok());
    }
}
