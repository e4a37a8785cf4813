//! The one crossing between Python and the kernels: tensor conversion, the mapping of
//! kernel errors onto `qalora.errors`, and the helper that releases the GIL and turns a
//! panic into an exception.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyType;
use qalora_core::{ErrorKind, KernelError};
use tch::{Device, Kind, Tensor};

pub type KResult<T> = Result<T, KernelError>;

/// Python class (in `qalora.errors`) raised for each kernel error kind.
fn exception_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Shape => "ShapeError",
        ErrorKind::DType => "DTypeError",
        ErrorKind::Device => "DeviceError",
        ErrorKind::Bits => "UnsupportedBitsError",
        ErrorKind::GroupSize => "GroupSizeError",
        ErrorKind::CodeRange => "CodeRangeError",
        ErrorKind::Value => "InvalidValueError",
        ErrorKind::Internal => "InternalError",
    }
}

pub fn to_py_err(py: Python<'_>, err: KernelError) -> PyErr {
    let class = py
        .import("qalora.errors")
        .and_then(|m| m.getattr(exception_name(err.kind)))
        .and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(cls) => PyErr::from_type(cls, err.message),
        // Only reachable if the extension is used without its Python package.
        Err(_) => PyValueError::new_err(err.message),
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
    Ok(unsafe { PyObject::from_owned_ptr(py, ptr as *mut pyo3::ffi::PyObject) })
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
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Parses a dtype name sent by the Python shell ("float16", "bfloat16", "float32", "float64").
pub fn parse_float_kind(name: &str, arg: &str, allowed: &[Kind]) -> KResult<Kind> {
    let kind = match name.trim_start_matches("torch.") {
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "float32" | "float" => Kind::Float,
        "float64" | "double" => Kind::Double,
        _ => Kind::Uint8, // rejected below
    };
    if allowed.contains(&kind) {
        Ok(kind)
    } else {
        Err(KernelError::dtype(format!(
            "{arg}: got {name}, allowed: {}",
            allowed.iter().map(|k| kind_name(*k)).collect::<Vec<_>>().join(", ")
        )))
    }
}

/// Read-only view of a contiguous CPU tensor's elements. Callers have checked kind,
/// device and contiguity.
pub fn slice<T>(t: &Tensor) -> &[T] {
    debug_assert!(t.is_contiguous() && t.device() == Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

/// Mutable view of a contiguous CPU tensor the caller just allocated.
#[allow(clippy::mut_from_ref)]
pub fn slice_mut<T>(t: &Tensor) -> &mut [T] {
    debug_assert!(t.is_contiguous() && t.device() == Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}
