//! `qalora._core`: the Python binding of the qalora kernels. Each function validates its
//! arguments, picks the core (CPU, rayon) or the torch path (any device), and runs without
//! the GIL. The public, documented API is `qalora.ops`; these functions are its engine.

mod args;
mod boundary;
mod core_path;
mod torch_path;

use numpy::{PyArray2, PyReadonlyArray2};
use pyo3::prelude::*;
use qalora_core::{check_bits, max_code, packed_row_bytes, KernelError, QuantLayout};
use tch::{Kind, Tensor};

use args::{
    activation, check_dims, check_kind, check_shape, same_device, usize_arg, Backend, QuantWeight, FLOAT_KINDS,
};
use boundary::{parse_float_kind, run, tensor_arg, wrap_tensor, KResult};

const INT_KINDS: [Kind; 5] = [Kind::Uint8, Kind::Int8, Kind::Int16, Kind::Int, Kind::Int64];

fn bits_arg(bits: i64) -> KResult<u32> {
    let b = u32::try_from(bits).unwrap_or(0);
    check_bits(b).map_err(|_| {
        KernelError::new(qalora_core::ErrorKind::Bits, format!("bits: got {bits}, allowed values are 2, 3, 4 and 8"))
    })?;
    Ok(b)
}

fn non_empty(t: &Tensor, name: &str) -> KResult<()> {
    if t.numel() == 0 {
        Err(KernelError::shape(format!("{name}: got an empty tensor of shape {:?}", t.size())))
    } else {
        Ok(())
    }
}

/// Fails at the first code outside [0, 2^bits - 1], naming its position and value.
fn check_code_range(codes: &Tensor, bits: u32) -> KResult<()> {
    let qmax = max_code(bits) as i64;
    let c = codes.to_kind(Kind::Int64);
    let bad = c.lt(0).logical_or(&c.gt(qmax));
    if bool::try_from(bad.any()).unwrap_or(true) {
        let pos = bad.nonzero().get(0);
        let (r, col) = (pos.int64_value(&[0]), pos.int64_value(&[1]));
        return Err(KernelError::new(
            qalora_core::ErrorKind::CodeRange,
            format!(
                "codes: value {} at row {r}, column {col} is outside [0, {qmax}] allowed at {bits} bits",
                c.int64_value(&[r, col])
            ),
        ));
    }
    Ok(())
}

/// Packs integer codes (N, K) in [0, 2^bits - 1] into the canonical bitstream (N, K*bits/8) uint8.
#[pyfunction]
#[pyo3(signature = (codes, bits, backend="auto"))]
fn pack(py: Python<'_>, codes: &Bound<'_, PyAny>, bits: i64, backend: &str) -> PyResult<PyObject> {
    let codes = tensor_arg(codes, "codes")?;
    let be = backend;
    let out = run(py, move || {
        let bits = bits_arg(bits)?;
        check_kind(&codes, "codes", &INT_KINDS)?;
        check_dims(&codes, "codes", 2)?;
        non_empty(&codes, "codes")?;
        packed_row_bytes(codes.size()[1] as usize, bits)?;
        Ok(match args::backend(be, codes.device(), true)? {
            // The core checks the range itself, in the same pass as narrowing or packing.
            Backend::Core => core_path::pack_codes(&codes, bits)?,
            Backend::Torch => {
                check_code_range(&codes, bits)?;
                torch_path::pack(&codes, bits)
            }
        })
    })?;
    wrap_tensor(py, out)
}

/// Unpacks (N, K*bits/8) uint8 into (N, K) uint8 codes.
#[pyfunction]
#[pyo3(signature = (packed, bits, k, backend="auto"))]
fn unpack(py: Python<'_>, packed: &Bound<'_, PyAny>, bits: i64, k: i64, backend: &str) -> PyResult<PyObject> {
    let packed = tensor_arg(packed, "packed")?;
    let be = backend;
    let out = run(py, move || {
        let bits = bits_arg(bits)?;
        let k = usize_arg(k, "k")?;
        check_kind(&packed, "packed", &[Kind::Uint8])?;
        check_dims(&packed, "packed", 2)?;
        non_empty(&packed, "packed")?;
        if k == 0 {
            return Err(KernelError::shape("k: got 0, it must be at least 1"));
        }
        let row_bytes = packed_row_bytes(k, bits)?;
        if packed.size()[1] as usize != row_bytes {
            return Err(KernelError::shape(format!(
                "packed: got rows of {} bytes, K = {k} codes of {bits} bits need {row_bytes}",
                packed.size()[1]
            )));
        }
        Ok(match args::backend(be, packed.device(), true)? {
            Backend::Core => core_path::unpack_codes(&packed.contiguous(), bits, k)?,
            Backend::Torch => torch_path::unpack(&packed, bits, k),
        })
    })?;
    wrap_tensor(py, out)
}

/// Min-max RTN group quantization of a (N, K) weight -> (packed, scales, offsets).
#[pyfunction]
#[pyo3(signature = (weight, bits, group_size, scale_dtype="float16", backend="auto"))]
fn quantize(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    bits: i64,
    group_size: i64,
    scale_dtype: &str,
    backend: &str,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let w = tensor_arg(weight, "weight")?;
    let (be, sd) = (backend, scale_dtype.to_string());
    let (p, s, o) = run(py, move || {
        let bits = bits_arg(bits)?;
        let scale_kind = parse_float_kind(&sd, "scale_dtype", &args::PARAM_KINDS)?;
        check_kind(&w, "weight", &FLOAT_KINDS)?;
        check_dims(&w, "weight", 2)?;
        let g = usize_arg(group_size, "group_size")?;
        let layout = QuantLayout::new(w.size()[0] as usize, w.size()[1] as usize, bits, g)?;
        match args::backend(be, w.device(), true)? {
            Backend::Core => core_path::quantize(&w, layout, scale_kind),
            Backend::Torch => torch_path::quantize(&w, layout, scale_kind),
        }
    })?;
    Ok((wrap_tensor(py, p)?, wrap_tensor(py, s)?, wrap_tensor(py, o)?))
}

/// Dense (N, K) weight s*q + m in `dtype`.
#[pyfunction]
#[pyo3(signature = (packed, scales, offsets, bits, group_size, dtype="float32", backend="auto"))]
#[allow(clippy::too_many_arguments)]
fn dequantize(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: i64,
    group_size: i64,
    dtype: &str,
    backend: &str,
) -> PyResult<PyObject> {
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (be, dt) = (backend, dtype.to_string());
    let out = run(py, move || {
        let kind = parse_float_kind(&dt, "dtype", &FLOAT_KINDS)?;
        let w = QuantWeight::new(p, s, o, bits, group_size, None)?;
        Ok(match args::backend(be, w.device, true)? {
            Backend::Core => core_path::dequantize(&w, kind)?,
            Backend::Torch => torch_path::dequantize(&w, kind),
        })
    })?;
    wrap_tensor(py, out)
}

/// Shared front half of qmatmul and its backward: validates and flattens `t` to 2-D.
fn matmul_operands(t: &Tensor, name: &str, w: &QuantWeight, forward: bool) -> KResult<(Vec<i64>, Tensor)> {
    let (k, what) = if forward { (w.layout.k, "in_features K") } else { (w.layout.n, "out_features N") };
    let (lead, m) = activation(t, name, k, what)?;
    same_device(&[("packed", &w.packed), (name, t)])?;
    Ok((lead, t.reshape([m as i64, k as i64])))
}

fn with_last(lead: &[i64], last: usize) -> Vec<i64> {
    let mut s = lead.to_vec();
    s.push(last as i64);
    s
}

/// y = x W~^T for x of shape (..., K).
#[pyfunction]
#[pyo3(signature = (x, packed, scales, offsets, bits, group_size, backend="auto", activations="exact"))]
#[allow(clippy::too_many_arguments)]
fn qmatmul(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: i64,
    group_size: i64,
    backend: &str,
    activations: &str,
) -> PyResult<PyObject> {
    let x = tensor_arg(x, "x")?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let be = backend;
    let out = run(py, move || {
        let int8 = args::int8_activations(activations)?;
        // in_features comes from x, so a packed buffer of the wrong width is named as such.
        let k = x.size().last().map(|&k| k as usize);
        let w = QuantWeight::new(p, s, o, bits, group_size, k)?;
        let (lead, x2) = matmul_operands(&x, "x", &w, true)?;
        let y = match args::backend(be, w.device, true)? {
            Backend::Core => core_path::qmatmul(&x2, &w, int8)?,
            Backend::Torch => torch_path::qmatmul(&x2, &w),
        };
        Ok(y.reshape(with_last(&lead, w.layout.n).as_slice()))
    })?;
    wrap_tensor(py, out)
}

/// grad_x = grad_output W~ for grad_output of shape (..., N): the backward of qmatmul.
#[pyfunction]
#[pyo3(signature = (grad_output, packed, scales, offsets, bits, group_size, backend="auto"))]
#[allow(clippy::too_many_arguments)]
fn qmatmul_grad_input(
    py: Python<'_>,
    grad_output: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: i64,
    group_size: i64,
    backend: &str,
) -> PyResult<PyObject> {
    let g = tensor_arg(grad_output, "grad_output")?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let be = backend;
    let out = run(py, move || {
        let w = QuantWeight::new(p, s, o, bits, group_size, None)?;
        let (lead, g2) = matmul_operands(&g, "grad_output", &w, false)?;
        let gx = match args::backend(be, w.device, true)? {
            Backend::Core => core_path::qmatmul_grad_input(&g2, &w)?,
            Backend::Torch => torch_path::qmatmul_grad_input(&g2, &w),
        };
        Ok(gx.reshape(with_last(&lead, w.layout.k).as_slice()))
    })?;
    wrap_tensor(py, out)
}

fn group_size_for(k: usize, group_size: i64, name: &str) -> KResult<usize> {
    let g = usize_arg(group_size, "group_size")?;
    if g == 0 || k % g != 0 {
        return Err(KernelError::new(
            qalora_core::ErrorKind::GroupSize,
            format!("group_size: got {group_size}, it must be a positive divisor of {name}'s last dimension {k}"),
        ));
    }
    Ok(g)
}

/// Mean over each contiguous group of `group_size` along the last dimension.
#[pyfunction]
#[pyo3(signature = (x, group_size, backend="auto"))]
fn group_pool(py: Python<'_>, x: &Bound<'_, PyAny>, group_size: i64, backend: &str) -> PyResult<PyObject> {
    let x = tensor_arg(x, "x")?;
    let be = backend;
    let out = run(py, move || {
        check_kind(&x, "x", &FLOAT_KINDS)?;
        let k = x.size().last().copied().unwrap_or(0) as usize;
        if k == 0 {
            return Err(KernelError::shape(format!(
                "x: got shape {:?}, the last dimension must be at least 1",
                x.size()
            )));
        }
        let g = group_size_for(k, group_size, "x")?;
        let lead = x.size()[..x.dim() - 1].to_vec();
        Ok(match args::backend(be, x.device(), x.kind() == Kind::Float)? {
            Backend::Core => core_path::group_pool(&x.to_kind(Kind::Float), &lead, k, g)?.to_kind(x.kind()),
            Backend::Torch => torch_path::group_pool(&x, k, g),
        })
    })?;
    wrap_tensor(py, out)
}

/// Backward of group_pool: spreads grad[..., l] / g over the g inputs of group l.
#[pyfunction]
#[pyo3(signature = (grad_output, group_size, backend="auto"))]
fn group_pool_backward(
    py: Python<'_>,
    grad_output: &Bound<'_, PyAny>,
    group_size: i64,
    backend: &str,
) -> PyResult<PyObject> {
    let g = tensor_arg(grad_output, "grad_output")?;
    let be = backend;
    let out = run(py, move || {
        check_kind(&g, "grad_output", &FLOAT_KINDS)?;
        let groups = g.size().last().copied().unwrap_or(0) as usize;
        let gs = usize_arg(group_size, "group_size")?;
        if gs == 0 || groups == 0 {
            return Err(KernelError::new(
                qalora_core::ErrorKind::GroupSize,
                "group_size and the number of groups must be positive",
            ));
        }
        let lead = g.size()[..g.dim() - 1].to_vec();
        let k = groups * gs;
        Ok(match args::backend(be, g.device(), g.kind() == Kind::Float)? {
            Backend::Core => core_path::group_pool_backward(&g.to_kind(Kind::Float), &lead, k, gs)?.to_kind(g.kind()),
            Backend::Torch => torch_path::group_pool_backward(&g, &lead, k, gs),
        })
    })?;
    wrap_tensor(py, out)
}

/// offsets + scaling * (lora_B @ lora_A) / group_size, computed in f32, in offsets' dtype.
#[pyfunction]
#[pyo3(signature = (offsets, lora_a, lora_b, scaling, group_size, backend="auto"))]
fn merge_offsets(
    py: Python<'_>,
    offsets: &Bound<'_, PyAny>,
    lora_a: &Bound<'_, PyAny>,
    lora_b: &Bound<'_, PyAny>,
    scaling: f64,
    group_size: i64,
    backend: &str,
) -> PyResult<PyObject> {
    let (m, a, b) = (tensor_arg(offsets, "offsets")?, tensor_arg(lora_a, "lora_A")?, tensor_arg(lora_b, "lora_B")?);
    let be = backend;
    let out = run(py, move || {
        for (name, t) in [("offsets", &m), ("lora_A", &a), ("lora_B", &b)] {
            check_kind(t, name, &FLOAT_KINDS)?;
            check_dims(t, name, 2)?;
            non_empty(t, name)?;
        }
        let (n, groups, rank) = (m.size()[0], m.size()[1], a.size()[0]);
        check_shape(&a, "lora_A", &[rank, groups], "rank, K/group_size of offsets")?;
        check_shape(&b, "lora_B", &[n, rank], "out_features of offsets, rank of lora_A")?;
        let device = same_device(&[("offsets", &m), ("lora_A", &a), ("lora_B", &b)])?;
        if !scaling.is_finite() {
            return Err(KernelError::value(format!("scaling: got {scaling}, it must be finite")));
        }
        let g = usize_arg(group_size, "group_size")?;
        if g == 0 {
            return Err(KernelError::new(qalora_core::ErrorKind::GroupSize, "group_size: got 0, it must be positive"));
        }
        Ok(match args::backend(be, device, true)? {
            Backend::Core => core_path::merge_offsets(&m, &a, &b, scaling as f32, g)?,
            Backend::Torch => torch_path::merge_offsets(&m, &a, &b, scaling, g),
        })
    })?;
    wrap_tensor(py, out)
}

/// numpy twin of `pack` for plain uint8 arrays.
#[pyfunction]
fn pack_array<'py>(py: Python<'py>, codes: PyReadonlyArray2<'py, u8>, bits: i64) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let view = codes.as_array();
    let (n, k) = view.dim();
    let data: Vec<u8> = view.iter().copied().collect();
    let packed = run(py, move || {
        let bits = bits_arg(bits)?;
        if n * k == 0 {
            return Err(KernelError::shape(format!("codes: got an empty array of shape ({n}, {k})")));
        }
        let rb = packed_row_bytes(k, bits)?;
        let mut out = vec![0u8; n * rb];
        qalora_core::pack::pack(&data, n, k, bits, &mut out)?;
        Ok(numpy::ndarray::Array2::from_shape_vec((n, rb), out).map_err(|e| KernelError::internal(e.to_string()))?)
    })?;
    Ok(PyArray2::from_owned_array(py, packed))
}

/// numpy twin of `unpack` for plain uint8 arrays.
#[pyfunction]
fn unpack_array<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, u8>,
    bits: i64,
    k: i64,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let view = packed.as_array();
    let (n, rb) = view.dim();
    let data: Vec<u8> = view.iter().copied().collect();
    let codes = run(py, move || {
        let bits = bits_arg(bits)?;
        let k = usize_arg(k, "k")?;
        if n * k == 0 {
            return Err(KernelError::shape("packed and k must be non-empty"));
        }
        if packed_row_bytes(k, bits)? != rb {
            return Err(KernelError::shape(format!(
                "packed: got rows of {rb} bytes, K = {k} codes of {bits} bits need {}",
                packed_row_bytes(k, bits)?
            )));
        }
        let mut out = vec![0u8; n * k];
        qalora_core::pack::unpack(&data, n, k, bits, &mut out)?;
        Ok(numpy::ndarray::Array2::from_shape_vec((n, k), out).map_err(|e| KernelError::internal(e.to_string()))?)
    })?;
    Ok(PyArray2::from_owned_array(py, codes))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SUPPORTED_BITS", qalora_core::SUPPORTED_BITS.to_vec())?;
    m.add("FUSED_MAX_ROWS", core_path::FUSED_MAX_ROWS)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul_grad_input, m)?)?;
    m.add_function(wrap_pyfunction!(group_pool, m)?)?;
    m.add_function(wrap_pyfunction!(group_pool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(merge_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(pack_array, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_array, m)?)?;
    Ok(())
}
