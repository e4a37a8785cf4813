//! `qalora._core`: the Python binding of the qalora kernels. Each function parses its
//! arguments, validates them, picks the core (CPU, rayon) or the torch path (any device), and
//! runs without the GIL. The public, documented API is `qalora.ops`; these functions are its
//! engine, and `python/qalora/_core.pyi` is their typed contract (checked by stubtest).

mod args;
mod boundary;
mod core_path;
mod gptq;
mod openmp;
mod torch_path;

use pyo3::prelude::*;
use qalora_core::layout::GivenInt;
use qalora_core::layout::{
    check_bits, check_group_size, check_in_features, check_positive_group_size, code_range_error, packed_row_bytes,
    size_product,
};
use qalora_core::matmul::FUSED_MAX_ROWS;
use qalora_core::{max_code, KernelError, QuantLayout};
use tch::{Kind, Tensor};

use args::{
    activation, check_dims, check_kind, check_shape, code_dtype, dim, float_arg, int_arg, non_empty, same_device,
    Activations, Backend, BackendArg, CodeDType, IntArg, OutDType, QuantWeight, ScaleDType, FLOAT_KINDS,
};
use boundary::{contiguous, run, tensor_arg, to_py_err, wrap_tensor, KResult};

/// Fails at the first code outside [0, 2^bits - 1], naming its position and value (the
/// torch path; the core checks the range in the same pass as narrowing or packing).
fn check_code_range(codes: &Tensor, dtype: CodeDType, bits: u32) -> KResult<()> {
    let qmax = max_code(bits) as i64;
    // uint64 values above i64::MAX turn negative here: still out of range, and shown as
    // the unsigned value they were.
    let c = codes.to_kind(Kind::Int64);
    let bad = c.lt(0).logical_or(&c.gt(qmax));
    if bool::try_from(bad.any()).unwrap_or(true) {
        let pos = bad.nonzero().get(0);
        let (r, col) = (pos.int64_value(&[0]), pos.int64_value(&[1]));
        let v = c.int64_value(&[r, col]);
        let (r, col) = (r as usize, col as usize);
        return Err(match dtype {
            CodeDType::U64 => code_range_error(v as u64, r, col, bits),
            _ => code_range_error(v, r, col, bits),
        });
    }
    Ok(())
}

/// Checks that a layer with `in_features` inputs can be stored at `bits` bits in groups of
/// `group_size`; raises the error the ops would raise.
#[pyfunction]
fn check_layout(
    py: Python<'_>,
    in_features: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (k, b, g) = (int_arg(in_features, "in_features")?, int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    qalora_core::layout::check_layout(k, b, g).map(|_| ()).map_err(|e| to_py_err(py, e))
}

/// Packs integer codes (N, K) in [0, 2^bits - 1] into the canonical bitstream (N, K*bits/8) uint8.
#[pyfunction]
#[pyo3(signature = (codes, bits, backend=BackendArg::Auto))]
fn pack(py: Python<'_>, codes: &Bound<'_, PyAny>, bits: &Bound<'_, PyAny>, backend: BackendArg) -> PyResult<PyObject> {
    let codes = tensor_arg(codes, "codes")?;
    let bits = int_arg(bits, "bits")?;
    let out = run(py, move || {
        let bits = check_bits(bits)?;
        let dtype = code_dtype(&codes, "codes")?;
        check_dims(&codes, "codes", 2)?;
        non_empty(&codes, "codes")?;
        packed_row_bytes(dim(&codes, 1), bits)?;
        Ok(match backend.resolve(codes.device(), true)? {
            Backend::Core => core_path::pack_codes(&codes, dtype, bits)?,
            Backend::Torch => {
                check_code_range(&codes, dtype, bits)?;
                torch_path::pack(&codes, bits)
            }
        })
    })?;
    wrap_tensor(py, out)
}

/// Unpacks (N, K*bits/8) uint8 into (N, K) uint8 codes.
#[pyfunction]
#[pyo3(signature = (packed, bits, k, backend=BackendArg::Auto))]
fn unpack(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    backend: BackendArg,
) -> PyResult<PyObject> {
    let packed = tensor_arg(packed, "packed")?;
    let (bits, k) = (int_arg(bits, "bits")?, int_arg(k, "k")?);
    let out = run(py, move || {
        let bits = check_bits(bits)?;
        check_kind(&packed, "packed", &[Kind::Uint8])?;
        check_dims(&packed, "packed", 2)?;
        non_empty(&packed, "packed")?;
        let k = check_in_features(k)?;
        let row_bytes = packed_row_bytes(k, bits)?;
        if dim(&packed, 1) != row_bytes {
            return Err(KernelError::shape(format!(
                "packed: got rows of {} bytes, K = {k} codes of {bits} bits need {row_bytes}",
                dim(&packed, 1)
            )));
        }
        size_product("codes", &[dim(&packed, 0), k])?;
        Ok(match backend.resolve(packed.device(), true)? {
            Backend::Core => core_path::unpack_codes(&contiguous(&packed)?, bits, k)?,
            Backend::Torch => torch_path::unpack(&packed, bits, k),
        })
    })?;
    wrap_tensor(py, out)
}

/// Min-max RTN group quantization of a (N, K) weight -> (packed, scales, offsets).
#[pyfunction]
#[pyo3(signature = (weight, bits, group_size, scale_dtype=ScaleDType::F16, backend=BackendArg::Auto))]
fn quantize(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    scale_dtype: ScaleDType,
    backend: BackendArg,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let w = tensor_arg(weight, "weight")?;
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let (p, s, o) = run(py, move || {
        let bits = check_bits(bits)?;
        check_kind(&w, "weight", &FLOAT_KINDS)?;
        check_dims(&w, "weight", 2)?;
        let layout = qalora_core::QuantLayout::new(dim(&w, 0), dim(&w, 1), bits, group_size)?;
        match backend.resolve(w.device(), true)? {
            Backend::Core => core_path::quantize(&w, layout, scale_dtype.kind()),
            Backend::Torch => torch_path::quantize(&w, layout, scale_dtype.kind()),
        }
    })?;
    Ok((wrap_tensor(py, p)?, wrap_tensor(py, s)?, wrap_tensor(py, o)?))
}

/// Dense (N, K) weight s*q + m in `dtype`.
#[pyfunction]
#[pyo3(signature = (packed, scales, offsets, bits, group_size, dtype=OutDType::F32, backend=BackendArg::Auto, scale_factors=None, offset_factors=None))]
#[allow(clippy::too_many_arguments)]
fn dequantize(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    dtype: OutDType,
    backend: BackendArg,
    scale_factors: Option<&Bound<'_, PyAny>>,
    offset_factors: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let factors = factor_args(scale_factors, offset_factors)?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        let w = QuantWeight::new(p, s, o, bits, group_size, None, factors.0, factors.1)?;
        Ok(match backend.resolve(w.device, true)? {
            Backend::Core => core_path::dequantize(&w, dtype.kind())?,
            Backend::Torch => torch_path::dequantize(&w, dtype.kind()),
        })
    })?;
    wrap_tensor(py, out)
}

/// The optional factors of factored group parameters (None and Python's None alike).
fn factor_args(
    scale_factors: Option<&Bound<'_, PyAny>>,
    offset_factors: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Option<Tensor>, Option<Tensor>)> {
    let arg = |ob: Option<&Bound<'_, PyAny>>, name: &str| {
        ob.filter(|o| !o.is_none()).map(|o| tensor_arg(o, name)).transpose()
    };
    Ok((arg(scale_factors, "scale_factors")?, arg(offset_factors, "offset_factors")?))
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
#[pyo3(signature = (x, packed, scales, offsets, bits, group_size, backend=BackendArg::Auto, activations=Activations::Exact, scale_factors=None, offset_factors=None))]
#[allow(clippy::too_many_arguments)]
fn qmatmul(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
    activations: Activations,
    scale_factors: Option<&Bound<'_, PyAny>>,
    offset_factors: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let factors = factor_args(scale_factors, offset_factors)?;
    let x = tensor_arg(x, "x")?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        // in_features comes from x, so a packed buffer of the wrong width is named as such.
        let k = x.size().last().map(|&k| k as usize);
        let w = QuantWeight::new(p, s, o, bits, group_size, k, factors.0, factors.1)?;
        let (lead, x2) = matmul_operands(&x, "x", &w, true)?;
        let y = match backend.resolve(w.device, true)? {
            Backend::Core => core_path::qmatmul(&x2, &w, activations)?,
            Backend::Torch => torch_path::qmatmul(&x2, &w),
        };
        Ok(y.reshape(with_last(&lead, w.layout.n).as_slice()))
    })?;
    wrap_tensor(py, out)
}

/// grad_x = grad_output W~ for grad_output of shape (..., N): the backward of qmatmul.
#[pyfunction]
#[pyo3(signature = (grad_output, packed, scales, offsets, bits, group_size, backend=BackendArg::Auto, scale_factors=None, offset_factors=None))]
#[allow(clippy::too_many_arguments)]
fn qmatmul_grad_input(
    py: Python<'_>,
    grad_output: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
    scale_factors: Option<&Bound<'_, PyAny>>,
    offset_factors: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let factors = factor_args(scale_factors, offset_factors)?;
    let g = tensor_arg(grad_output, "grad_output")?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        let w = QuantWeight::new(p, s, o, bits, group_size, None, factors.0, factors.1)?;
        let (lead, g2) = matmul_operands(&g, "grad_output", &w, false)?;
        let gx = match backend.resolve(w.device, true)? {
            Backend::Core => core_path::qmatmul_grad_input(&g2, &w)?,
            Backend::Torch => torch_path::qmatmul_grad_input(&g2, &w),
        };
        Ok(gx.reshape(with_last(&lead, w.layout.k).as_slice()))
    })?;
    wrap_tensor(py, out)
}

/// The scales' gradient of y = x W~^T: (N, K/g), f32 (f64 when an input is f64). `grad_output` (..., N) and `x` (..., K) have the same leading dimensions.
#[pyfunction]
#[pyo3(signature = (grad_output, x, packed, scales, offsets, bits, group_size, backend=BackendArg::Auto, scale_factors=None, offset_factors=None))]
#[allow(clippy::too_many_arguments)]
fn qmatmul_grad_scales(
    py: Python<'_>,
    grad_output: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
    scale_factors: Option<&Bound<'_, PyAny>>,
    offset_factors: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let factors = factor_args(scale_factors, offset_factors)?;
    let g = tensor_arg(grad_output, "grad_output")?;
    let x = tensor_arg(x, "x")?;
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        let k = x.size().last().map(|&k| k as usize);
        let w = QuantWeight::new(p, s, o, bits, group_size, k, factors.0, factors.1)?;
        let (glead, g2) = matmul_operands(&g, "grad_output", &w, false)?;
        let (xlead, x2) = matmul_operands(&x, "x", &w, true)?;
        if glead != xlead {
            return Err(KernelError::shape(format!(
                "grad_output, x: got leading dimensions {glead:?} and {xlead:?}; they must be equal"
            )));
        }
        // float64 inputs are summed in float64 (the torch expressions), as qmatmul does.
        let wide = g2.kind() == Kind::Double || x2.kind() == Kind::Double;
        Ok(match backend.resolve(w.device, true)? {
            Backend::Core if !wide => core_path::qmatmul_grad_scales(&g2, &x2, &w)?,
            _ => torch_path::qmatmul_grad_scales(&g2, &x2, &w),
        })
    })?;
    wrap_tensor(py, out)
}

/// The leading dimensions of `t` (all but the last), their product and the last dimension,
/// which must be at least 1.
fn leading(t: &Tensor, name: &str) -> KResult<(Vec<i64>, usize, usize)> {
    let size = t.size();
    let last = match size.last() {
        Some(&last) if last > 0 => last as usize,
        _ => {
            return Err(KernelError::shape(format!(
                "{name}: got shape {size:?}, the last dimension must be at least 1"
            )))
        }
    };
    let lead = size[..size.len() - 1].to_vec();
    let dims: Vec<usize> = lead.iter().map(|&d| d as usize).collect();
    Ok((lead, size_product(name, &dims)?, last))
}

/// Mean over each contiguous group of `group_size` along the last dimension.
#[pyfunction]
#[pyo3(signature = (x, group_size, backend=BackendArg::Auto))]
fn group_pool(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
) -> PyResult<PyObject> {
    let x = tensor_arg(x, "x")?;
    let group_size = int_arg(group_size, "group_size")?;
    let out = run(py, move || {
        let kind = check_kind(&x, "x", &FLOAT_KINDS)?;
        let (lead, _, k) = leading(&x, "x")?;
        let g = check_group_size(k, None, group_size)?;
        Ok(match backend.resolve(x.device(), kind == Kind::Float)? {
            Backend::Core => core_path::group_pool(&x, &lead, k, g)?.to_kind(kind),
            Backend::Torch => torch_path::group_pool(&x, k, g),
        })
    })?;
    wrap_tensor(py, out)
}

/// Backward of group_pool: spreads grad[..., l] / g over the g inputs of group l.
#[pyfunction]
#[pyo3(signature = (grad_output, group_size, backend=BackendArg::Auto))]
fn group_pool_backward(
    py: Python<'_>,
    grad_output: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
) -> PyResult<PyObject> {
    let g = tensor_arg(grad_output, "grad_output")?;
    let group_size = int_arg(group_size, "group_size")?;
    let out = run(py, move || {
        let kind = check_kind(&g, "grad_output", &FLOAT_KINDS)?;
        let (lead, rows, groups) = leading(&g, "grad_output")?;
        let gs = check_positive_group_size(group_size)?;
        let k = size_product("grad_input", &[groups, gs])?;
        size_product("grad_input", &[rows, k])?;
        Ok(match backend.resolve(g.device(), kind == Kind::Float)? {
            Backend::Core => core_path::group_pool_backward(&g, &lead, k, gs)?.to_kind(kind),
            Backend::Torch => torch_path::group_pool_backward(&g, &lead, k, gs)?,
        })
    })?;
    wrap_tensor(py, out)
}

/// Whether the memory of `a` and `b` overlaps (CPU tensors, contiguous).
fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    let span = |t: &Tensor| {
        let start = t.data_ptr() as usize;
        (start, start + t.numel() * t.kind().elt_size_in_bytes())
    };
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a0 < b1 && b0 < a1
}

/// Checks an `out=` tensor of merge_offsets: the offsets' shape and dtype, contiguous, on
/// their device, and either the offsets themselves or clear of every input.
fn check_merge_out(out: &Tensor, m: &Tensor, a: &Tensor, b: &Tensor) -> KResult<()> {
    let kind = check_kind(out, "out", &FLOAT_KINDS)?;
    if kind != m.kind() {
        return Err(KernelError::dtype(format!(
            "out: got dtype {}, it must have the offsets' dtype {}",
            boundary::kind_name(kind),
            boundary::kind_name(m.kind())
        )));
    }
    check_shape(out, "out", &m.size(), "the offsets' shape")?;
    same_device(&[("offsets", m), ("out", out)])?;
    if !out.is_contiguous() {
        return Err(KernelError::shape("out: the tensor is not contiguous; pass a contiguous tensor"));
    }
    let same = out.data_ptr() == m.data_ptr() && m.is_contiguous();
    if out.device() == tch::Device::Cpu && !same {
        for (name, t) in [("offsets", m), ("lora_A", a), ("lora_B", b)] {
            if overlaps(out, t) {
                return Err(KernelError::value(format!(
                    "out: overlaps {name}; pass the offsets themselves (an in-place merge) or a separate tensor"
                )));
            }
        }
    }
    Ok(())
}

/// offsets + scaling * (lora_B @ lora_A) / group_size, computed in f32, in offsets' dtype;
/// into `out` when given (the offsets themselves for an in-place merge).
#[pyfunction]
#[pyo3(signature = (offsets, lora_a, lora_b, scaling, group_size, backend=BackendArg::Auto, out=None))]
#[allow(clippy::too_many_arguments)]
fn merge_offsets(
    py: Python<'_>,
    offsets: &Bound<'_, PyAny>,
    lora_a: &Bound<'_, PyAny>,
    lora_b: &Bound<'_, PyAny>,
    scaling: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    backend: BackendArg,
    out: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let (m, a, b) = (tensor_arg(offsets, "offsets")?, tensor_arg(lora_a, "lora_A")?, tensor_arg(lora_b, "lora_B")?);
    let out = out.filter(|o| !o.is_none()).map(|o| tensor_arg(o, "out")).transpose()?;
    let (scaling, group_size) = (float_arg(scaling, "scaling")?, int_arg(group_size, "group_size")?);
    let result = run(py, move || {
        for (name, t) in [("offsets", &m), ("lora_A", &a), ("lora_B", &b)] {
            check_kind(t, name, &FLOAT_KINDS)?;
            check_dims(t, name, 2)?;
            non_empty(t, name)?;
        }
        let (n, groups, rank) = (m.size()[0], m.size()[1], a.size()[0]);
        check_shape(&a, "lora_A", &[rank, groups], "rank, K/group_size of offsets")?;
        check_shape(&b, "lora_B", &[n, rank], "out_features of offsets, rank of lora_A")?;
        let device = same_device(&[("offsets", &m), ("lora_A", &a), ("lora_B", &b)])?;
        if let Some(o) = &out {
            check_merge_out(o, &m, &a, &b)?;
        }
        if !scaling.is_finite() {
            return Err(KernelError::value(format!("scaling: got {scaling}, it must be finite")));
        }
        let g = check_positive_group_size(group_size)?;
        // The core writes f16/bf16/f32 outputs itself; f64 ones go through the torch path.
        let core_out = out.as_ref().is_none_or(|o| o.kind() != Kind::Double);
        Ok(match backend.resolve(device, core_out)? {
            Backend::Core => core_path::merge_offsets(&m, &a, &b, scaling as f32, g, out.as_ref())?,
            Backend::Torch => {
                let merged = torch_path::merge_offsets(&m, &a, &b, scaling, g);
                match &out {
                    Some(o) => {
                        let mut o = o.shallow_clone();
                        o.copy_(&merged);
                        o
                    }
                    None => merged,
                }
            }
        })
    })?;
    wrap_tensor(py, result)
}

/// The tiled int8 layout (`qalora_core::matmul::tiled`) of a 4-bit weight with f16 parameters.
#[pyfunction]
fn repack_tiles(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
) -> PyResult<PyObject> {
    let (p, s, o) = (tensor_arg(packed, "packed")?, tensor_arg(scales, "scales")?, tensor_arg(offsets, "offsets")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        let w = QuantWeight::new(p, s, o, bits, group_size, None, None, None)?;
        backend_core_only(&w.packed)?;
        for (name, t) in [("scales", &w.scales), ("offsets", &w.offsets)] {
            if t.kind() != Kind::Half {
                return Err(KernelError::dtype(format!(
                    "{name}: got dtype {}, the tiled layout stores torch.float16",
                    boundary::kind_name(t.kind())
                )));
            }
        }
        core_path::repack_tiles(&w)
    })?;
    wrap_tensor(py, out)
}

/// Tiled tensors live on the CPU (the layout is the core's).
fn backend_core_only(t: &Tensor) -> KResult<()> {
    if t.device() != tch::Device::Cpu {
        return Err(KernelError::device(format!(
            "the tiled int8 layout is for CPU tensors, got a tensor on {}",
            boundary::device_name(t.device())
        )));
    }
    Ok(())
}

/// Checks a tiled weight against the layer it stands for; returns its layout.
fn tiled_layout(tiled: &Tensor, out_features: IntArg, in_features: IntArg, group_size: IntArg) -> KResult<QuantLayout> {
    check_kind(tiled, "tiled", &[Kind::Uint8])?;
    check_dims(tiled, "tiled", 1)?;
    backend_core_only(tiled)?;
    let bad = |what: &str, v: &IntArg| KernelError::shape(format!("{what}: got {v}, it must be a positive int"));
    let n = out_features.get().and_then(|v| usize::try_from(v).ok()).filter(|&v| v > 0);
    let n = n.ok_or_else(|| bad("out_features", &out_features))?;
    let k = check_in_features(in_features)?;
    let layout = QuantLayout::new(n, k, 4, group_size)?;
    if !qalora_core::matmul::tiled::supported(&layout, true) {
        return Err(KernelError::value(format!(
            "the tiled layout takes group sizes that are multiples of 32 and out_features a multiple of {}; got \
             group_size = {}, out_features = {n}",
            qalora_core::matmul::tiled::TILE_ROWS,
            layout.group_size
        )));
    }
    let want = qalora_core::matmul::tiled::tiled_len(&layout);
    if tiled.numel() != want {
        return Err(KernelError::shape(format!(
            "tiled: got {} bytes, a {n}x{k} 4-bit layer in groups of {} takes {want}",
            tiled.numel(),
            layout.group_size
        )));
    }
    Ok(layout)
}

/// The tiled layout back to (packed, scales, offsets), canonical, f16 parameters.
#[pyfunction]
fn unrepack_tiles(
    py: Python<'_>,
    tiled: &Bound<'_, PyAny>,
    out_features: &Bound<'_, PyAny>,
    in_features: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let t = tensor_arg(tiled, "tiled")?;
    let (n, k, g) = (
        int_arg(out_features, "out_features")?,
        int_arg(in_features, "in_features")?,
        int_arg(group_size, "group_size")?,
    );
    let (p, s, o) = run(py, move || {
        let layout = tiled_layout(&t, n, k, g)?;
        core_path::unrepack_tiles(&t, layout)
    })?;
    Ok((wrap_tensor(py, p)?, wrap_tensor(py, s)?, wrap_tensor(py, o)?))
}

/// y = x W~^T on a tiled layer with int8 activations, x of shape (..., K) with at most
/// `FUSED_MAX_ROWS` (16) rows in all.
#[pyfunction]
fn qmatmul_tiled(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    tiled: &Bound<'_, PyAny>,
    out_features: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
) -> PyResult<PyObject> {
    let (x, t) = (tensor_arg(x, "x")?, tensor_arg(tiled, "tiled")?);
    let (n, g) = (int_arg(out_features, "out_features")?, int_arg(group_size, "group_size")?);
    let out = run(py, move || {
        // in_features from the tiled size (N·(K/2 + 4K/g) bytes), so a wrong x is named as such.
        let (nv, gv) = (n.get().unwrap_or(0), g.get().unwrap_or(0));
        let per_k = if nv > 0 && gv > 0 { Some(nv as i128 * (gv as i128 + 8)) } else { None };
        let k = match per_k {
            Some(d) if (t.numel() as i128 * 2 * gv as i128) % d == 0 => (t.numel() as i128 * 2 * gv as i128 / d) as i64,
            _ => x.size().last().copied().unwrap_or(0),
        };
        let layout = tiled_layout(&t, n, IntArg::Fits(k), g)?;
        let (lead, m) = activation(&x, "x", layout.k, "in_features K")?;
        same_device(&[("tiled", &t), ("x", &x)])?;
        if m > FUSED_MAX_ROWS {
            return Err(KernelError::shape(format!("x: got {m} rows, the tiled route takes at most {FUSED_MAX_ROWS}")));
        }
        let y = core_path::qmatmul_tiled(&x.reshape([m as i64, layout.k as i64]), &t, layout)?;
        Ok(y.reshape(with_last(&lead, layout.n).as_slice()))
    })?;
    wrap_tensor(py, out)
}

/// Reads every byte of a uint8 CPU tensor once, on rayon's threads (a memory-bandwidth
/// probe for the benchmarks); returns a checksum (the XOR of its 64-bit words).
#[pyfunction]
fn stream_read(py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<u64> {
    let t = tensor_arg(buf, "buf")?;
    run(py, move || {
        check_kind(&t, "buf", &[Kind::Uint8])?;
        backend_core_only(&t)?;
        core_path::stream_read(&t)
    })
}

/// Adds a batch of layer inputs `x` (..., K) to a running GPTQ Hessian 2 XᵀX / n (K, K),
/// in place; returns the number of rows seen.
#[pyfunction]
fn gptq_hessian_update(
    py: Python<'_>,
    hessian: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    seen: &Bound<'_, PyAny>,
) -> PyResult<i64> {
    let (mut h, x) = (tensor_arg(hessian, "hessian")?, tensor_arg(x, "x")?);
    let seen = int_arg(seen, "seen")?;
    run(py, move || {
        check_kind(&h, "hessian", &[Kind::Float, Kind::Double])?;
        check_dims(&h, "hessian", 2)?;
        let k = h.size()[0];
        check_shape(&h, "hessian", &[k, k], "K, K")?;
        if !h.is_contiguous() {
            return Err(KernelError::shape("hessian: the tensor is not contiguous; pass hessian.contiguous()"));
        }
        activation(&x, "x", k as usize, "the Hessian's size K")?;
        same_device(&[("hessian", &h), ("x", &x)])?;
        let seen = match seen.get() {
            Some(v) if v >= 0 => v,
            _ => return Err(KernelError::value(format!("seen: got {seen}, it must be a count >= 0"))),
        };
        Ok(gptq::hessian_update(&mut h, &x, seen))
    })
}

/// GPTQ for one layer: weight (N, K) and its Hessian (K, K) -> (packed, scales, offsets, damp).
#[pyfunction]
#[pyo3(signature = (weight, hessian, bits, group_size, scale_dtype=ScaleDType::F16, damp_percent=0.01, act_order=false, block_size=None, backend=BackendArg::Auto))]
#[allow(clippy::too_many_arguments)]
fn gptq_quantize(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    hessian: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    group_size: &Bound<'_, PyAny>,
    scale_dtype: ScaleDType,
    damp_percent: f64,
    act_order: bool,
    block_size: Option<&Bound<'_, PyAny>>,
    backend: BackendArg,
) -> PyResult<(PyObject, PyObject, PyObject, f64)> {
    let (w, h) = (tensor_arg(weight, "weight")?, tensor_arg(hessian, "hessian")?);
    let (bits, group_size) = (int_arg(bits, "bits")?, int_arg(group_size, "group_size")?);
    let block_size = block_size.map(|b| int_arg(b, "block_size")).transpose()?;
    let r = run(py, move || {
        let bits = check_bits(bits)?;
        check_kind(&w, "weight", &FLOAT_KINDS)?;
        check_dims(&w, "weight", 2)?;
        check_kind(&h, "hessian", &FLOAT_KINDS)?;
        let k = w.size()[1];
        check_shape(&h, "hessian", &[k, k], "in_features of weight, twice")?;
        let device = same_device(&[("weight", &w), ("hessian", &h)])?;
        let layout = qalora_core::QuantLayout::new(dim(&w, 0), dim(&w, 1), bits, group_size)?;
        if !(damp_percent > 0.0 && damp_percent <= 1.0) {
            return Err(KernelError::value(format!("damp_percent: got {damp_percent}, it must be in (0, 1]")));
        }
        let block_size = match block_size {
            None => gptq::BLOCK_SIZE,
            Some(b) => match b.get() {
                Some(v) if v >= 1 => v as usize,
                _ => return Err(KernelError::value(format!("block_size: got {b}, it must be at least 1"))),
            },
        };
        // A float64 Hessian asks for a float64 run, which only the torch path does.
        let be = backend.resolve(device, h.kind() != Kind::Double)?;
        let opts = gptq::GptqOptions { scale_kind: scale_dtype.kind(), damp_percent, block_size, act_order };
        gptq::quantize(&w, &h, layout, opts, be)
    })?;
    Ok((wrap_tensor(py, r.packed)?, wrap_tensor(py, r.scales)?, wrap_tensor(py, r.offsets)?, r.damp))
}

/// The thread pool of the kernels' parallel loops: "openmp" (torch's own OpenMP team) or
/// "rayon" (the kernels' pool).
#[pyfunction]
fn thread_pool() -> &'static str {
    if qalora_core::parallel::has_executor() {
        "openmp"
    } else {
        "rayon"
    }
}

/// Runs the kernels' parallel loops on `pool`: "openmp" or "rayon".
#[pyfunction]
fn set_thread_pool(py: Python<'_>, pool: &str) -> PyResult<()> {
    if openmp::use_pool(pool) {
        return Ok(());
    }
    let why = if pool == "openmp" { ": this process has no OpenMP runtime (libgomp)" } else { "" };
    Err(to_py_err(py, KernelError::value(format!("pool: got {pool:?}, allowed: 'openmp', 'rayon'{why}"))))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    openmp::choose_default();
    m.add_function(wrap_pyfunction!(thread_pool, m)?)?;
    m.add_function(wrap_pyfunction!(set_thread_pool, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SUPPORTED_BITS", qalora_core::SUPPORTED_BITS.to_vec())?;
    m.add("FUSED_MAX_ROWS", FUSED_MAX_ROWS)?;
    m.add_function(wrap_pyfunction!(boundary::register_errors, m)?)?;
    m.add_function(wrap_pyfunction!(check_layout, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul_grad_input, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul_grad_scales, m)?)?;
    m.add_function(wrap_pyfunction!(group_pool, m)?)?;
    m.add_function(wrap_pyfunction!(group_pool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(merge_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(repack_tiles, m)?)?;
    m.add_function(wrap_pyfunction!(unrepack_tiles, m)?)?;
    m.add_function(wrap_pyfunction!(qmatmul_tiled, m)?)?;
    m.add_function(wrap_pyfunction!(stream_read, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_hessian_update, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_quantize, m)?)?;
    Ok(())
}
