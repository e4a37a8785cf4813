//! Ops on CPU tensors through the tch-free Rust core (rayon inside).

use qalora_core::{merge, pack, pool, q8, qmatmul, quant, GroupParams, Isa, ParamDtype, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::args::{CodeDType, QuantWeight};
use crate::boundary::{allocation_error, contiguous, dense, kind_name, slice, Fresh, KResult, Plain};

/// Below or at this many activation rows the fused kernel wins; above it, dequantizing a
/// tile and calling torch's GEMM does.
const FUSED_MAX_ROWS: usize = 16;
/// Elements of one dequantized tile (16 MiB of f32; fewer, larger GEMM calls measured
/// better than 8 MiB tiles, larger did not help): bounds the transient memory of the
/// large-M path to a small fraction of one dense copy of a large layer.
const TILE_ELEMS: usize = 4 << 20;

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

/// Narrows integer codes to bytes, checking the range in the same pass.
fn narrow<T: pack::WideCode + Plain>(codes: &Tensor, k: usize, bits: u32, dst: &mut [u8]) -> KResult<()> {
    pack::narrow_codes(slice::<T>(codes), k, bits, dst)
}

/// Packs (N, K) codes of any integer dtype. Uint8 goes straight to the kernel (which checks
/// the range as it packs); wider dtypes are narrowed with a range check first, in one pass,
/// instead of torch's cast-to-int64-and-compare (several full-size temporaries).
pub fn pack_codes(codes: &Tensor, dtype: CodeDType, bits: u32) -> KResult<Tensor> {
    let (n, k) = (codes.size()[0] as usize, codes.size()[1] as usize);
    let row_bytes = qalora_core::packed_row_bytes(k, bits)?;
    let c = contiguous(codes)?;
    let narrowed;
    let bytes: &[u8] = if dtype == CodeDType::U8 {
        slice(&c)
    } else {
        let mut buf = Fresh::empty(&[n as i64, k as i64], Kind::Uint8)?;
        let dst = buf.data_mut::<u8>();
        match dtype {
            CodeDType::I8 => narrow::<i8>(&c, k, bits, dst)?,
            CodeDType::I16 => narrow::<i16>(&c, k, bits, dst)?,
            CodeDType::I32 => narrow::<i32>(&c, k, bits, dst)?,
            CodeDType::I64 => narrow::<i64>(&c, k, bits, dst)?,
            CodeDType::U16 => narrow::<u16>(&c, k, bits, dst)?,
            CodeDType::U32 => narrow::<u32>(&c, k, bits, dst)?,
            CodeDType::U64 => narrow::<u64>(&c, k, bits, dst)?,
            CodeDType::U8 => unreachable!("uint8 codes are packed as they are"),
        }
        narrowed = buf.into_tensor();
        slice(&narrowed)
    };
    let mut out = Fresh::empty(&[n as i64, row_bytes as i64], Kind::Uint8)?;
    pack::pack(bytes, n, k, bits, out.data_mut())?;
    Ok(out.into_tensor())
}

pub fn unpack_codes(packed: &Tensor, bits: u32, k: usize) -> KResult<Tensor> {
    let n = packed.size()[0] as usize;
    let mut out = Fresh::empty(&[n as i64, k as i64], Kind::Uint8)?;
    pack::unpack(slice(packed), n, k, bits, out.data_mut())?;
    Ok(out.into_tensor())
}

pub fn param_dtype(kind: Kind) -> ParamDtype {
    match kind {
        Kind::Half => ParamDtype::F16,
        Kind::BFloat16 => ParamDtype::BF16,
        _ => ParamDtype::F32,
    }
}

pub fn quantize(w: &Tensor, layout: QuantLayout, scale_kind: Kind) -> KResult<(Tensor, Tensor, Tensor)> {
    let w = dense(w, Kind::Float)?;
    let mut packed = Fresh::empty(&[layout.n as i64, layout.row_bytes() as i64], Kind::Uint8)?;
    let shape = [layout.n as i64, layout.groups() as i64];
    let (mut scales, mut offsets) = (Fresh::empty(&shape, Kind::Float)?, Fresh::empty(&shape, Kind::Float)?);
    quant::quantize(
        slice(&w),
        layout,
        param_dtype(scale_kind),
        packed.data_mut(),
        scales.data_mut(),
        offsets.data_mut(),
    )?;
    // Values are already rounded to `scale_kind`, so this cast is exact.
    let (scales, offsets) = (scales.into_tensor(), offsets.into_tensor());
    Ok((packed.into_tensor(), scales.to_kind(scale_kind), offsets.to_kind(scale_kind)))
}

pub fn dequantize(w: &QuantWeight, kind: Kind) -> KResult<Tensor> {
    let (s, o) = w.params_f32();
    let mut out = Fresh::empty(&[w.layout.n as i64, w.layout.k as i64], Kind::Float)?;
    quant::dequantize(slice(&w.packed), slice(&s), slice(&o), w.layout, out.data_mut())?;
    let out = out.into_tensor();
    Ok(if kind == Kind::Float { out } else { out.to_kind(kind) })
}

fn tile_rows(layout: QuantLayout) -> usize {
    (TILE_ELEMS / layout.k).clamp(1, layout.n)
}

/// Calls `f(row0, tile)` for consecutive row tiles of the dequantized weight, reusing one
/// buffer, in `kind` (f32 or f64).
///
/// Tiles are dequantized on the calling thread (SIMD, a few ms per 16M weights) rather than
/// on rayon's pool: right after a torch GEMM, torch's OpenMP threads still spin on both
/// cores, and waking rayon workers against them was measured to cost more than the work.
fn for_each_tile(w: &QuantWeight, kind: Kind, mut f: impl FnMut(usize, &Tensor)) -> KResult<()> {
    let (s, o) = w.params_f32();
    let (n, k) = (w.layout.n, w.layout.k);
    let rows = tile_rows(w.layout);
    let mut buf = Fresh::empty(&[rows as i64, k as i64], Kind::Float)?;
    let (packed, sf, of) = (slice::<u8>(&w.packed), slice::<f32>(&s), slice::<f32>(&o));
    let mut codes = vec![0u8; k];
    let mut row0 = 0;
    while row0 < n {
        let r = rows.min(n - row0);
        for (i, out_row) in buf.data_mut::<f32>()[..r * k].chunks_exact_mut(k).enumerate() {
            quant::dequantize_row(packed, sf, of, w.layout, row0 + i, &mut codes, out_row);
        }
        buf.with_rows(r, |tile| {
            if kind == Kind::Float {
                f(row0, tile);
            } else {
                f(row0, &tile.to_kind(kind));
            }
        });
        row0 += r;
    }
    Ok(())
}

/// y = x W~^T for x of shape (M, K) (any float kind); returns (M, N) in x's kind. With
/// `int8`, small-M calls quantize the activations to int8 per block of 32 (`qalora_core::q8`);
/// large-M calls are exact either way.
pub fn qmatmul(x2: &Tensor, w: &QuantWeight, int8: bool) -> KResult<Tensor> {
    let (m, n) = (x2.size()[0] as usize, w.layout.n);
    let out_kind = x2.kind();
    if m == 0 {
        return Ok(Tensor::zeros([0, n as i64], cpu(out_kind)));
    }
    if out_kind != Kind::Double && m <= FUSED_MAX_ROWS {
        let xf = dense(x2, Kind::Float)?;
        let mut out = Fresh::empty(&[m as i64, n as i64], Kind::Float)?;
        let (xs, pk, os) = (slice(&xf), slice(&w.packed), out.data_mut());
        let fused = if int8 { q8::qmatmul_int8_with } else { qmatmul::qmatmul_with };
        let fused = |x, m, p, params, l, o| fused(x, m, p, params, l, o, Isa::detect());
        if w.scales.kind() == Kind::Half && w.offsets.kind() == Kind::Half {
            // The default dtype goes to the kernel as raw f16 bits, converted per row in
            // registers: no extra pass over N*K/g parameters per call.
            let (s, o) = (w.scales.contiguous(), w.offsets.contiguous());
            let params = GroupParams::F16 { scales: slice(&s), offsets: slice(&o) };
            fused(xs, m, pk, params, w.layout, os)?;
        } else {
            let (s, o) = w.params_f32();
            let params = GroupParams::F32 { scales: slice(&s), offsets: slice(&o) };
            fused(xs, m, pk, params, w.layout, os)?;
        }
        return Ok(out.into_tensor().to_kind(out_kind));
    }
    // Large M: one dequantized tile at a time through torch's GEMM, written into a
    // transposed output whose row blocks are contiguous.
    let ck = if out_kind == Kind::Double { Kind::Double } else { Kind::Float };
    let xc = dense(x2, ck)?;
    let xt = xc.tr();
    let out_t = Tensor::f_empty([n as i64, m as i64], cpu(ck))
        .map_err(|e| allocation_error(&[n as i64, m as i64], kind_name(ck), e))?;
    for_each_tile(w, ck, |row0, tile| {
        let dst = out_t.narrow(0, row0 as i64, tile.size()[0]);
        let _ = tile.mm_out(&dst, &xt);
    })?;
    Ok(out_t.tr().contiguous().to_kind(out_kind))
}

/// grad_x = grad W~ for grad of shape (M, N); returns (M, K) in grad's kind.
pub fn qmatmul_grad_input(g2: &Tensor, w: &QuantWeight) -> KResult<Tensor> {
    let (m, k) = (g2.size()[0], w.layout.k as i64);
    let out_kind = g2.kind();
    let ck = if out_kind == Kind::Double { Kind::Double } else { Kind::Float };
    let gc = dense(g2, ck)?;
    let mut gx = Tensor::f_zeros([m, k], cpu(ck)).map_err(|e| allocation_error(&[m, k], kind_name(ck), e))?;
    if m == 0 {
        return Ok(gx.to_kind(out_kind));
    }
    for_each_tile(w, ck, |row0, tile| {
        let part = gc.narrow(1, row0 as i64, tile.size()[0]);
        let _ = gx.addmm_(&part, tile);
    })?;
    Ok(gx.to_kind(out_kind))
}

pub fn group_pool(x: &Tensor, lead: &[i64], k: usize, g: usize) -> KResult<Tensor> {
    let xc = dense(x, Kind::Float)?;
    let mut shape = lead.to_vec();
    shape.push((k / g) as i64);
    let mut out = Fresh::empty(&shape, Kind::Float)?;
    pool::group_pool(slice(&xc), k, g, out.data_mut())?;
    Ok(out.into_tensor())
}

pub fn group_pool_backward(grad: &Tensor, lead: &[i64], k: usize, g: usize) -> KResult<Tensor> {
    let gc = dense(grad, Kind::Float)?;
    let mut shape = lead.to_vec();
    shape.push(k as i64);
    let mut out = Fresh::empty(&shape, Kind::Float)?;
    pool::group_pool_backward(slice(&gc), k, g, out.data_mut())?;
    Ok(out.into_tensor())
}

pub fn merge_offsets(
    offsets: &Tensor,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scaling: f32,
    group_size: usize,
) -> KResult<Tensor> {
    use qalora_core::half::{bf16, f16};
    let (n, groups) = (offsets.size()[0] as usize, offsets.size()[1] as usize);
    let rank = lora_a.size()[0] as usize;
    // A and B are small next to the offsets (r/L of them); no-ops when already f32.
    let a = dense(lora_a, Kind::Float)?;
    let b = dense(lora_b, Kind::Float)?;
    // f16/bf16/f32 offsets are read and written in place by the kernel (converted a block
    // of rows at a time); only f64 goes through an f32 copy, as the result is f32-computed.
    let kind = if offsets.kind() == Kind::Double { Kind::Float } else { offsets.kind() };
    let m = dense(offsets, kind)?;
    let mut out = Fresh::empty(&[n as i64, groups as i64], kind)?;
    let (sa, sb) = (slice::<f32>(&a), slice::<f32>(&b));
    match kind {
        Kind::Half => {
            merge::merge_offsets::<f16>(slice(&m), n, groups, sa, sb, rank, scaling, group_size, out.data_mut())?
        }
        Kind::BFloat16 => {
            merge::merge_offsets::<bf16>(slice(&m), n, groups, sa, sb, rank, scaling, group_size, out.data_mut())?
        }
        _ => merge::merge_offsets::<f32>(slice(&m), n, groups, sa, sb, rank, scaling, group_size, out.data_mut())?,
    }
    let out = out.into_tensor();
    Ok(if offsets.kind() == kind { out } else { out.to_kind(offsets.kind()) })
}
