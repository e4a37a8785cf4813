//! GPTQ (Frantar et al., 2022) for one layer: the Hessian, its dampening and the Cholesky
//! factor of its inverse, and the lazy block updates are libtorch operations (CPU or CUDA
//! tensors). The column loop inside each block runs in the tch-free core for float32 CPU
//! work (one tensor operation per column costs more than its arithmetic on a CPU) and as
//! tensor operations otherwise; both give the same bits. See docs/design.md §1.
//!
//! Columns go left to right, or by decreasing Hessian diagonal with act-order. Row i of the
//! upper Cholesky factor U of H⁻¹ carries column i's rounding error to the later columns:
//! e = (w_i − ŵ_i) / U_ii, w_j −= e · U_ij. Inside a block the updates go to the block's
//! columns at once; the rest of the matrix gets them as one product when the block ends.
//! Group parameters are RTN's, rounded to their storage dtype before codes are chosen:
//! computed from the current weights when a group's first column comes up (blocks hold
//! whole groups, so those weights are up to date), or, with act-order, from the unquantized
//! weights before anything moves (static groups: groups stay contiguous).

use qalora_core::gptq::{quantize_block, Block, BlockShape, Params};
use qalora_core::quant::group_params as core_group_params;
use qalora_core::{max_code, KernelError, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::args::Backend;
use crate::boundary::{dense, KResult};
use crate::core_path::param_dtype;
use crate::torch_path;

/// Columns per block of lazy updates unless the caller says otherwise.
pub const BLOCK_SIZE: usize = 128;

/// Settings of one run.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    pub scale_kind: Kind,
    /// Fraction of the mean Hessian diagonal added to the diagonal.
    pub damp_percent: f64,
    /// Columns per block of lazy updates (rounded down to a multiple of the group size, at
    /// least one group, without act-order).
    pub block_size: usize,
    pub act_order: bool,
}

/// The canonical layout and the dampening that was used.
pub struct GptqResult {
    pub packed: Tensor,
    pub scales: Tensor,
    pub offsets: Tensor,
    pub damp: f64,
}

/// Adds the rows of `x` (..., K) to the running Hessian 2 XᵀX / n (K, K), in place, and
/// returns the number of rows seen. The running mean keeps the sums' magnitude fixed.
pub fn hessian_update(hessian: &mut Tensor, x: &Tensor, seen: i64) -> i64 {
    let k = hessian.size()[0];
    let rows = x.reshape([-1, k]).to_kind(hessian.kind());
    let m = rows.size()[0];
    if m == 0 {
        return seen;
    }
    let total = (seen + m) as f64;
    let _ = hessian.g_mul_scalar_(seen as f64 / total);
    let rows = rows * (2.0 / total).sqrt();
    let _ = hessian.addmm_(&rows.tr(), &rows);
    seen + m
}

/// Upper Cholesky factor of the inverse of `h` + `damp` × mean diagonal, or None if either
/// factorization fails in the working precision.
fn inverse_cholesky(h: &Tensor, damp: f64, mean_diag: f64) -> Option<Tensor> {
    let hd = h.copy();
    let _ = hd.diagonal(0, 0, 1).g_add_scalar_(damp * mean_diag);
    let (l, info) = hd.linalg_cholesky_ex(false, false);
    if info.int64_value(&[]) != 0 {
        return None;
    }
    let (u, info) = l.cholesky_inverse(false).linalg_cholesky_ex(true, false);
    (info.int64_value(&[]) == 0).then_some(u)
}

/// Min-max parameters of `cols` (R, g) per row, rounded to the storage kind (through f32,
/// as the core does), in `kind`: (scales, offsets).
fn group_params(cols: &Tensor, qmax: f64, scale_kind: Kind, kind: Kind) -> (Tensor, Tensor) {
    let lo = cols.amin([1i64].as_slice(), false);
    let hi = cols.amax([1i64].as_slice(), false);
    let round = |t: Tensor| t.to_kind(Kind::Float).to_kind(scale_kind).to_kind(kind);
    (round((&hi - &lo) / qmax), round(lo))
}

/// A tensor's elements in a Vec (the core's working copy).
fn to_vec<T: tch::kind::Element + Default + Clone>(t: &Tensor) -> KResult<Vec<T>> {
    let t = dense(t, T::KIND)?;
    let mut v = vec![T::default(); t.numel()];
    t.copy_data(&mut v, t.numel());
    Ok(v)
}

/// Group parameters and codes while the column loop runs: plain memory for the core, tensors
/// on the weight's device for the torch path.
enum State {
    Core { scales: Vec<f32>, offsets: Vec<f32>, codes: Vec<u8> },
    Torch { scales: Tensor, offsets: Tensor, codes: Tensor },
}

/// GPTQ for `w` (N, K) with Hessian `h` (K, K) on the same device. Runs in float64 when `h`
/// is float64 (the torch path), else in float32.
pub fn quantize(
    w: &Tensor,
    h: &Tensor,
    layout: QuantLayout,
    opts: GptqOptions,
    backend: Backend,
) -> KResult<GptqResult> {
    let kind = if h.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let (n, k, g) = (layout.n as i64, layout.k as i64, layout.group_size as i64);
    let groups = layout.groups() as i64;
    let qmax = max_code(layout.bits) as f64;
    let mut w = dense(w, kind)?.copy();
    let mut h = dense(h, kind)?.copy();
    if !bool::try_from(w.isfinite().all()).unwrap_or(false) {
        return Err(KernelError::value("weight: holds values that are not finite"));
    }
    if !bool::try_from(h.isfinite().all()).unwrap_or(false) {
        return Err(KernelError::value("hessian: holds values that are not finite (were the layer's inputs finite?)"));
    }
    let device = w.device();
    let mut state = match backend {
        Backend::Core => {
            let (mut scales, mut offsets) = (vec![0f32; (n * groups) as usize], vec![0f32; (n * groups) as usize]);
            if opts.act_order {
                let wv = to_vec::<f32>(&w)?;
                for ((grp, s), m) in wv.chunks(g as usize).zip(scales.iter_mut()).zip(offsets.iter_mut()) {
                    (*s, *m) = core_group_params(grp, layout.bits, param_dtype(opts.scale_kind));
                }
            }
            State::Core { scales, offsets, codes: vec![0u8; (n * k) as usize] }
        }
        Backend::Torch => {
            let (scales, offsets) = if opts.act_order {
                let (s, m) = group_params(&w.view([n * groups, g]), qmax, opts.scale_kind, kind);
                (s.view([n, groups]), m.view([n, groups]))
            } else {
                (Tensor::zeros([n, groups], (kind, device)), Tensor::zeros([n, groups], (kind, device)))
            };
            State::Torch { scales, offsets, codes: Tensor::zeros([n, k], (Kind::Uint8, device)) }
        }
    };
    // A dead input (always zero on the calibration data) has a zero row and column: a unit
    // diagonal makes the matrix invertible, and the column then takes and gives no update,
    // keeping its weight, rounded to nearest.
    {
        let mut diag = h.diagonal(0, 0, 1);
        let dead = diag.eq(0.0);
        let _ = diag.masked_fill_(&dead, 1.0);
    }
    let perm = opts.act_order.then(|| h.diagonal(0, 0, 1).argsort_stable(true, 0, true));
    if let Some(p) = &perm {
        w = w.index_select(1, p);
        h = h.index_select(0, p).index_select(1, p);
    }
    let mean_diag = h.diagonal(0, 0, 1).mean(kind).double_value(&[]);
    let mut damp = opts.damp_percent;
    let mut factor = None;
    for _ in 0..4 {
        factor = inverse_cholesky(&h, damp, mean_diag);
        if factor.is_some() {
            break;
        }
        damp *= 10.0;
    }
    let u = factor.ok_or_else(|| {
        KernelError::value(format!("hessian: not positive definite even with a dampening of {:e}", damp / 10.0))
    })?;
    drop(h);
    // Group and original column of each column in processing order.
    let order: Vec<i64> = match &perm {
        Some(p) => to_vec::<i64>(&p.to_device(Device::Cpu))?,
        None => (0..k).collect(),
    };
    let group_of: Vec<usize> = order.iter().map(|&c| (c / g) as usize).collect();
    let block = if opts.act_order { opts.block_size.max(1) as i64 } else { (opts.block_size as i64 / g * g).max(g) };
    let params = if opts.act_order { Params::Given } else { Params::AtGroupStart };
    let mut i1 = 0;
    while i1 < k {
        let i2 = (i1 + block).min(k);
        let b = i2 - i1;
        let u1 = u.narrow(0, i1, b).narrow(1, i1, b);
        let cols = &group_of[i1 as usize..i2 as usize];
        let err = match &mut state {
            State::Core { scales, offsets, codes } => {
                let (mut w1, u1) = (to_vec::<f32>(&w.narrow(1, i1, b))?, to_vec::<f32>(&u1)?);
                let (mut err, mut block_codes) = (vec![0f32; (n * b) as usize], vec![0u8; (n * b) as usize]);
                let shape = BlockShape {
                    n: n as usize,
                    b: b as usize,
                    groups: groups as usize,
                    group_size: g as usize,
                    bits: layout.bits,
                    dtype: param_dtype(opts.scale_kind),
                    params,
                };
                let blk = Block {
                    w: &mut w1,
                    u: &u1,
                    err: &mut err,
                    codes: &mut block_codes,
                    scales,
                    offsets,
                    group_of: cols,
                };
                quantize_block(blk, shape)?;
                for (row, src) in codes.chunks_mut(k as usize).zip(block_codes.chunks(b as usize)) {
                    row[i1 as usize..i2 as usize].copy_from_slice(src);
                }
                Tensor::from_slice(&err).view([n, b])
            }
            State::Torch { scales, offsets, codes } => torch_block(
                &w.narrow(1, i1, b),
                &u1,
                scales,
                offsets,
                &codes.narrow(1, i1, b),
                cols,
                g,
                opts,
                params,
                qmax,
            ),
        };
        if i2 < k {
            let _ = w.narrow(1, i2, k - i2).addmm_(&(-err), &u.narrow(0, i1, b).narrow(1, i2, k - i2));
        }
        i1 = i2;
    }
    let (codes, scales, offsets) = match state {
        State::Core { scales, offsets, codes } => (
            Tensor::from_slice(&codes).view([n, k]),
            Tensor::from_slice(&scales).view([n, groups]),
            Tensor::from_slice(&offsets).view([n, groups]),
        ),
        State::Torch { scales, offsets, codes } => (codes, scales, offsets),
    };
    let codes = match &perm {
        // Codes were produced in processing order; put each back in its column.
        Some(p) => codes.index_select(1, &p.argsort_stable(true, 0, false)),
        None => codes,
    };
    let (scales, offsets) = (scales.to_kind(opts.scale_kind), offsets.to_kind(opts.scale_kind));
    if !bool::try_from(scales.isfinite().all().logical_and(&offsets.isfinite().all())).unwrap_or(false) {
        return Err(KernelError::value(
            "weight: a group spans a range that overflows the scale dtype; use scale_dtype=torch.float32",
        ));
    }
    let packed = torch_path::pack(&codes, layout.bits);
    Ok(GptqResult { packed, scales, offsets, damp })
}

/// One block's column loop as tensor operations (any device, float32 or float64): the same
/// arithmetic, in the same order, as the core's. Returns the block's scaled errors (N, B).
#[allow(clippy::too_many_arguments)]
fn torch_block(
    w1: &Tensor,
    u1: &Tensor,
    scales: &Tensor,
    offsets: &Tensor,
    codes: &Tensor,
    group_of: &[usize],
    g: i64,
    opts: GptqOptions,
    params: Params,
    qmax: f64,
) -> Tensor {
    let (n, b) = (w1.size()[0], w1.size()[1]);
    let kind = w1.kind();
    let w1 = w1.copy();
    let err = Tensor::zeros([n, b], (kind, w1.device()));
    let d = u1.diagonal(0, 0, 1);
    for i in 0..b {
        let l = group_of[i as usize] as i64;
        if params == Params::AtGroupStart && i % g == 0 {
            let (s, m) = group_params(&w1.narrow(1, i, g), qmax, opts.scale_kind, kind);
            scales.select(1, l).copy_(&s);
            offsets.select(1, l).copy_(&m);
        }
        let (s, m) = (scales.select(1, l), offsets.select(1, l));
        let positive = s.gt(0.0);
        let safe = s.where_self(&positive, &s.ones_like());
        let wcol = w1.select(1, i);
        let q = ((&wcol - &m) / &safe).round().clamp(0.0, qmax) * positive.to_kind(kind);
        codes.select(1, i).copy_(&q);
        let e = (&wcol - (&s * &q + &m)) / d.select(0, i);
        let _ = w1.narrow(1, i, b - i).addr_(&(-&e), &u1.select(0, i).narrow(0, i, b - i));
        err.select(1, i).copy_(&e);
    }
    err
}
