//! The one crossing between Python and the kernels: the exception classes (handed over once
//! by `qalora.errors`) and the mapping of kernel errors onto them, the helper that releases
//! the GIL and turns a panic into an exception, and tensor conversion.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;
use qalora_core::half::{bf16, f16};
use qalora_core::{ErrorKind, KernelError};
use tch::{Device, Kind, TchError, Tensor};

pub type KResult<T> = Result<T, KernelError>;

/// The Python class raised for each kernel error kind.
struct ErrorClasses {
    shape: Py<PyType>,
    dtype: Py<PyType>,
    device: Py<PyType>,
    bits: Py<PyType>,
    group_size: Py<PyType>,
    code_range: Py<PyType>,
    value: Py<PyType>,
    internal: Py<PyType>,
}

impl ErrorClasses {
    fn of(&self, kind: ErrorKind) -> &Py<PyType> {
        match kind {
            ErrorKind::Shape => &self.shape,
            ErrorKind::DType => &self.dtype,
            ErrorKind::Device => &self.device,
            ErrorKind::Bits => &self.bits,
            ErrorKind::GroupSize => &self.group_size,
            ErrorKind::CodeRange => &self.code_range,
            ErrorKind::Value => &self.value,
            ErrorKind::Internal => &self.internal,
        }
    }

    fn all(&self) -> [&Py<PyType>; 8] {
        [
            &self.shape,
            &self.dtype,
            &self.device,
            &self.bits,
            &self.group_size,
            &self.code_range,
            &self.value,
            &self.internal,
        ]
    }
}

static CLASSES: GILOnceCell<ErrorClasses> = GILOnceCell::new();

/// Hands the exception classes to the extension, once (`qalora.errors` does it at import).
/// Each kernel error kind is raised as its class from then on. Registering the same classes
/// again is a no-op; different ones are refused.
#[pyfunction]
#[pyo3(signature = (*, shape, dtype, device, bits, group_size, code_range, value, internal))]
#[allow(clippy::too_many_arguments)]
pub fn register_errors(
    py: Python<'_>,
    shape: Bound<'_, PyType>,
    dtype: Bound<'_, PyType>,
    device: Bound<'_, PyType>,
    bits: Bound<'_, PyType>,
    group_size: Bound<'_, PyType>,
    code_range: Bound<'_, PyType>,
    value: Bound<'_, PyType>,
    internal: Bound<'_, PyType>,
) -> PyResult<()> {
    let given = [&shape, &dtype, &device, &bits, &group_size, &code_range, &value, &internal];
    for cls in given {
        if !cls.is_subclass_of::<PyException>()? {
            return Err(PyTypeError::new_err(format!("register_errors: {} is not an Exception class", cls.name()?)));
        }
    }
    let classes = ErrorClasses {
        shape: shape.clone().unbind(),
        dtype: dtype.clone().unbind(),
        device: device.clone().unbind(),
        bits: bits.clone().unbind(),
        group_size: group_size.clone().unbind(),
        code_range: code_range.clone().unbind(),
        value: value.clone().unbind(),
        internal: internal.clone().unbind(),
    };
    let stored = CLASSES.get_or_init(py, || classes);
    if stored.all().iter().zip(given).all(|(s, g)| s.bind(py).is(g)) {
        Ok(())
    } else {
        Err(PyRuntimeError::new_err("register_errors: other exception classes are already registered"))
    }
}

/// The registered Python exception for a kernel error. Without registered classes (the
/// extension used without `qalora.errors`) it is a RuntimeError saying so, never a plain
/// ValueError that `except ValueError` would swallow.
pub fn to_py_err(py: Python<'_>, err: KernelError) -> PyErr {
    match CLASSES.get(py) {
        Some(classes) => PyErr::from_type(classes.of(err.kind).bind(py).clone(), err.message),
        None => PyRuntimeError::new_err(format!(
            "qalora._core: no exception classes are registered (qalora.errors registers them when it is \
             imported), so this {:?} error cannot be raised as its own type: {}",
            err.kind, err.message
        )),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs a kernel without the GIL and with autograd recording off; a panic (including a
/// libtorch error raised through tch) becomes `qalora.InternalError`.
pub fn run<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> KResult<T> + Send,
{
    let result = py.allow_threads(move || {
        catch_unwind(AssertUnwindSafe(|| {
            let _no_grad = tch::no_grad_guard();
            f()
        }))
    });
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py_err(py, e)),
        Err(payload) => Err(to_py_err(
            py,
            KernelError::internal(format!("internal error in a qalora kernel: {}", panic_message(payload))),
        )),
    }
}

/// Borrows a Python `torch.Tensor` as a `tch::Tensor` sharing its storage.
pub fn tensor_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Tensor> {
    let ptr = obj.as_ptr() as *mut tch::python::CPyObject;
    // SAFETY: `ptr` is a live Python object (borrowed through `obj`, with the GIL held) for
    // the whole call; the tensor returned holds its own reference to the storage.
    match unsafe { Tensor::pyobject_unpack(ptr) } {
        Ok(Some(t)) => Ok(t),
        _ => {
            let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".to_string());
            Err(to_py_err(obj.py(), KernelError::dtype(format!("{name}: expected a torch.Tensor, got {type_name}"))))
        }
    }
}

pub fn wrap_tensor(py: Python<'_>, t: Tensor) -> PyResult<PyObject> {
    let ptr = t
        .pyobject_wrap()
        .map_err(|e| to_py_err(py, KernelError::internal(format!("could not return a tensor: {e}"))))?;
    // SAFETY: `pyobject_wrap` returns a new reference to a Python tensor (or null with a
    // Python error set, which `from_owned_ptr_or_err` turns into that error).
    unsafe { PyObject::from_owned_ptr_or_err(py, ptr as *mut pyo3::ffi::PyObject) }
}

/// A tensor's element type: one tch knows, or one of torch's unsigned types that tch 0.24
/// has no `Kind` for, or another scalar-type number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Known(Kind),
    UInt16,
    UInt32,
    UInt64,
    Other(i32),
}

/// The dtype of `t`, without panicking on types tch does not know (`Tensor::kind` would).
pub fn dtype_of(t: &Tensor) -> DType {
    // c10::ScalarType numbers of the unsigned types (c10/core/ScalarType.h).
    match t.f_kind() {
        Ok(kind) => DType::Known(kind),
        Err(TchError::UnknownKind(27)) => DType::UInt16,
        Err(TchError::UnknownKind(28)) => DType::UInt32,
        Err(TchError::UnknownKind(29)) => DType::UInt64,
        Err(TchError::UnknownKind(v)) => DType::Other(v),
        Err(_) => DType::Other(-1),
    }
}

impl DType {
    pub fn name(self) -> String {
        match self {
            DType::Known(kind) => kind_name(kind).to_string(),
            DType::UInt16 => "torch.uint16".into(),
            DType::UInt32 => "torch.uint32".into(),
            DType::UInt64 => "torch.uint64".into(),
            DType::Other(v) => format!("an unsupported dtype (torch scalar type {v})"),
        }
    }

    fn size(self) -> Option<usize> {
        match self {
            DType::Known(kind) => Some(kind.elt_size_in_bytes()),
            DType::UInt16 => Some(2),
            DType::UInt32 => Some(4),
            DType::UInt64 => Some(8),
            DType::Other(_) => None,
        }
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "torch.uint8",
        Kind::Int8 => "torch.int8",
        Kind::Int16 => "torch.int16",
        Kind::Int => "torch.int32",
        Kind::Int64 => "torch.int64",
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::Bool => "torch.bool",
        _ => "an unsupported dtype",
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        // tch 0.24 reports every device but cpu, cuda and vulkan (meta, xpu, ...) as MPS.
        Device::Mps => "a device other than cpu and cuda (mps, meta, ...)".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Plain numeric element types: every bit pattern is a valid value, so a tensor's bytes can
/// be viewed as them when sizes match.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}
impl Plain for i16 {}
impl Plain for u32 {}
impl Plain for i32 {}
impl Plain for u64 {}
impl Plain for i64 {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for f16 {}
impl Plain for bf16 {}

/// Asserts what viewing `t`'s elements as `T` needs; returns the element count.
fn check_view<T: Plain>(t: &Tensor) -> usize {
    let dtype = dtype_of(t);
    assert!(
        dtype.size() == Some(std::mem::size_of::<T>()) && t.is_contiguous() && t.device() == Device::Cpu,
        "viewing a {} tensor as {} elements",
        dtype.name(),
        std::any::type_name::<T>()
    );
    t.numel()
}

/// Read-only view of a contiguous CPU tensor's elements (element size checked). The caller
/// holds the tensor for the view's lifetime; a Python thread writing to the same tensor
/// meanwhile is a race the caller's Python code owns, as with any zero-copy extension.
pub fn slice<T: Plain>(t: &Tensor) -> &[T] {
    let n = check_view::<T>(t);
    if n == 0 {
        return &[];
    }
    // SAFETY: `check_view` asserted a contiguous CPU tensor of `n` elements of T's size;
    // torch aligns element storage to the element size, and every bit pattern is a valid
    // `T: Plain`. The storage lives as long as `t` is borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

/// Mutable view of a contiguous CPU tensor's elements (element size checked), for an op
/// that writes into a tensor the caller passed (`out=`). The caller holds the tensor for the
/// view's lifetime and makes sure no other view of the same memory is alive meanwhile.
#[allow(clippy::mut_from_ref)]
pub fn slice_mut<T: Plain>(t: &Tensor) -> &mut [T] {
    let n = check_view::<T>(t);
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `slice`; exclusive access is the caller's contract above (the binding
    // checks that an `out=` tensor is either the input it replaces, whose read-only view is
    // then never made, or does not overlap any input).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}

/// The error for a tensor libtorch could not allocate: the shape asked for is too large for
/// this machine (a caller's size, such as a huge group size or an expanded view, not a bug).
pub fn allocation_error(shape: &[i64], dtype: &str, err: TchError) -> KernelError {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    KernelError::shape(format!("could not allocate a {dtype} tensor of shape {shape:?}: {first}"))
}

/// `t` in contiguous memory (itself when it already is). An input can be a view, such as an
/// `expand`, whose dense copy is too large to allocate: that is a typed error.
pub fn contiguous(t: &Tensor) -> KResult<Tensor> {
    t.f_contiguous().map_err(|e| allocation_error(&t.size(), &dtype_of(t).name(), e))
}

/// `t` as a contiguous tensor of `kind` (itself when it already is one), as [`contiguous`].
pub fn dense(t: &Tensor, kind: Kind) -> KResult<Tensor> {
    contiguous(&t.f_to_kind(kind).map_err(|e| allocation_error(&t.size(), kind_name(kind), e))?)
}

/// A CPU tensor just allocated here. It is the only handle to its storage until
/// [`Fresh::into_tensor`], so it can lend its elements mutably.
pub struct Fresh(Tensor);

impl Fresh {
    /// Allocates an uninitialised CPU tensor for a kernel to fill. Large outputs are freshly
    /// mmapped by the allocator, and faulting them in 4 KiB at a time cost more than the
    /// kernels themselves (measured: ~3 ms for an 8 MiB pack output that takes 0.4 ms to
    /// fill), so they are advised onto transparent huge pages first: a hint, errors ignored.
    pub fn empty(shape: &[i64], kind: Kind) -> KResult<Fresh> {
        let t = Tensor::f_empty(shape, (kind, Device::Cpu)).map_err(|e| allocation_error(shape, kind_name(kind), e))?;
        #[cfg(target_os = "linux")]
        {
            const HUGE: usize = 2 << 20;
            const MADV_HUGEPAGE: i32 = 14;
            extern "C" {
                fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
            }
            let bytes = t.numel() * kind.elt_size_in_bytes();
            if bytes >= 2 * HUGE {
                let start = t.data_ptr() as usize;
                let (lo, hi) = ((start + HUGE - 1) & !(HUGE - 1), (start + bytes) & !(HUGE - 1));
                if hi > lo {
                    // SAFETY: [lo, hi) lies inside the tensor's allocation; MADV_HUGEPAGE only
                    // changes how untouched pages are backed, never their contents.
                    unsafe { madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE) };
                }
            }
        }
        Ok(Fresh(t))
    }

    /// The elements, to fill.
    pub fn data_mut<T: Plain>(&mut self) -> &mut [T] {
        let n = check_view::<T>(&self.0);
        if n == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`; and nothing else touches this storage while `self` is
        // mutably borrowed: `Fresh` never shares its tensor.
        unsafe { std::slice::from_raw_parts_mut(self.0.data_ptr() as *mut T, n) }
    }

    pub fn into_tensor(self) -> Tensor {
        self.0
    }
}

/// A per-thread buffer for transient tiles (the large-M path's dequantized rows): reused
/// from call to call, so a tile is neither allocated nor page-faulted in anew each time
/// (in a training step of SmolLM2-135M that cost more than dequantizing it, measured).
/// It holds at most one tile per thread (16 MiB at the largest).
pub struct Scratch {
    words: Vec<u64>,
    shape: [i64; 2],
    kind: Kind,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    /// Lends this thread's buffer, grown to hold `shape` of `kind`, to `f`. A call nested
    /// inside `f` gets a buffer of its own (the lent one is out of the cell meanwhile).
    pub fn with<R>(shape: [usize; 2], kind: Kind, f: impl FnOnce(&mut Scratch) -> R) -> R {
        let bytes = shape[0] * shape[1] * kind.elt_size_in_bytes();
        let mut words = SCRATCH.with(|c| c.take());
        if words.len() * 8 < bytes {
            words = vec![0u64; bytes.div_ceil(8)];
        }
        let mut s = Scratch { words, shape: [shape[0] as i64, shape[1] as i64], kind };
        let r = f(&mut s);
        SCRATCH.with(|c| c.set(s.words));
        r
    }

    /// The first rows*cols elements, to fill.
    pub fn data_mut<T: Plain>(&mut self) -> &mut [T] {
        assert_eq!(std::mem::size_of::<T>(), self.kind.elt_size_in_bytes(), "scratch viewed at another width");
        let n = (self.shape[0] * self.shape[1]) as usize;
        // SAFETY: the buffer holds at least n elements of T (grown in `with`; u64 words are
        // aligned for every Plain type), `T: Plain` accepts any bits, and `&mut self` makes
        // this the only view while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut T, n) }
    }

    /// Calls `f` with a tensor of the first `rows` rows over the buffer, for torch to read.
    /// The tensor does not own the memory: `f` must not keep it (torch's GEMMs do not).
    pub fn with_rows<R>(&self, rows: usize, f: impl FnOnce(&Tensor) -> R) -> R {
        let cols = self.shape[1];
        // SAFETY: the view covers rows*cols elements of `kind` inside the buffer, which
        // outlives the tensor (dropped at the end of this call, before `self` can change).
        let t = unsafe {
            Tensor::from_blob(
                self.words.as_ptr() as *const u8,
                &[rows as i64, cols],
                &[cols, 1],
                self.kind,
                Device::Cpu,
            )
        };
        f(&t)
    }
}
