//! Ops on CPU tensors through the tch-free Rust core (rayon inside).

use qalora_core::matmul::{bf16, exact, int8, tiled, GroupInts, FUSED_MAX_ROWS};
use qalora_core::{group_pool, merge, pack, parallel, quant, GroupParams, Isa, ParamDtype, QuantLayout};
use tch::{Device, Kind, Tensor};

use crate::args::{Activations, CodeDType, QuantWeight};
use crate::boundary::{
    allocation_error, contiguous, dense, kind_name, slice, slice_mut, Fresh, KResult, Plain, Scratch,
};

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

/// The weight's scales and offsets as the kernels take them: raw f16 bits when both are
/// f16 (the default; converted per row inside the kernels), the integers and f16 factors of
/// factored parameters as they are, else f32 copies.
enum Params {
    F16(Tensor, Tensor),
    F32(Tensor, Tensor),
    Factored { scales: Tensor, scale_factors: Tensor, offsets: Tensor, offset_factors: Tensor, per_factor: usize },
}

impl Params {
    fn of(w: &QuantWeight) -> Params {
        if let Some(f) = &w.factors {
            return Params::Factored {
                scales: w.scales.contiguous(),
                scale_factors: f.scales.contiguous(),
                offsets: w.offsets.contiguous(),
                offset_factors: f.offsets.contiguous(),
                per_factor: f.per_factor,
            };
        }
        if w.scales.kind() == Kind::Half && w.offsets.kind() == Kind::Half {
            Params::F16(w.scales.contiguous(), w.offsets.contiguous())
        } else {
            let (s, o) = w.params_f32();
            Params::F32(s, o)
        }
    }

    fn view(&self) -> GroupParams<'_> {
        fn ints(t: &Tensor) -> GroupInts<'_> {
            if t.kind() == Kind::Int8 {
                GroupInts::I8(slice(t))
            } else {
                GroupInts::U8(slice(t))
            }
        }
        match self {
            Params::F16(s, o) => GroupParams::F16 { scales: slice(s), offsets: slice(o) },
            Params::F32(s, o) => GroupParams::F32 { scales: slice(s), offsets: slice(o) },
            Params::Factored { scales, scale_factors, offsets, offset_factors, per_factor } => GroupParams::Factored {
                scales: ints(scales),
                scale_factors: slice(scale_factors),
                offsets: ints(offsets),
                offset_factors: slice(offset_factors),
                per_factor: *per_factor,
            },
        }
    }
}

/// Calls `f(row0, tile)` for consecutive row tiles of the dequantized weight, reusing one
/// buffer, in `kind`: f32 or f64 (dequantized in f32), or bf16 (dequantized straight to
/// bf16, for bf16 GEMMs).
///
/// Tiles are dequantized on torch's OpenMP team when the kernels run on it (its threads are
/// awake right after a GEMM), else on the calling thread: waking rayon's workers against
/// torch's spinning OpenMP threads was measured to cost more than the work.
fn for_each_tile(w: &QuantWeight, kind: Kind, mut f: impl FnMut(usize, &Tensor)) -> KResult<()> {
    let (n, k, layout) = (w.layout.n, w.layout.k, w.layout);
    let rows = tile_rows(layout);
    let packed = slice::<u8>(&w.packed);
    let team = parallel::has_executor();
    // Rows per task when the tile is split among the team's threads.
    let per = |r: usize| if team { r.div_ceil(parallel::parallel_threads() * 2).max(1) } else { r };
    // Each row's parameters are converted (or multiplied out, when factored) as it is
    // dequantized: no f32 copy of all N*K/g of them.
    let params = Params::of(w);
    let view = params.view();
    if kind == Kind::BFloat16 {
        let failed = std::sync::Mutex::new(None);
        return Scratch::with([rows, k], Kind::BFloat16, |buf| {
            let mut row0 = 0;
            while row0 < n {
                let r = rows.min(n - row0);
                let chunk = per(r);
                // The kernel writes bf16 bits.
                parallel::for_each_chunk(&mut buf.data_mut::<u16>()[..r * k], chunk * k, |c, out| {
                    let mut scratch = bf16::DequantScratch::new(&layout);
                    let part = (row0 + c * chunk, out.len() / k);
                    let isa = Isa::detect_best();
                    if let Err(e) = bf16::dequantize_rows_bf16(packed, view, layout, part, out, &mut scratch, isa) {
                        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                    }
                });
                if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    return Err(e);
                }
                buf.with_rows(r, |tile| f(row0, tile));
                row0 += r;
            }
            Ok(())
        });
    }
    let (groups, rb) = (layout.groups(), layout.row_bytes());
    let one_row = QuantLayout::new(1, k, layout.bits, layout.group_size)?;
    Scratch::with([rows, k], Kind::Float, |buf| {
        let mut row0 = 0;
        while row0 < n {
            let r = rows.min(n - row0);
            let chunk = per(r);
            parallel::for_each_chunk(&mut buf.data_mut::<f32>()[..r * k], chunk * k, |c, out| {
                let (mut codes, mut s, mut m) = (vec![0u8; k], vec![0f32; groups], vec![0f32; groups]);
                let isa = Isa::detect_best();
                for (i, out_row) in out.chunks_exact_mut(k).enumerate() {
                    let row = row0 + c * chunk + i;
                    view.row_into(row, (0, groups), isa, &mut s, &mut m);
                    let prow = &packed[row * rb..(row + 1) * rb];
                    quant::dequantize_row(prow, &s, &m, one_row, 0, &mut codes, out_row);
                }
            });
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
    })
}

/// The kind the large-M path computes in for inputs of `kind`: bf16 GEMMs on bf16 tiles for
/// bf16 inputs (what nn.Linear does under bf16 autocast), f64 for f64, else f32.
fn gemm_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double | Kind::BFloat16 => kind,
        _ => Kind::Float,
    }
}

/// y = x W~^T for x of shape (M, K) (any float kind); returns (M, N) in x's kind.
/// `activations` chooses how small-M calls treat x (`Exact`, `Int8`: `qalora_core::matmul::int8`,
/// `Bf16`: `qalora_core::matmul::bf16`); large-M calls are exact in f32 (f64 for f64 inputs), or
/// bf16 GEMMs on bf16 tiles for bf16 inputs.
pub fn qmatmul(x2: &Tensor, w: &QuantWeight, activations: Activations) -> KResult<Tensor> {
    let (m, n) = (x2.size()[0] as usize, w.layout.n);
    let out_kind = x2.kind();
    if m == 0 {
        return Ok(Tensor::zeros([0, n as i64], cpu(out_kind)));
    }
    if out_kind != Kind::Double && m <= FUSED_MAX_ROWS {
        let xf = dense(x2, Kind::Float)?;
        let mut out = Fresh::empty(&[m as i64, n as i64], Kind::Float)?;
        let (xs, pk, os) = (slice(&xf), slice(&w.packed), out.data_mut());
        let fused = match activations {
            Activations::Exact => exact::qmatmul_with,
            Activations::Int8 => int8::qmatmul_int8_with,
            Activations::Bf16 => bf16::qmatmul_bf16_with,
        };
        // The default dtype goes to the kernel as raw f16 bits, converted per row in
        // registers: no extra pass over N*K/g parameters per call.
        let params = Params::of(w);
        fused(xs, m, pk, params.view(), w.layout, os, Isa::detect_best())?;
        return Ok(out.into_tensor().to_kind(out_kind));
    }
    // Large M: one dequantized tile at a time through torch's GEMM, each into its columns
    // of the (M, N) output (a strided GEMM output, no transpose afterwards).
    let ck = gemm_kind(out_kind);
    let xc = dense(x2, ck)?;
    let out = Tensor::f_empty([m as i64, n as i64], cpu(ck))
        .map_err(|e| allocation_error(&[m as i64, n as i64], kind_name(ck), e))?;
    for_each_tile(w, ck, |row0, tile| {
        let dst = out.narrow(1, row0 as i64, tile.size()[0]);
        let _ = xc.mm_out(&dst, &tile.tr());
    })?;
    Ok(if out_kind == ck { out } else { out.to_kind(out_kind) })
}

/// grad_x = grad W~ for grad of shape (M, N); returns (M, K) in grad's kind (bf16 GEMMs on
/// bf16 tiles for bf16 grads, partial sums of several tiles added in f32).
pub fn qmatmul_grad_input(g2: &Tensor, w: &QuantWeight) -> KResult<Tensor> {
    let (m, k) = (g2.size()[0], w.layout.k as i64);
    let out_kind = g2.kind();
    let ck = gemm_kind(out_kind);
    let gc = dense(g2, ck)?;
    let acc_kind = if ck == Kind::BFloat16 { Kind::Float } else { ck };
    if m == 0 {
        return Ok(Tensor::zeros([0, k], cpu(out_kind)));
    }
    if tile_rows(w.layout) >= w.layout.n {
        // One tile: the product is the result.
        let mut result = None;
        for_each_tile(w, ck, |_, tile| result = Some(gc.mm(tile)))?;
        let gx = result.ok_or_else(|| qalora_core::KernelError::internal("no tile"))?;
        return Ok(gx.to_kind(out_kind));
    }
    let mut gx =
        Tensor::f_zeros([m, k], cpu(acc_kind)).map_err(|e| allocation_error(&[m, k], kind_name(acc_kind), e))?;
    for_each_tile(w, ck, |row0, tile| {
        let part = gc.narrow(1, row0 as i64, tile.size()[0]);
        if ck == acc_kind {
            let _ = gx.addmm_(&part, tile);
        } else {
            let _ = gx.f_add_(&part.mm(tile)).map(|_| ());
        }
    })?;
    Ok(gx.to_kind(out_kind))
}

/// The scales' gradient of y = x W~^T (`qalora_core::group_grad`): P = grad^T x is formed a
/// tile of weight rows at a time with torch's GEMM (f32, or bf16 GEMMs accumulating in f32
/// for bf16 inputs) into one reused buffer, and reduced against the codes by the core.
pub fn qmatmul_grad_scales(g2: &Tensor, x2: &Tensor, w: &QuantWeight) -> KResult<Tensor> {
    let (n, k, layout) = (w.layout.n, w.layout.k, w.layout);
    let groups = layout.groups();
    let mut out = Fresh::empty(&[n as i64, groups as i64], Kind::Float)?;
    if x2.size()[0] == 0 {
        out.data_mut::<f32>().fill(0.0);
        return Ok(out.into_tensor());
    }
    let ck = if g2.kind() == Kind::BFloat16 && x2.kind() == Kind::BFloat16 { Kind::BFloat16 } else { Kind::Float };
    let (gc, xc) = (dense(g2, ck)?, dense(x2, ck)?);
    let rows = tile_rows(layout);
    let packed = slice::<u8>(&w.packed);
    let dst = out.data_mut::<f32>();
    Scratch::with([rows, k], Kind::Float, |buf| {
        let mut row0 = 0;
        while row0 < n {
            let r = rows.min(n - row0);
            buf.with_rows(r, |tile| {
                let part = gc.narrow(1, row0 as i64, r as i64).tr();
                if ck == Kind::Float {
                    let _ = part.mm_out(tile, &xc);
                } else {
                    let _ = tile.shallow_clone().f_copy_(&part.mm(&xc)).map(|_| ());
                }
            });
            let prod = &buf.data_mut::<f32>()[..r * k];
            qalora_core::group_grad::scale_grad_rows(
                packed,
                layout,
                row0,
                prod,
                &mut dst[row0 * groups..(row0 + r) * groups],
            )?;
            row0 += r;
        }
        Ok(())
    })?;
    Ok(out.into_tensor())
}

pub fn group_pool(x: &Tensor, lead: &[i64], k: usize, g: usize) -> KResult<Tensor> {
    let xc = dense(x, Kind::Float)?;
    let mut shape = lead.to_vec();
    shape.push((k / g) as i64);
    let mut out = Fresh::empty(&shape, Kind::Float)?;
    group_pool::group_pool(slice(&xc), k, g, out.data_mut())?;
    Ok(out.into_tensor())
}

pub fn group_pool_backward(grad: &Tensor, lead: &[i64], k: usize, g: usize) -> KResult<Tensor> {
    let gc = dense(grad, Kind::Float)?;
    let mut shape = lead.to_vec();
    shape.push(k as i64);
    let mut out = Fresh::empty(&shape, Kind::Float)?;
    group_pool::group_pool_backward(slice(&gc), k, g, out.data_mut())?;
    Ok(out.into_tensor())
}

/// The merged offsets, written into a new tensor, or into `out` (the offsets themselves for
/// an in-place merge, or another tensor of their shape and dtype).
pub fn merge_offsets(
    offsets: &Tensor,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scaling: f32,
    group_size: usize,
    out: Option<&Tensor>,
) -> KResult<Tensor> {
    use qalora_core::half::{bf16, f16};
    let (n, groups) = (offsets.size()[0] as usize, offsets.size()[1] as usize);
    let rank = lora_a.size()[0] as usize;
    // A and B are small next to the offsets (r/L of them); no-ops when already f32.
    let a = dense(lora_a, Kind::Float)?;
    let b = dense(lora_b, Kind::Float)?;
    let (sa, sb) = (slice::<f32>(&a), slice::<f32>(&b));
    let isa = Isa::detect_best();
    macro_rules! merge_as {
        ($t:ty, $src:expr, $dst:expr) => {
            merge::merge_offsets_with::<$t>($src, n, groups, sa, sb, rank, scaling, group_size, $dst, isa)
        };
    }
    macro_rules! in_place_as {
        ($t:ty, $dst:expr) => {
            merge::merge_offsets_in_place::<$t>($dst, n, groups, sa, sb, rank, scaling, group_size, isa)
        };
    }
    if let Some(out) = out {
        // `out` was checked by the caller: contiguous, CPU, offsets' shape and dtype (not
        // f64), and either the offsets themselves or not overlapping them.
        let kind = out.kind();
        if out.data_ptr() == offsets.data_ptr() {
            match kind {
                Kind::Half => in_place_as!(f16, slice_mut(out))?,
                Kind::BFloat16 => in_place_as!(bf16, slice_mut(out))?,
                _ => in_place_as!(f32, slice_mut(out))?,
            }
        } else {
            let m = dense(offsets, kind)?;
            match kind {
                Kind::Half => merge_as!(f16, slice(&m), slice_mut(out))?,
                Kind::BFloat16 => merge_as!(bf16, slice(&m), slice_mut(out))?,
                _ => merge_as!(f32, slice(&m), slice_mut(out))?,
            }
        }
        return Ok(out.shallow_clone());
    }
    // f16/bf16/f32 offsets are read and written in place by the kernel (converted a block
    // of rows at a time); only f64 goes through an f32 copy, as the result is f32-computed.
    let kind = if offsets.kind() == Kind::Double { Kind::Float } else { offsets.kind() };
    let m = dense(offsets, kind)?;
    let mut fresh = Fresh::empty(&[n as i64, groups as i64], kind)?;
    match kind {
        Kind::Half => merge_as!(f16, slice(&m), fresh.data_mut())?,
        Kind::BFloat16 => merge_as!(bf16, slice(&m), fresh.data_mut())?,
        _ => merge_as!(f32, slice(&m), fresh.data_mut())?,
    }
    let fresh = fresh.into_tensor();
    Ok(if offsets.kind() == kind { fresh } else { fresh.to_kind(offsets.kind()) })
}

/// Canonical 4-bit codes + f16 scales/offsets -> the tiled int8 layout (`qalora_core::matmul::tiled`).
pub fn repack_tiles(w: &QuantWeight) -> KResult<Tensor> {
    let (s, o) = (w.scales.contiguous(), w.offsets.contiguous());
    let mut out = Fresh::empty(&[tiled::tiled_len(&w.layout) as i64], Kind::Uint8)?;
    tiled::repack(slice(&w.packed), slice(&s), slice(&o), w.layout, out.data_mut())?;
    Ok(out.into_tensor())
}

/// The tiled layout -> (packed, scales, offsets) in the canonical layout, f16 parameters.
pub fn unrepack_tiles(tiled: &Tensor, layout: QuantLayout) -> KResult<(Tensor, Tensor, Tensor)> {
    let t = contiguous(tiled)?;
    let (n, groups) = (layout.n as i64, layout.groups() as i64);
    let mut packed = Fresh::empty(&[n, layout.row_bytes() as i64], Kind::Uint8)?;
    let mut scales = Fresh::empty(&[n, groups], Kind::Half)?;
    let mut offsets = Fresh::empty(&[n, groups], Kind::Half)?;
    tiled::unrepack(slice(&t), layout, packed.data_mut(), scales.data_mut(), offsets.data_mut())?;
    Ok((packed.into_tensor(), scales.into_tensor(), offsets.into_tensor()))
}

/// y = x W~^T on a tiled layer, int8 activations; x (M, K) with M <= the fused limit.
pub fn qmatmul_tiled(x2: &Tensor, tiled: &Tensor, layout: QuantLayout) -> KResult<Tensor> {
    let (m, n) = (x2.size()[0] as usize, layout.n);
    let out_kind = x2.kind();
    let xf = dense(x2, Kind::Float)?;
    let t = contiguous(tiled)?;
    let mut out = Fresh::empty(&[m as i64, n as i64], Kind::Float)?;
    tiled::qmatmul_tiled_with(slice(&xf), m, slice(&t), layout, out.data_mut(), Isa::detect_best())?;
    Ok(out.into_tensor().to_kind(out_kind))
}

/// Reads every byte of a uint8 CPU tensor once on rayon's threads (the bandwidth probe).
pub fn stream_read(t: &Tensor) -> KResult<u64> {
    let c = contiguous(t)?;
    Ok(qalora_core::probe::stream_read(slice(&c), Isa::detect_best()))
}
