//! The same ops as libtorch tensor expressions through tch: they run on whatever device the
//! tensors live on (CUDA), in any float dtype. Layout and rounding follow the core exactly
//! (round half to even, parameters rounded to their dtype before codes are chosen).

use qalora_core::{max_code, KernelError, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::args::QuantWeight;
use crate::boundary::{allocation_error, kind_name, KResult};

fn shifts(bits: u32, count: u32, device: Device) -> Tensor {
    Tensor::arange_start_step(0, (bits * count) as i64, bits as i64, (Kind::Int, device))
}

/// Codes per little-endian word for widths whose codes straddle bytes (3, 5, 6 bits: eight,
/// eight and four codes in 3, 5 and 3 bytes), as (codes, bytes).
fn word_of(bits: u32) -> Option<(i64, i64)> {
    match bits {
        3 | 5 => Some((8, bits as i64)),
        6 => Some((4, 3)),
        _ => None,
    }
}

/// (N, K*b/8) uint8 -> (N, K) uint8 codes.
pub fn unpack(packed: &Tensor, bits: u32, k: usize) -> Tensor {
    let n = packed.size()[0];
    let mask = max_code(bits) as i64;
    if let Some((per, bytes)) = word_of(bits) {
        // Assemble each little-endian word of `bytes` bytes (up to 40 bits: int64), then split it.
        let b = packed.view([n, -1, bytes]).to_kind(Kind::Int64);
        let word = b
            .bitwise_left_shift(&shifts(8, bytes as u32, packed.device()).to_kind(Kind::Int64))
            .sum_dim_intlist(-1, false, Kind::Int64);
        let codes = word
            .unsqueeze(-1)
            .bitwise_right_shift(&shifts(bits, per as u32, packed.device()).to_kind(Kind::Int64))
            .bitwise_and(mask);
        return codes.reshape([n, k as i64]).to_kind(Kind::Uint8);
    }
    match bits {
        8 => packed.copy(),
        _ => {
            let per = 8 / bits;
            let codes = packed
                .to_kind(Kind::Int)
                .unsqueeze(-1)
                .bitwise_right_shift(&shifts(bits, per, packed.device()))
                .bitwise_and(mask);
            codes.reshape([n, k as i64]).to_kind(Kind::Uint8)
        }
    }
}

/// (N, K) codes (already range-checked) -> (N, K*b/8) uint8.
pub fn pack(codes: &Tensor, bits: u32) -> Tensor {
    let (n, k) = (codes.size()[0], codes.size()[1]);
    let c = codes.to_kind(Kind::Int);
    if let Some((per, bytes)) = word_of(bits) {
        let word = c
            .to_kind(Kind::Int64)
            .view([n, k / per, per])
            .bitwise_left_shift(&shifts(bits, per as u32, codes.device()).to_kind(Kind::Int64))
            .sum_dim_intlist(-1, false, Kind::Int64);
        let parts = word
            .unsqueeze(-1)
            .bitwise_right_shift(&shifts(8, bytes as u32, codes.device()).to_kind(Kind::Int64))
            .bitwise_and(255);
        return parts.reshape([n, k * bits as i64 / 8]).to_kind(Kind::Uint8);
    }
    match bits {
        8 => c.to_kind(Kind::Uint8),
        _ => {
            let per = (8 / bits) as i64;
            c.view([n, k / per, per])
                .bitwise_left_shift(&shifts(bits, per as u32, codes.device()))
                .sum_dim_intlist(-1, false, Kind::Int)
                .to_kind(Kind::Uint8)
        }
    }
}

pub fn quantize(w: &Tensor, layout: QuantLayout, scale_kind: Kind) -> KResult<(Tensor, Tensor, Tensor)> {
    let (n, groups, g) = (layout.n as i64, layout.groups() as i64, layout.group_size as i64);
    let wf = w.to_kind(Kind::Float);
    if !bool::try_from(wf.isfinite().all()).unwrap_or(false) {
        let bad = wf.isfinite().logical_not().nonzero().get(0);
        let (r, c) = (bad.int64_value(&[0]), bad.int64_value(&[1]));
        return Err(KernelError::value(format!(
            "weight: value at row {r}, column {c} is not finite; quantization needs finite weights"
        )));
    }
    let wg = wf.view([n, groups, g]);
    let lo = wg.amin(-1, false);
    let hi = wg.amax(-1, false);
    let qmax = max_code(layout.bits) as f64;
    let offsets = lo.to_kind(scale_kind).to_kind(Kind::Float);
    let scales = ((&hi - &lo) / qmax).to_kind(scale_kind).to_kind(Kind::Float);
    if !bool::try_from(scales.isfinite().all().logical_and(&offsets.isfinite().all())).unwrap_or(false) {
        return Err(KernelError::value(
            "weight: a group spans a range that overflows the scale dtype; use scale_dtype=torch.float32",
        ));
    }
    let s3 = scales.unsqueeze(-1);
    let positive = s3.gt(0.0);
    let safe = s3.where_self(&positive, &s3.ones_like());
    let q = ((&wg - offsets.unsqueeze(-1)) / &safe).round().clamp(0.0, qmax);
    let q = q.where_self(&positive, &q.zeros_like());
    let packed = pack(&q.view([n, -1]).to_kind(Kind::Uint8), layout.bits);
    Ok((packed, scales.to_kind(scale_kind), offsets.to_kind(scale_kind)))
}

/// Dense (N, K) weight in `kind`, computed in f32.
pub fn dequantize(w: &QuantWeight, kind: Kind) -> Tensor {
    let l = w.layout;
    let codes = unpack(&w.packed, l.bits, l.k).to_kind(Kind::Float);
    let (s, o) = w.params_f32();
    // o + codes·s as one addcmul: one rounding where the device fuses it (the core's FMA).
    let codes = codes.view([l.n as i64, l.groups() as i64, l.group_size as i64]);
    let dense = o.unsqueeze(-1).addcmul(&codes, &s.unsqueeze(-1));
    dense.view([l.n as i64, l.k as i64]).to_kind(kind)
}

/// Kind the matmul runs in: the activation's, except f16/bf16 on CPU, which run in f32
/// (this CPU has no fast half-precision GEMM).
fn compute_kind(kind: Kind, device: Device) -> Kind {
    if device == Device::Cpu && matches!(kind, Kind::Half | Kind::BFloat16) {
        Kind::Float
    } else {
        kind
    }
}

pub fn qmatmul(x2: &Tensor, w: &QuantWeight) -> Tensor {
    let ck = compute_kind(x2.kind(), w.device);
    x2.to_kind(ck).matmul(&dequantize(w, ck).tr()).to_kind(x2.kind())
}

pub fn qmatmul_grad_input(g2: &Tensor, w: &QuantWeight) -> Tensor {
    let ck = compute_kind(g2.kind(), w.device);
    g2.to_kind(ck).matmul(&dequantize(w, ck)).to_kind(g2.kind())
}

/// The scales' gradient of y = x W~^T: the group sums of codes * (grad^T x), in f32 (f64
/// for f64 inputs).
pub fn qmatmul_grad_scales(g2: &Tensor, x2: &Tensor, w: &QuantWeight) -> Tensor {
    let l = w.layout;
    let ck = if g2.kind() == Kind::Double || x2.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let codes = unpack(&w.packed, l.bits, l.k).to_kind(ck);
    let prod = g2.to_kind(ck).tr().matmul(&x2.to_kind(ck));
    (codes * prod).view([l.n as i64, l.groups() as i64, l.group_size as i64]).sum_dim_intlist(-1, false, ck)
}

pub fn group_pool(x: &Tensor, k: usize, g: usize) -> Tensor {
    x.unflatten(-1, [(k / g) as i64, g as i64]).mean_dim(-1, false, x.kind())
}

/// The only op whose output size a caller's integer (the group size) multiplies, so its
/// allocation can fail for a legal call: reported as a typed error.
pub fn group_pool_backward(grad: &Tensor, lead: &[i64], k: usize, g: usize) -> KResult<Tensor> {
    let mut expanded = grad.size();
    expanded.push(g as i64);
    let mut shape = lead.to_vec();
    shape.push(k as i64);
    // Divide the small gradient, then spread it: the reshape of the expanded view is the
    // one full-size allocation.
    (grad / g as f64)
        .unsqueeze(-1)
        .expand(expanded.as_slice(), false)
        .f_reshape(shape.as_slice())
        .map_err(|e| allocation_error(&shape, kind_name(grad.kind()), e))
}

pub fn merge_offsets(offsets: &Tensor, lora_a: &Tensor, lora_b: &Tensor, scaling: f64, g: usize) -> Tensor {
    let delta = lora_b.to_kind(Kind::Float).matmul(&lora_a.to_kind(Kind::Float));
    (offsets.to_kind(Kind::Float) + delta * (scaling / g as f64)).to_kind(offsets.kind())
}
