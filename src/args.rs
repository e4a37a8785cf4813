//! Arguments, parsed once at the boundary: option strings and dtypes into enums (through
//! `FromPyObject`, so every function reports a bad one the same way), integers as given,
//! and the tensor checks every op runs before any raw memory is touched.

use std::fmt;

use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyString, PyType};
use qalora_core::layout::{check_bits, size_product, GivenInt};
use qalora_core::{KernelError, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::boundary::{device_name, dtype_of, kind_name, to_py_err, DType, KResult};

pub const FLOAT_KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double];

fn type_and_repr(ob: &Bound<'_, PyAny>) -> String {
    let type_name = ob.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    let repr = ob.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
    format!("{type_name} {repr}")
}

/// Parses an option string: a non-str is a DTypeError naming the argument, an unknown value
/// an InvalidValueError listing the allowed ones.
fn parse_choice<T: Copy>(ob: &Bound<'_, PyAny>, arg: &str, choices: &[(&str, T)]) -> PyResult<T> {
    let py = ob.py();
    let Ok(text) = ob.downcast::<PyString>() else {
        return Err(to_py_err(py, KernelError::dtype(format!("{arg}: expected a str, got {}", type_and_repr(ob)))));
    };
    let text = text.to_cow()?;
    if let Some(&(_, v)) = choices.iter().find(|(name, _)| *name == text) {
        return Ok(v);
    }
    let allowed = choices.iter().map(|(name, _)| format!("'{name}'")).collect::<Vec<_>>().join(", ");
    let got = ob.repr().map(|r| r.to_string()).unwrap_or_else(|_| text.to_string());
    Err(to_py_err(py, KernelError::value(format!("{arg}: got {got}, allowed: {allowed}"))))
}

/// `torch.dtype`, looked up once.
fn torch_dtype_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static DTYPE: GILOnceCell<Py<PyType>> = GILOnceCell::new();
    DTYPE.import(py, "torch", "dtype")
}

/// Parses a `torch.dtype` argument: anything else is a DTypeError naming the argument, and a
/// dtype outside `allowed` a DTypeError listing the allowed ones.
fn parse_dtype<T: Copy>(ob: &Bound<'_, PyAny>, arg: &str, allowed: &[(Kind, T)]) -> PyResult<T> {
    let py = ob.py();
    if !ob.is_instance(torch_dtype_type(py)?)? {
        return Err(to_py_err(
            py,
            KernelError::dtype(format!(
                "{arg}: expected a torch.dtype such as torch.float16, got {}",
                type_and_repr(ob)
            )),
        ));
    }
    let name = ob.str()?.to_string();
    if let Some(&(_, v)) = allowed.iter().find(|(kind, _)| kind_name(*kind) == name) {
        return Ok(v);
    }
    let names = allowed.iter().map(|(kind, _)| kind_name(*kind)).collect::<Vec<_>>().join(", ");
    Err(to_py_err(py, KernelError::dtype(format!("{arg}: got {name}, allowed: {names}"))))
}

/// Defines an enum of an option's values and its `FromPyObject`.
macro_rules! option_enum {
    ($(#[$doc:meta])* $name:ident, $arg:literal, $parse:ident, { $($(#[$vdoc:meta])* $variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl<'py> FromPyObject<'py> for $name {
            fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
                $parse(ob, $arg, &[$(($value, $name::$variant)),+])
            }
        }
    };
}

option_enum!(
    /// The `backend` argument: which implementation runs an op.
    BackendArg, "backend", parse_choice, {
        /// The core for CPU tensors of a dtype it takes, the torch path otherwise.
        Auto = "auto",
        Core = "core",
        Torch = "torch",
    }
);

option_enum!(
    /// How a small-M CPU qmatmul treats its activations (see `qalora_core::matmul::int8`).
    Activations, "activations", parse_choice, {
        Exact = "exact",
        Int8 = "int8",
        Bf16 = "bf16",
    }
);

option_enum!(
    /// Storage dtype of quantized scales and offsets.
    ScaleDType, "scale_dtype", parse_dtype, {
        F16 = Kind::Half,
        BF16 = Kind::BFloat16,
        F32 = Kind::Float,
    }
);

option_enum!(
    /// Dtype of a dense result.
    OutDType, "dtype", parse_dtype, {
        F16 = Kind::Half,
        BF16 = Kind::BFloat16,
        F32 = Kind::Float,
        F64 = Kind::Double,
    }
);

impl ScaleDType {
    pub fn kind(self) -> Kind {
        match self {
            ScaleDType::F16 => Kind::Half,
            ScaleDType::BF16 => Kind::BFloat16,
            ScaleDType::F32 => Kind::Float,
        }
    }
}

impl OutDType {
    pub fn kind(self) -> Kind {
        match self {
            OutDType::F16 => Kind::Half,
            OutDType::BF16 => Kind::BFloat16,
            OutDType::F32 => Kind::Float,
            OutDType::F64 => Kind::Double,
        }
    }
}

/// Which implementation runs an op, once resolved against the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The tch-free Rust core (CPU tensors).
    Core,
    /// libtorch ops through tch: any device (CUDA), any float dtype.
    Torch,
}

impl BackendArg {
    /// "auto" picks the core for CPU tensors of a dtype it takes, the torch path otherwise.
    pub fn resolve(self, device: Device, core_takes_it: bool) -> KResult<Backend> {
        match self {
            BackendArg::Auto => Ok(if device == Device::Cpu && core_takes_it { Backend::Core } else { Backend::Torch }),
            BackendArg::Torch => Ok(Backend::Torch),
            BackendArg::Core if device != Device::Cpu => Err(KernelError::device(format!(
                "backend='core' runs on CPU tensors only, got tensors on {}",
                device_name(device)
            ))),
            BackendArg::Core if !core_takes_it => Err(KernelError::dtype(
                "backend='core' takes float32 inputs for this op; use backend='auto' or 'torch' for other dtypes",
            )),
            BackendArg::Core => Ok(Backend::Core),
        }
    }
}

/// An integer argument as the caller gave it (a Python int of any size). The core checks it
/// and reports it as given.
#[derive(Debug, Clone)]
pub enum IntArg {
    Fits(i64),
    /// Outside the i64 range: its decimal digits.
    Huge(String),
}

impl fmt::Display for IntArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntArg::Fits(v) => write!(f, "{v}"),
            IntArg::Huge(digits) => f.write_str(digits),
        }
    }
}

impl GivenInt for IntArg {
    fn get(&self) -> Option<i64> {
        match self {
            IntArg::Fits(v) => Some(*v),
            IntArg::Huge(_) => None,
        }
    }
}

/// Reads an int argument (a Python int or anything with `__index__`, not a bool); anything
/// else is a DTypeError naming the argument.
pub fn int_arg(ob: &Bound<'_, PyAny>, arg: &str) -> PyResult<IntArg> {
    let py = ob.py();
    let not_int = || to_py_err(py, KernelError::dtype(format!("{arg}: expected an int, got {}", type_and_repr(ob))));
    if ob.is_instance_of::<PyBool>() {
        return Err(not_int());
    }
    match ob.extract::<i64>() {
        Ok(v) => Ok(IntArg::Fits(v)),
        Err(e) if e.is_instance_of::<PyOverflowError>(py) => Ok(IntArg::Huge(ob.str()?.to_string())),
        Err(_) => Err(not_int()),
    }
}

/// Reads a float argument (a Python float or int, not a bool).
pub fn float_arg(ob: &Bound<'_, PyAny>, arg: &str) -> PyResult<f64> {
    let py = ob.py();
    let not_float = || to_py_err(py, KernelError::dtype(format!("{arg}: expected a float, got {}", type_and_repr(ob))));
    if ob.is_instance_of::<PyBool>() {
        return Err(not_float());
    }
    ob.extract::<f64>().map_err(|_| not_float())
}

pub fn check_kind(t: &Tensor, name: &str, allowed: &[Kind]) -> KResult<Kind> {
    match dtype_of(t) {
        DType::Known(kind) if allowed.contains(&kind) => Ok(kind),
        other => Err(KernelError::dtype(format!(
            "{name}: got dtype {}, allowed: {}",
            other.name(),
            allowed.iter().map(|k| kind_name(*k)).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The integer dtypes codes may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeDType {
    U8,
    I8,
    I16,
    I32,
    I64,
    U16,
    U32,
    U64,
}

pub fn code_dtype(t: &Tensor, name: &str) -> KResult<CodeDType> {
    let dtype = dtype_of(t);
    Ok(match dtype {
        DType::Known(Kind::Uint8) => CodeDType::U8,
        DType::Known(Kind::Int8) => CodeDType::I8,
        DType::Known(Kind::Int16) => CodeDType::I16,
        DType::Known(Kind::Int) => CodeDType::I32,
        DType::Known(Kind::Int64) => CodeDType::I64,
        DType::UInt16 => CodeDType::U16,
        DType::UInt32 => CodeDType::U32,
        DType::UInt64 => CodeDType::U64,
        other => {
            return Err(KernelError::dtype(format!(
                "{name}: got dtype {}, allowed: torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, \
                 torch.uint16, torch.uint32, torch.uint64",
                other.name()
            )))
        }
    })
}

pub fn check_dims(t: &Tensor, name: &str, dims: usize) -> KResult<()> {
    if t.dim() == dims {
        Ok(())
    } else {
        Err(KernelError::shape(format!("{name}: got shape {:?}, expected a {dims}-D tensor", t.size())))
    }
}

pub fn non_empty(t: &Tensor, name: &str) -> KResult<()> {
    if t.numel() == 0 {
        Err(KernelError::shape(format!("{name}: got an empty tensor of shape {:?}", t.size())))
    } else {
        Ok(())
    }
}

pub fn check_shape(t: &Tensor, name: &str, want: &[i64], meaning: &str) -> KResult<()> {
    if t.size() == want {
        Ok(())
    } else {
        Err(KernelError::shape(format!("{name}: got shape {:?}, expected {want:?} ({meaning})", t.size())))
    }
}

/// Size `d` of `t` (tensor sizes are never negative).
pub fn dim(t: &Tensor, d: usize) -> usize {
    t.size()[d] as usize
}

/// All tensors must sit on one device; returns it.
pub fn same_device(tensors: &[(&str, &Tensor)]) -> KResult<Device> {
    let (first_name, first) = tensors[0];
    let device = first.device();
    for (name, t) in &tensors[1..] {
        if t.device() != device {
            return Err(KernelError::device(format!(
                "{name} is on {} but {first_name} is on {}; move them to one device",
                device_name(t.device()),
                device_name(device)
            )));
        }
    }
    Ok(device)
}

/// A frozen quantized weight as the ops receive it: packed codes (N, K*b/8) uint8 and
/// scales/offsets (N, K/g): float, or for factored parameters (docs/design.md §2) uint8/int8
/// integers that `factors` multiply.
pub struct QuantWeight {
    pub packed: Tensor,
    pub scales: Tensor,
    pub offsets: Tensor,
    pub factors: Option<Factors>,
    pub layout: QuantLayout,
    pub device: Device,
}

/// The float16 factors of factored group parameters, (N, K/g/per_factor) each: group l of
/// row n is `factor[n, l / per_factor] · int[n, l]`.
pub struct Factors {
    pub scales: Tensor,
    pub offsets: Tensor,
    pub per_factor: usize,
}

const INT_PARAM_KINDS: [Kind; 2] = [Kind::Uint8, Kind::Int8];

impl QuantWeight {
    /// Validates the buffers. `k` is the in_features the caller expects, if it knows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        packed: Tensor,
        scales: Tensor,
        offsets: Tensor,
        bits: IntArg,
        group_size: IntArg,
        k: Option<usize>,
        scale_factors: Option<Tensor>,
        offset_factors: Option<Tensor>,
    ) -> KResult<Self> {
        let bits = check_bits(bits)?;
        check_kind(&packed, "packed", &[Kind::Uint8])?;
        check_dims(&packed, "packed", 2)?;
        if !packed.is_contiguous() {
            return Err(KernelError::shape("packed: the tensor is not contiguous; pass packed.contiguous()"));
        }
        let (n, row_bytes) = (dim(&packed, 0), dim(&packed, 1));
        let b = bits as usize;
        let row_bits = row_bytes
            .checked_mul(8)
            .ok_or_else(|| KernelError::shape(format!("packed: rows of {row_bytes} bytes are too long to address")))?;
        let k = match k {
            Some(k) => {
                if k.checked_mul(b) != Some(row_bits) {
                    return Err(KernelError::shape(format!(
                        "x: last dimension K = {k} does not match the quantized weight: packed rows of {row_bytes} bytes hold {} codes of {bits} bits",
                        row_bits as f64 / b as f64
                    )));
                }
                k
            }
            None => {
                if !row_bits.is_multiple_of(b) {
                    return Err(KernelError::shape(format!(
                        "packed: rows of {row_bytes} bytes are not a whole number of {bits}-bit codes"
                    )));
                }
                row_bits / b
            }
        };
        let layout = QuantLayout::new(n, k, bits, group_size)?;
        let want = [n as i64, layout.groups() as i64];
        let factors = match (scale_factors, offset_factors) {
            (None, None) => {
                for (name, t) in [("scales", &scales), ("offsets", &offsets)] {
                    check_kind(t, name, &[Kind::Half, Kind::BFloat16, Kind::Float])?;
                    check_shape(t, name, &want, "N, K/group_size")?;
                }
                None
            }
            (Some(sf), Some(of)) => Some(Factors::new(&scales, &offsets, sf, of, &layout)?),
            _ => {
                return Err(KernelError::shape(
                    "scale_factors, offset_factors: factored group parameters need both (or neither)",
                ))
            }
        };
        let mut named = vec![("packed", &packed), ("scales", &scales), ("offsets", &offsets)];
        if let Some(f) = &factors {
            named.extend([("scale_factors", &f.scales), ("offset_factors", &f.offsets)]);
        }
        let device = same_device(&named)?;
        Ok(Self { packed, scales, offsets, factors, layout, device })
    }

    /// Scales and offsets as contiguous f32 tensors (small: N*K/g values), factored ones
    /// multiplied out (exact in f32).
    pub fn params_f32(&self) -> (Tensor, Tensor) {
        let Some(f) = &self.factors else {
            return (self.scales.to_kind(Kind::Float).contiguous(), self.offsets.to_kind(Kind::Float).contiguous());
        };
        let (n, groups) = (self.layout.n as i64, self.layout.groups() as i64);
        let expand = |ints: &Tensor, factors: &Tensor| {
            let spread = factors
                .to_kind(Kind::Float)
                .unsqueeze(-1)
                .expand([n, groups / f.per_factor as i64, f.per_factor as i64], false);
            (spread.reshape([n, groups]) * ints.to_kind(Kind::Float)).contiguous()
        };
        (expand(&self.scales, &f.scales), expand(&self.offsets, &f.offsets))
    }
}

impl Factors {
    fn new(scales: &Tensor, offsets: &Tensor, sf: Tensor, of: Tensor, layout: &QuantLayout) -> KResult<Self> {
        let (n, groups) = (layout.n as i64, layout.groups() as i64);
        for (name, t) in [("scales", scales), ("offsets", offsets)] {
            check_kind(t, &format!("{name} (factored: integers times {name} factors)"), &INT_PARAM_KINDS)?;
            check_shape(t, name, &[n, groups], "N, K/group_size")?;
        }
        check_kind(&sf, "scale_factors", &[Kind::Half])?;
        check_kind(&of, "offset_factors", &[Kind::Half])?;
        check_dims(&sf, "scale_factors", 2)?;
        let per_row = sf.size()[1];
        if per_row <= 0 || groups % per_row != 0 {
            return Err(KernelError::shape(format!(
                "scale_factors: got shape {:?}; its {per_row} factors per row must divide the {groups} groups per row",
                sf.size()
            )));
        }
        let want = [n, per_row];
        check_shape(&sf, "scale_factors", &want, "N, a divisor of K/group_size")?;
        check_shape(&of, "offset_factors", &want, "the shape of scale_factors")?;
        Ok(Self { scales: sf, offsets: of, per_factor: (groups / per_row) as usize })
    }
}

/// Checks an activation tensor whose last dimension is `k`; returns (leading shape, M).
pub fn activation(x: &Tensor, name: &str, k: usize, what: &str) -> KResult<(Vec<i64>, usize)> {
    check_kind(x, name, &FLOAT_KINDS)?;
    let size = x.size();
    match size.last() {
        Some(&last) if last as usize == k => {}
        _ => {
            return Err(KernelError::shape(format!(
                "{name}: got shape {size:?}, its last dimension must equal {what} = {k}"
            )))
        }
    }
    let lead = size[..size.len() - 1].to_vec();
    let dims: Vec<usize> = lead.iter().map(|&d| d as usize).collect();
    let m = size_product(name, &dims)?;
    size_product(name, &[m, k])?;
    Ok((lead, m))
}
