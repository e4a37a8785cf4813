//! Argument checks shared by every op, run before any raw memory is touched.

use qalora_core::{check_bits, KernelError, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::boundary::{device_name, kind_name, KResult};

pub const FLOAT_KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double];
pub const PARAM_KINDS: [Kind; 3] = [Kind::Half, Kind::BFloat16, Kind::Float];

/// Which implementation runs an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The tch-free Rust core (CPU tensors).
    Core,
    /// libtorch ops through tch: any device (CUDA), any float dtype.
    Torch,
}

/// Resolves the `backend` argument: "auto" picks the core for CPU tensors of a dtype it
/// takes, the torch path otherwise.
pub fn backend(name: &str, device: Device, core_takes_it: bool) -> KResult<Backend> {
    match name {
        "auto" => Ok(if device == Device::Cpu && core_takes_it { Backend::Core } else { Backend::Torch }),
        "torch" => Ok(Backend::Torch),
        "core" if device != Device::Cpu => Err(KernelError::device(format!(
            "backend='core' runs on CPU tensors only, got tensors on {}",
            device_name(device)
        ))),
        "core" if !core_takes_it => Err(KernelError::dtype(
            "backend='core' takes float32 inputs for this op; use backend='auto' or 'torch' for other dtypes",
        )),
        "core" => Ok(Backend::Core),
        other => Err(KernelError::value(format!("backend: got {other:?}, allowed: 'auto', 'core', 'torch'"))),
    }
}

/// How a small-M CPU qmatmul treats its activations (see `qalora_core::q8`).
pub fn int8_activations(name: &str) -> KResult<bool> {
    match name {
        "exact" => Ok(false),
        "int8" => Ok(true),
        other => Err(KernelError::value(format!("activations: got '{other}', allowed: 'exact', 'int8'"))),
    }
}

pub fn check_kind(t: &Tensor, name: &str, allowed: &[Kind]) -> KResult<()> {
    if allowed.contains(&t.kind()) {
        Ok(())
    } else {
        Err(KernelError::dtype(format!(
            "{name}: got dtype {}, allowed: {}",
            kind_name(t.kind()),
            allowed.iter().map(|k| kind_name(*k)).collect::<Vec<_>>().join(", ")
        )))
    }
}

pub fn check_dims(t: &Tensor, name: &str, dims: usize) -> KResult<()> {
    if t.dim() == dims {
        Ok(())
    } else {
        Err(KernelError::shape(format!("{name}: got shape {:?}, expected a {dims}-D tensor", t.size())))
    }
}

pub fn check_shape(t: &Tensor, name: &str, want: &[i64], meaning: &str) -> KResult<()> {
    if t.size() == want {
        Ok(())
    } else {
        Err(KernelError::shape(format!("{name}: got shape {:?}, expected {want:?} ({meaning})", t.size())))
    }
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

pub fn usize_arg(v: i64, name: &str) -> KResult<usize> {
    usize::try_from(v).map_err(|_| KernelError::value(format!("{name}: got {v}, it must be >= 0")))
}

/// A frozen quantized weight as the ops receive it: packed codes (N, K*b/8) uint8 and
/// scales/offsets (N, K/g).
pub struct QuantWeight {
    pub packed: Tensor,
    pub scales: Tensor,
    pub offsets: Tensor,
    pub layout: QuantLayout,
    pub device: Device,
}

impl QuantWeight {
    /// Validates the three buffers. `k` is the in_features the caller expects, if it knows.
    pub fn new(
        packed: Tensor,
        scales: Tensor,
        offsets: Tensor,
        bits: i64,
        group_size: i64,
        k: Option<usize>,
    ) -> KResult<Self> {
        let bits = u32::try_from(bits).unwrap_or(0);
        check_bits(bits).map_err(|_| {
            KernelError::new(
                qalora_core::ErrorKind::Bits,
                format!("bits: got {bits}, allowed values are 2, 3, 4 and 8"),
            )
        })?;
        let group_size = usize_arg(group_size, "group_size")?;
        check_kind(&packed, "packed", &[Kind::Uint8])?;
        check_dims(&packed, "packed", 2)?;
        if !packed.is_contiguous() {
            return Err(KernelError::shape("packed: the tensor is not contiguous; pass packed.contiguous()"));
        }
        let (n, row_bytes) = (packed.size()[0] as usize, packed.size()[1] as usize);
        let k = match k {
            Some(k) => {
                if k * bits as usize != row_bytes * 8 {
                    return Err(KernelError::shape(format!(
                        "x: last dimension K = {k} does not match the quantized weight: packed rows of {row_bytes} bytes hold {} codes of {bits} bits",
                        row_bytes as f64 * 8.0 / bits as f64
                    )));
                }
                k
            }
            None => {
                if (row_bytes * 8) % bits as usize != 0 {
                    return Err(KernelError::shape(format!(
                        "packed: rows of {row_bytes} bytes are not a whole number of {bits}-bit codes"
                    )));
                }
                row_bytes * 8 / bits as usize
            }
        };
        let layout = QuantLayout::new(n, k, bits, group_size)?;
        let want = [n as i64, layout.groups() as i64];
        for (name, t) in [("scales", &scales), ("offsets", &offsets)] {
            check_kind(t, name, &PARAM_KINDS)?;
            check_shape(t, name, &want, "N, K/group_size")?;
        }
        let device = same_device(&[("packed", &packed), ("scales", &scales), ("offsets", &offsets)])?;
        Ok(Self { packed, scales, offsets, layout, device })
    }

    /// Scales and offsets as contiguous f32 tensors (small: N*K/g values).
    pub fn params_f32(&self) -> (Tensor, Tensor) {
        (self.scales.to_kind(Kind::Float).contiguous(), self.offsets.to_kind(Kind::Float).contiguous())
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
    let m = lead.iter().product::<i64>() as usize;
    Ok((lead, m))
}
