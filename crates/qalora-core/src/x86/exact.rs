//! The exact f32 route's AVX2 + FMA kernels (`matmul/exact.rs`; scalar twin:
//! `matmul::exact::row_scalar`). Safety as in `x86/mod.rs`: reached only through the safe
//! entry points, which take the proof token and assert the buffer sizes.
//!
//! Weights reach the kernels in 16-weight steps as two 8-lane f32 vectors:
//! - `Nib`: a canonical 4-bit row. 8 bytes are zero-extended to 8 dwords; `& 0xF` gives the
//!   even codes q0,q2,..,q14 and `>> 4` the odd ones, so unpacking costs 4 instructions per
//!   16 weights. The activations are permuted once per call to the same order
//!   ([`permute_x_nib`]), which is cheaper than shuffling every weight.
//! - `Bytes`: one code per byte (8-bit rows, or 2/3-bit rows unpacked into a scratch row),
//!   natural order.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{dot_avx2, hsum, range_end, RowCodes};
use crate::isa::HasAvx2;

// ---- safe entry points -------------------------------------------------------------------

/// Reorders each 16-block of a row of x to [x0, x2, .., x14, x1, x3, .., x15], the order
/// in which [`RowCodes::Nib`] produces weights. `x.len() % 16 == 0`.
pub fn permute_x_nib(x: &[f32], out: &mut [f32]) {
    for (o, c) in out.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
        for t in 0..8 {
            o[t] = c[2 * t];
            o[8 + t] = c[2 * t + 1];
        }
    }
}

/// M = 1, two weight rows of one encoding: Σ_l s[l] · Σ_{k in l} q[k]·x[k] over groups
/// [l0, l1), for each row (`s0`, `s1` their scales). The offset term is the caller's.
/// `g % 16 == 0`.
pub fn gemv2(
    _: HasAvx2,
    rows: [RowCodes<'_>; 2],
    x: &[f32],
    s0: &[f32],
    s1: &[f32],
    g: usize,
    lr: (usize, usize),
) -> (f32, f32) {
    let end = range_end(g, lr);
    assert!(g > 0 && g.is_multiple_of(16) && x.len() >= end && s0.len() >= lr.1 && s1.len() >= lr.1);
    assert!(rows[0].holds(end) && rows[1].holds(end));
    let p = [rows[0].ptr(), rows[1].ptr()];
    // SAFETY: the token proves AVX2+FMA; the asserts above cover every load (rows up to
    // code l1*g, x up to l1*g, scales up to l1) for STEP 16 or 32 dividing g.
    unsafe {
        match (rows[0], rows[1], g.is_multiple_of(32)) {
            (RowCodes::Nib(_), RowCodes::Nib(_), true) => gemv2_group::<Nib, 32>(p, x.as_ptr(), s0, s1, g, lr),
            (RowCodes::Nib(_), RowCodes::Nib(_), false) => gemv2_group::<Nib, 16>(p, x.as_ptr(), s0, s1, g, lr),
            (RowCodes::Bytes(_), RowCodes::Bytes(_), true) => gemv2_group::<Bytes, 32>(p, x.as_ptr(), s0, s1, g, lr),
            (RowCodes::Bytes(_), RowCodes::Bytes(_), false) => gemv2_group::<Bytes, 16>(p, x.as_ptr(), s0, s1, g, lr),
            _ => unreachable!("gemv2 takes two rows of one encoding"),
        }
    }
}

/// All M = `out.len()` activation rows (x: rows of stride `ks`, group sums `xsum`: rows of
/// stride `ls`) against one weight row over groups [l0, l1), added to `out`:
/// out[i] += Σ_l (s[l] · Σ_{k in l} q[k]·x[i,k] + mm[l] · xsum[i,l]). `g % 16 == 0`.
pub fn rows_exact(
    _: HasAvx2,
    row: RowCodes<'_>,
    x: &[f32],
    ks: usize,
    xsum: &[f32],
    ls: usize,
    s: &[f32],
    mm: &[f32],
    g: usize,
    lr: (usize, usize),
    out: &mut [f32],
) {
    let (end, m) = (range_end(g, lr), out.len());
    assert!(g > 0 && g.is_multiple_of(16) && end <= ks && lr.1 <= ls && s.len() >= lr.1 && mm.len() >= lr.1);
    assert!(row.holds(end) && m.checked_mul(ks).is_some_and(|n| x.len() >= n));
    assert!(m.checked_mul(ls).is_some_and(|n| xsum.len() >= n));
    // SAFETY: the token proves AVX2+FMA; the asserts cover every load: x row i < M up to
    // column l1*g <= ks, xsum row i up to group l1 <= ls, the weight row up to code l1*g.
    unsafe { rows_exact_avx2(row, x, ks, xsum, ls, s, mm, g, lr, out) }
}

// ---- exact kernels ------------------------------------------------------------------------

/// Loads 16 weights at position `j` of a row as (first 8, second 8) f32 vectors.
trait Source {
    /// # Safety
    /// AVX2 is available, and the row holds codes [j, j + 16) in this encoding.
    unsafe fn load16(row: *const u8, j: usize) -> (__m256, __m256);
}

struct Nib;
struct Bytes;

impl Source for Nib {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load16(row: *const u8, j: usize) -> (__m256, __m256) {
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j / 2) as *const __m128i));
        let lo = _mm256_and_si256(v, _mm256_set1_epi32(0xF));
        let hi = _mm256_srli_epi32::<4>(v);
        (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi))
    }
}

impl Source for Bytes {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load16(row: *const u8, j: usize) -> (__m256, __m256) {
        let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j) as *const __m128i));
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j + 8) as *const __m128i));
        (_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b))
    }
}

/// Group route for MB <= 4 activation rows: per (row, group) Σ q·x in registers, then
/// y_i += s_l · Σ + (offsets · xsum_i at the end), over groups [l0, l1), added to `out`.
/// `STEP` weights (16 or 32, dividing g) per iteration, with one accumulator per 8 lanes
/// so the FMA chains do not wait on latency.
///
/// `row`: the weight row in `S`'s encoding; `x`: MB rows of K activations (stride `ks`),
/// in the order `S` produces weights; `xsum`: MB rows of L group sums (stride `ls`).
///
/// # Safety
/// AVX2 and FMA are available; `row` holds codes [0, l1·g); `x` holds MB rows of stride
/// `ks` with l1·g <= ks; `scales` has at least l1 values; `STEP` divides g.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_group<S: Source, const MB: usize, const STEP: usize>(
    row: *const u8,
    x: *const f32,
    ks: usize,
    xsum: &[f32],
    ls: usize,
    scales: &[f32],
    offsets: &[f32],
    g: usize,
    (l0, l1): (usize, usize),
    out: &mut [f32],
) {
    const { assert!(STEP == 16 || STEP == 32) };
    let mut tot = [_mm256_setzero_ps(); MB];
    for l in l0..l1 {
        // acc[i][c]: chain c (STEP / 8 of them) of activation row i.
        let mut acc = [[_mm256_setzero_ps(); 4]; MB];
        let mut j = l * g;
        let end = j + g;
        while j < end {
            let (a0, b0) = S::load16(row, j);
            for i in 0..MB {
                let xp = x.add(i * ks + j);
                acc[i][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xp), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(b0, _mm256_loadu_ps(xp.add(8)), acc[i][1]);
            }
            if STEP == 32 {
                let (a1, b1) = S::load16(row, j + 16);
                for i in 0..MB {
                    let xp = x.add(i * ks + j + 16);
                    acc[i][2] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(xp), acc[i][2]);
                    acc[i][3] = _mm256_fmadd_ps(b1, _mm256_loadu_ps(xp.add(8)), acc[i][3]);
                }
            }
            j += STEP;
        }
        let s = _mm256_set1_ps(*scales.get_unchecked(l));
        for i in 0..MB {
            let mut v = _mm256_add_ps(acc[i][0], acc[i][1]);
            if STEP == 32 {
                v = _mm256_add_ps(v, _mm256_add_ps(acc[i][2], acc[i][3]));
            }
            tot[i] = _mm256_fmadd_ps(s, v, tot[i]);
        }
    }
    for i in 0..MB {
        out[i] += hsum(tot[i]) + dot_avx2(&offsets[l0..l1], &xsum[i * ls + l0..i * ls + l1]);
    }
}

/// M = 1, two weight rows at a time: the x loads and the loop overhead are shared, and
/// 2·STEP/8 independent FMA chains hide the FMA latency. Returns (y_row0, y_row1) without
/// the offset term (the caller adds m · xsum).
///
/// # Safety
/// AVX2 and FMA are available; both rows hold codes [0, l1·g), `x` holds l1·g values,
/// `s0` and `s1` at least l1; `STEP` divides g.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv2_group<S: Source, const STEP: usize>(
    rows: [*const u8; 2],
    x: *const f32,
    s0: &[f32],
    s1: &[f32],
    g: usize,
    (l0, l1): (usize, usize),
) -> (f32, f32) {
    const { assert!(STEP == 16 || STEP == 32) };
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for l in l0..l1 {
        let mut a = [_mm256_setzero_ps(); 4];
        let mut b = [_mm256_setzero_ps(); 4];
        let mut j = l * g;
        let end = j + g;
        while j < end {
            let (x0, x1) = (_mm256_loadu_ps(x.add(j)), _mm256_loadu_ps(x.add(j + 8)));
            let (p0, q0) = S::load16(rows[0], j);
            let (p1, q1) = S::load16(rows[1], j);
            a[0] = _mm256_fmadd_ps(p0, x0, a[0]);
            a[1] = _mm256_fmadd_ps(q0, x1, a[1]);
            b[0] = _mm256_fmadd_ps(p1, x0, b[0]);
            b[1] = _mm256_fmadd_ps(q1, x1, b[1]);
            if STEP == 32 {
                let (x2, x3) = (_mm256_loadu_ps(x.add(j + 16)), _mm256_loadu_ps(x.add(j + 24)));
                let (p0, q0) = S::load16(rows[0], j + 16);
                let (p1, q1) = S::load16(rows[1], j + 16);
                a[2] = _mm256_fmadd_ps(p0, x2, a[2]);
                a[3] = _mm256_fmadd_ps(q0, x3, a[3]);
                b[2] = _mm256_fmadd_ps(p1, x2, b[2]);
                b[3] = _mm256_fmadd_ps(q1, x3, b[3]);
            }
            j += STEP;
        }
        let (mut va, mut vb) = (_mm256_add_ps(a[0], a[1]), _mm256_add_ps(b[0], b[1]));
        if STEP == 32 {
            va = _mm256_add_ps(va, _mm256_add_ps(a[2], a[3]));
            vb = _mm256_add_ps(vb, _mm256_add_ps(b[2], b[3]));
        }
        t0 = _mm256_fmadd_ps(_mm256_set1_ps(*s0.get_unchecked(l)), va, t0);
        t1 = _mm256_fmadd_ps(_mm256_set1_ps(*s1.get_unchecked(l)), vb, t1);
    }
    (hsum(t0), hsum(t1))
}

/// Dequantize route for 5..=8 activation rows: each 16 weights become s·q + m in registers
/// once and feed MB FMA chains, so the per-group cost does not grow with MB.
///
/// # Safety
/// As [`row_group`], with `offsets` of at least l1 values; `g % 16 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_deq<S: Source, const MB: usize>(
    row: *const u8,
    x: *const f32,
    ks: usize,
    scales: &[f32],
    offsets: &[f32],
    g: usize,
    (l0, l1): (usize, usize),
    out: &mut [f32],
) {
    let mut acc = [_mm256_setzero_ps(); MB];
    for l in l0..l1 {
        let s = _mm256_set1_ps(*scales.get_unchecked(l));
        let m = _mm256_set1_ps(*offsets.get_unchecked(l));
        let mut j = l * g;
        let end = j + g;
        while j < end {
            let (a, b) = S::load16(row, j);
            let (wa, wb) = (_mm256_fmadd_ps(a, s, m), _mm256_fmadd_ps(b, s, m));
            for i in 0..MB {
                // mul + fma off the chain, one add on it: the loop-carried latency per step
                // is one add, not two dependent FMAs.
                let xp = x.add(i * ks + j);
                let t = _mm256_mul_ps(wa, _mm256_loadu_ps(xp));
                let t = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xp.add(8)), t);
                acc[i] = _mm256_add_ps(acc[i], t);
            }
            j += 16;
        }
    }
    for i in 0..MB {
        out[i] += hsum(acc[i]);
    }
}

/// All M activation rows against one weight row, in blocks of <= 8 rows: the group route
/// for blocks of 1-4, the dequantize route for 5-8 (registers run out for the former).
///
/// # Safety
/// AVX2 and FMA are available, and the buffers are as [`rows_exact`] checks them.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_exact_avx2(
    row: RowCodes<'_>,
    x: &[f32],
    ks: usize,
    xsum: &[f32],
    ls: usize,
    s: &[f32],
    mm: &[f32],
    g: usize,
    lr: (usize, usize),
    out: &mut [f32],
) {
    let m = out.len();
    let step32 = g.is_multiple_of(32);
    let p = row.ptr();
    let mut i0 = 0;
    while i0 < m {
        let rem = m - i0;
        let mb = if rem >= 5 { rem.min(8) } else { rem };
        let (xp, xs, o) = (x.as_ptr().add(i0 * ks), &xsum[i0 * ls..], &mut out[i0..i0 + mb]);
        macro_rules! group {
            ($src:ty, $mb:literal) => {
                if step32 && $mb <= 2 {
                    row_group::<$src, $mb, 32>(p, xp, ks, xs, ls, s, mm, g, lr, o)
                } else {
                    row_group::<$src, $mb, 16>(p, xp, ks, xs, ls, s, mm, g, lr, o)
                }
            };
        }
        macro_rules! dispatch {
            ($src:ty) => {
                match mb {
                    1 => group!($src, 1),
                    2 => group!($src, 2),
                    3 => group!($src, 3),
                    4 => group!($src, 4),
                    5 => row_deq::<$src, 5>(p, xp, ks, s, mm, g, lr, o),
                    6 => row_deq::<$src, 6>(p, xp, ks, s, mm, g, lr, o),
                    7 => row_deq::<$src, 7>(p, xp, ks, s, mm, g, lr, o),
                    _ => row_deq::<$src, 8>(p, xp, ks, s, mm, g, lr, o),
                }
            };
        }
        match row {
            RowCodes::Nib(_) => dispatch!(Nib),
            RowCodes::Bytes(_) => dispatch!(Bytes),
        }
        i0 += mb;
    }
}
