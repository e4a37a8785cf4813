//! The exact QA-LoRA merge: m'[n,l] = m[n,l] + c * (B A)[n,l] / g (docs/design.md §1). The 1/g
//! comes from mean pooling: the adapter sees the mean of each group, so its update spreads
//! evenly over the g weights of that group.
//!
//! The rank is small, so each output row is computed directly as Σ_t B[n,t]·A[t,:] with A
//! (r × L) staying in cache: no (N, L) product matrix is ever formed, and offsets are read
//! and written in their storage dtype (one rounding, from the f32 result).

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::layout::{check_positive_group_size, size_product};
use crate::parallel::for_each_row_with;

/// A storage dtype of offsets: converted to and from f32 a row at a time.
pub trait OffsetElem: Copy + Send + Sync {
    fn load(src: &[Self], dst: &mut [f32]);
    /// Rounds to nearest, ties to even (as torch's casts do).
    fn store(src: &[f32], dst: &mut [Self]);
    /// The AVX-512 merge of `rows` rows of this dtype (see `x86::merge::merge_rows`).
    ///
    /// # Safety
    /// AVX-512 F; `src` and `out` hold rows × groups values, `b` rows × rank, `a` rank × groups.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn merge_rows_avx512(
        src: *const Self,
        out: *mut Self,
        rows: usize,
        b: &[f32],
        a: &[f32],
        rank: usize,
        groups: usize,
        factor: f32,
    );
}

/// Each dtype's [`OffsetElem::merge_rows_avx512`]: the generic kernel at that dtype.
macro_rules! merge_rows_avx512_of {
    ($t:ty) => {
        #[cfg(target_arch = "x86_64")]
        unsafe fn merge_rows_avx512(
            src: *const $t,
            out: *mut $t,
            rows: usize,
            b: &[f32],
            a: &[f32],
            rank: usize,
            groups: usize,
            factor: f32,
        ) {
            // SAFETY: the caller's contract.
            unsafe { crate::x86::merge::merge_rows::<$t>(src, out, rows, b, a, rank, groups, factor) }
        }
    };
}

impl OffsetElem for f32 {
    merge_rows_avx512_of!(f32);
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}

impl OffsetElem for f16 {
    merge_rows_avx512_of!(f16);
    // half's slice conversions use F16C when the CPU has it (detected once per call).
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
}

impl OffsetElem for bf16 {
    merge_rows_avx512_of!(bf16);
    fn load(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
}

/// Rows per work item: enough to amortise scheduling, few enough that the f32 scratch
/// (rows × L) stays in L1/L2 for typical L.
const BLOCK_ROWS: usize = 32;

/// m[l..l + W] = factor * s + m[l..l + W], s = Σ_t b[t] * a[t, l..l + W] for one row: W
/// independent sums in registers, so the fused multiply-adds of consecutive t overlap.
#[inline(always)]
fn merge_cols<const W: usize>(mrow: &mut [f32], brow: &[f32], a: &[f32], groups: usize, l: usize, factor: f32) {
    let mut acc = [0f32; W];
    for (t, &bt) in brow.iter().enumerate() {
        let at: &[f32; W] = a[t * groups + l..t * groups + l + W].try_into().unwrap();
        for j in 0..W {
            acc[j] = bt.mul_add(at[j], acc[j]);
        }
    }
    let dst: &mut [f32; W] = (&mut mrow[l..l + W]).try_into().unwrap();
    for j in 0..W {
        dst[j] = factor.mul_add(acc[j], dst[j]);
    }
}

/// m[i, :] += factor * Σ_t b[i, t] * a[t, :] for every row i of `m` (rows of `groups`).
///
/// Each element is fma(factor, s, m) with s = fma(b[t], a[t], s) over t in order from 0:
/// fused multiply-adds (one rounding each) on every instruction set, the scalar twin
/// included, so every instruction set and every column blocking gives the same bits.
/// Columns go in blocks of `WIDE` (as many as the vector registers hold), then 32, then 8,
/// then one at a time.
#[inline(always)]
fn merge_rows<const WIDE: usize>(m: &mut [f32], b: &[f32], a: &[f32], rank: usize, groups: usize, factor: f32) {
    for (mrow, brow) in m.chunks_exact_mut(groups).zip(b.chunks_exact(rank)) {
        let mut l = 0;
        while l + WIDE <= groups {
            merge_cols::<WIDE>(mrow, brow, a, groups, l, factor);
            l += WIDE;
        }
        while l + 32 <= groups {
            merge_cols::<32>(mrow, brow, a, groups, l, factor);
            l += 32;
        }
        while l + 8 <= groups {
            merge_cols::<8>(mrow, brow, a, groups, l, factor);
            l += 8;
        }
        for (j, v) in mrow.iter_mut().enumerate().skip(l) {
            let mut s = 0f32;
            for (t, &bt) in brow.iter().enumerate() {
                s = bt.mul_add(a[t * groups + j], s);
            }
            *v = factor.mul_add(s, *v);
        }
    }
}

/// [`merge_rows`] compiled for AVX2 + FMA (8-wide vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn merge_rows_avx2(m: &mut [f32], b: &[f32], a: &[f32], rank: usize, groups: usize, factor: f32) {
    // 8 of the 16 ymm registers hold sums.
    merge_rows::<64>(m, b, a, rank, groups, factor)
}

fn merge_rows_with(isa: Isa, m: &mut [f32], b: &[f32], a: &[f32], rank: usize, groups: usize, factor: f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: `avx2()` proves the CPU has AVX2 and FMA (the body is safe code, bounds-checked).
        return unsafe { merge_rows_avx2(m, b, a, rank, groups, factor) };
    }
    let _ = isa;
    merge_rows::<32>(m, b, a, rank, groups, factor)
}

/// offsets: (N, L); lora_a: (r, L); lora_b: (N, r). Writes merged offsets (N, L) in the
/// offsets' dtype, computed in f32 and rounded once.
#[allow(clippy::too_many_arguments)]
pub fn merge_offsets<T: OffsetElem>(
    offsets: &[T],
    n: usize,
    groups: usize,
    lora_a: &[f32],
    lora_b: &[f32],
    rank: usize,
    scaling: f32,
    group_size: usize,
    out: &mut [T],
) -> Result<()> {
    merge_offsets_with(offsets, n, groups, lora_a, lora_b, rank, scaling, group_size, out, Isa::detect_best())
}

/// [`merge_offsets`] on a chosen instruction set (tests and benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn merge_offsets_with<T: OffsetElem>(
    offsets: &[T],
    n: usize,
    groups: usize,
    lora_a: &[f32],
    lora_b: &[f32],
    rank: usize,
    scaling: f32,
    group_size: usize,
    out: &mut [T],
    isa: Isa,
) -> Result<()> {
    let params = size_product("offsets", &[n, groups])?;
    if offsets.len() != params {
        return Err(KernelError::shape(format!("offsets: got {} values, expected {params}", offsets.len())));
    }
    merge_impl(Some(offsets), n, groups, lora_a, lora_b, rank, scaling, group_size, out, isa)
}

/// The merge written over the offsets themselves (no second (N, L) buffer: its page faults
/// cost more than the merge). Same arithmetic and rounding as [`merge_offsets`].
#[allow(clippy::too_many_arguments)]
pub fn merge_offsets_in_place<T: OffsetElem>(
    offsets: &mut [T],
    n: usize,
    groups: usize,
    lora_a: &[f32],
    lora_b: &[f32],
    rank: usize,
    scaling: f32,
    group_size: usize,
    isa: Isa,
) -> Result<()> {
    merge_impl(None, n, groups, lora_a, lora_b, rank, scaling, group_size, offsets, isa)
}

/// Merges `src` (or, when `None`, `out`'s own values) into `out`, a block of rows at a time.
#[allow(clippy::too_many_arguments)]
fn merge_impl<T: OffsetElem>(
    src: Option<&[T]>,
    n: usize,
    groups: usize,
    lora_a: &[f32],
    lora_b: &[f32],
    rank: usize,
    scaling: f32,
    group_size: usize,
    out: &mut [T],
    isa: Isa,
) -> Result<()> {
    if !scaling.is_finite() {
        return Err(KernelError::value(format!("scaling: got {scaling}, it must be finite")));
    }
    check_positive_group_size(group_size)?;
    let shape_err =
        |what: &str, got: usize, want: usize| KernelError::shape(format!("{what}: got {got} values, expected {want}"));
    let params = size_product("offsets", &[n, groups])?;
    if out.len() != params {
        return Err(shape_err("offsets", out.len(), params));
    }
    let a_len = size_product("lora_A", &[rank, groups])?;
    if lora_a.len() != a_len {
        return Err(shape_err("lora_A", lora_a.len(), a_len));
    }
    let b_len = size_product("lora_B", &[n, rank])?;
    if lora_b.len() != b_len {
        return Err(shape_err("lora_B", lora_b.len(), b_len));
    }
    if params == 0 {
        return Ok(());
    }
    let factor = scaling / group_size as f32;
    let block = BLOCK_ROWS.min(n) * groups;
    let work = params.saturating_mul(rank + 1);
    for_each_row_with(
        out,
        block,
        work,
        || vec![0f32; block],
        |scratch, blk, o| {
            let rows = o.len() / groups;
            let row0 = blk * BLOCK_ROWS;
            let b = &lora_b[row0 * rank..(row0 + rows) * rank];
            #[cfg(target_arch = "x86_64")]
            if rank > 0 && isa.avx512_vnni().is_some() {
                let op = o.as_mut_ptr();
                let sp = match src {
                    Some(src) => src[row0 * groups..(row0 + rows) * groups].as_ptr(),
                    None => op as *const T,
                };
                // SAFETY: `avx512_vnni()` proves AVX-512 F; `sp` and `op` hold rows × groups
                // values (the same rows of `src` or `out` itself), `b` rows × rank, and
                // lora_a rank × groups (checked above).
                return unsafe { T::merge_rows_avx512(sp, op, rows, b, lora_a, rank, groups, factor) };
            }
            let s = &mut scratch[..o.len()];
            match src {
                Some(src) => T::load(&src[row0 * groups..(row0 + rows) * groups], s),
                None => T::load(o, s),
            }
            if rank > 0 {
                merge_rows_with(isa, s, b, lora_a, rank, groups, factor);
            }
            T::store(s, o);
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_f32;

    #[allow(clippy::too_many_arguments)]
    fn reference(m: &[f32], a: &[f32], b: &[f32], n: usize, l: usize, r: usize, c: f32, g: usize) -> Vec<f64> {
        let mut want = vec![0f64; n * l];
        for i in 0..n {
            for j in 0..l {
                let ba: f64 = (0..r).map(|t| b[i * r + t] as f64 * a[t * l + j] as f64).sum();
                want[i * l + j] = m[i * l + j] as f64 + c as f64 * ba / g as f64;
            }
        }
        want
    }

    #[test]
    fn matches_f64_reference() {
        let (n, l, r, g, c) = (9usize, 6usize, 3usize, 32usize, 2.5f32);
        let (m, a, b) = (random_f32(n * l, 1), random_f32(r * l, 2), random_f32(n * r, 3));
        let mut out = vec![0f32; n * l];
        merge_offsets(&m, n, l, &a, &b, r, c, g, &mut out).unwrap();
        for (o, w) in out.iter().zip(reference(&m, &a, &b, n, l, r, c, g)) {
            assert!((*o as f64 - w).abs() < 1e-6);
        }
        assert!(merge_offsets(&m, n, l, &a[1..], &b, r, c, g, &mut out).is_err());
        assert!(merge_offsets(&m, n, l, &a, &b[1..], r, c, g, &mut out).is_err());
        assert!(merge_offsets(&m, n, l, &a, &b, r, f32::NAN, g, &mut out).is_err());
    }

    /// Rounding edges of the f16 / bf16 stores on every instruction set: ties (to even),
    /// f16 subnormals and overflow to infinity, bf16 overflow, NaN, signed zero, and a
    /// partial last vector. With rank 1, b = 1 and factor 1 each result is m + a rounded
    /// once to f32, then once to the storage dtype, exactly as `half` rounds it.
    #[test]
    fn storage_rounding_matches_half_on_every_path() {
        let deltas = [
            2f32.powi(-8),        // bf16 tie at 1.0: stays 1.0
            3.0 * 2f32.powi(-8),  // bf16 tie: rounds up to the even 1.015625
            2f32.powi(-11),       // f16 tie at 1.0
            3.0 * 2f32.powi(-11), // f16 tie, rounds up
            -1.0 + 1e-7,          // f16 subnormal result
            -1.0 + 3e-8,          // below f16's smallest subnormal's half: rounds to 0
            65519.0,              // f16 rounds to its largest finite
            65520.0,              // f16 overflows to infinity
            3.4e38,               // bf16 rounds to infinity
            -2.0,                 // -1.0
            -1.0,                 // +0.0
            f32::NAN,
            f32::INFINITY,
            0.1,
            -0.3,
            1.0e-3,
            7.25,
        ];
        let l = deltas.len();
        let m32 = vec![1f32; l];
        let (b, factor_g) = (vec![1f32], 32usize);
        for isa in Isa::available() {
            let m16: Vec<f16> = m32.iter().map(|&v| f16::from_f32(v)).collect();
            let mut o16 = vec![f16::ZERO; l];
            merge_offsets_with(&m16, 1, l, &deltas, &b, 1, factor_g as f32, factor_g, &mut o16, isa).unwrap();
            let mut in16 = m16.clone();
            merge_offsets_in_place(&mut in16, 1, l, &deltas, &b, 1, factor_g as f32, factor_g, isa).unwrap();
            let mb: Vec<bf16> = m32.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut ob = vec![bf16::ZERO; l];
            merge_offsets_with(&mb, 1, l, &deltas, &b, 1, factor_g as f32, factor_g, &mut ob, isa).unwrap();
            let mut inb = mb.clone();
            merge_offsets_in_place(&mut inb, 1, l, &deltas, &b, 1, factor_g as f32, factor_g, isa).unwrap();
            for j in 0..l {
                let exact = 1f32 + deltas[j];
                let (w16, wb) = (f16::from_f32(exact), bf16::from_f32(exact));
                assert_eq!(o16[j].to_bits(), w16.to_bits(), "f16 {isa:?} delta {}", deltas[j]);
                assert_eq!(in16[j].to_bits(), w16.to_bits(), "f16 in place {isa:?} delta {}", deltas[j]);
                assert_eq!(ob[j].to_bits(), wb.to_bits(), "bf16 {isa:?} delta {}", deltas[j]);
                assert_eq!(inb[j].to_bits(), wb.to_bits(), "bf16 in place {isa:?} delta {}", deltas[j]);
            }
        }
    }

    /// Odd shapes (L below, at and above the register block, with tails), the parallel path
    /// (above the work threshold, a partial last block), every instruction set, and the
    /// three storage dtypes: all within f32 / one-rounding error of an f64 reference, and
    /// SIMD bit-identical to scalar.
    #[test]
    fn every_path_matches_reference_and_scalar_twin() {
        for &(n, l, r) in &[
            (1usize, 1usize, 1usize),
            (5, 7, 4),
            (33, 32, 16),
            (70, 45, 3),
            (1031, 128, 16),
            (300, 97, 8),
            (40, 64, 0),
            // Every column block of every instruction set (128, 64, 32, 16, 8) and a tail.
            (17, 128 + 64 + 32 + 8 + 3, 16),
            (6, 448, 5),
            (3, 128 + 16 + 16 + 15, 2),
            (4, 15, 7),
        ] {
            let (g, c) = (32usize, 1.75f32);
            let seed = (n * 1000 + l * 10 + r) as u64;
            let (m, a, b) = (random_f32(n * l, seed), random_f32(r * l, seed + 1), random_f32(n * r, seed + 2));
            let want = reference(&m, &a, &b, n, l, r, c, g);
            let mut outs = Vec::new();
            for isa in Isa::available() {
                let mut out = vec![0f32; n * l];
                merge_offsets_with(&m, n, l, &a, &b, r, c, g, &mut out, isa).unwrap();
                for (o, w) in out.iter().zip(&want) {
                    assert!((*o as f64 - w).abs() < 1e-6 * (1.0 + r as f64), "n={n} l={l} r={r} {isa:?}");
                }
                outs.push(out);
            }
            assert!(outs.windows(2).all(|w| w[0] == w[1]), "n={n} l={l} r={r}: SIMD differs from scalar");
            // In place: the same bits as into a fresh buffer.
            for isa in Isa::available() {
                let mut inplace = m.clone();
                merge_offsets_in_place(&mut inplace, n, l, &a, &b, r, c, g, isa).unwrap();
                assert_eq!(inplace, outs[0], "in place, n={n} l={l} r={r} {isa:?}");
            }

            // f16 / bf16 storage: the result is the f32 result rounded once.
            let m16: Vec<f16> = m.iter().map(|&v| f16::from_f32(v)).collect();
            let mb16: Vec<bf16> = m.iter().map(|&v| bf16::from_f32(v)).collect();
            let m16_f32: Vec<f32> = m16.iter().map(|v| v.to_f32()).collect();
            let mb16_f32: Vec<f32> = mb16.iter().map(|v| v.to_f32()).collect();
            let (mut want16, mut wantb16) = (vec![0f32; n * l], vec![0f32; n * l]);
            merge_offsets_with(&m16_f32, n, l, &a, &b, r, c, g, &mut want16, Isa::Scalar).unwrap();
            merge_offsets_with(&mb16_f32, n, l, &a, &b, r, c, g, &mut wantb16, Isa::Scalar).unwrap();
            let mut o16 = vec![f16::ZERO; n * l];
            let mut ob16 = vec![bf16::ZERO; n * l];
            for isa in Isa::available() {
                merge_offsets_with(&m16, n, l, &a, &b, r, c, g, &mut o16, isa).unwrap();
                merge_offsets_with(&mb16, n, l, &a, &b, r, c, g, &mut ob16, isa).unwrap();
                let (mut in16, mut inb16) = (m16.clone(), mb16.clone());
                merge_offsets_in_place(&mut in16, n, l, &a, &b, r, c, g, isa).unwrap();
                merge_offsets_in_place(&mut inb16, n, l, &a, &b, r, c, g, isa).unwrap();
                for i in 0..n * l {
                    assert_eq!(o16[i], f16::from_f32(want16[i]), "f16 n={n} l={l} r={r} i={i} {isa:?}");
                    assert_eq!(ob16[i], bf16::from_f32(wantb16[i]), "bf16 n={n} l={l} r={r} i={i} {isa:?}");
                    assert_eq!(in16[i], o16[i], "f16 in place n={n} l={l} r={r} i={i} {isa:?}");
                    assert_eq!(inb16[i], ob16[i], "bf16 in place n={n} l={l} r={r} i={i} {isa:?}");
                }
            }
        }
    }
}
