//! The small-M f32 route on 512-bit vectors (AVX-512 F), for canonical 4-bit rows with groups
//! of a multiple of 32: the exact route and the bf16-activation route run it
//! (`matmul/wide.rs`). Safety as in `x86/mod.rs`: reached only through the safe entry point,
//! which takes the proof token and asserts the buffer sizes.
//!
//! 16 packed bytes (32 codes) become two vectors of 16 floats with three instructions: the
//! bytes widened to 16 lanes, and the low and high nibble of each lane looked up in a table
//! of 0.0..15.0 (`vpermps` reads only the low 4 bits of an index, so the low nibble needs
//! no mask, the high one one shift). The activations are reordered once per call to match
//! (even columns of each 32-block, then odd ones: [`crate::matmul::wide::nibble_order`]).

#![allow(clippy::too_many_arguments)]

use std::arch::x86_64::*;

use super::PREFETCH_AHEAD;
use crate::isa::HasAvx512Vnni;

/// Activation rows one pass over a weight row takes at most (32 registers).
pub const PASS_ROWS: usize = 8;

/// The weight rows of `rows` (R rows of k/2 bytes) against M activation rows, K in chunks
/// of `kc` columns (a multiple of g): each chunk of x is used by all R rows while it is in
/// L1, instead of every row streaming all of x (M rows of K floats, beyond L1 when M > 1)
/// from L2. out[r·M + i] = Σ_l s[r,l] · Σ_{k∈l} q[r,k]·x[i,k] + mm[r,l] · xsum[i,l]; `x`
/// has M rows of `k` values in nibble order, `xsum` M rows of L = k/g sums, `s` and `mm`
/// R rows of L values. `g % 32 == 0`.
pub fn rows_wide(
    _: HasAvx512Vnni,
    rows: &[u8],
    x: &[f32],
    k: usize,
    xsum: &[f32],
    s: &[f32],
    mm: &[f32],
    g: usize,
    kc: usize,
    out: &mut [f32],
) {
    assert!(g > 0 && g.is_multiple_of(32) && k.is_multiple_of(g) && kc > 0 && kc.is_multiple_of(g));
    let (groups, rb) = (k / g, k / 2);
    let n = rows.len() / rb.max(1);
    let m = out.len() / n.max(1);
    assert!(out.len() == n * m && rows.len() >= n * rb && s.len() >= n * groups && mm.len() >= n * groups);
    assert!(m.checked_mul(k).is_some_and(|t| x.len() >= t) && xsum.len() >= m * groups);
    // Per (weight row, activation row): the 16 lanes of its sum so far.
    let mut tot = vec![[0f32; 16]; n * m];
    let mut c0 = 0;
    while c0 < k {
        let c1 = (c0 + kc).min(k);
        for r in 0..n {
            let (row, sr) = (&rows[r * rb..(r + 1) * rb], &s[r * groups..(r + 1) * groups]);
            let mut i0 = 0;
            while i0 < m {
                let mb = (m - i0).min(PASS_ROWS);
                let xp = x[i0 * k..].as_ptr();
                let t = &mut tot[r * m + i0..r * m + i0 + mb];
                // SAFETY: the token proves AVX2, FMA and AVX-512 F/VL; the asserts cover every
                // load: the row's k/2 bytes, mb rows of k activations from row i0, L scales;
                // columns c0..c1 lie within k and start and end on group boundaries.
                unsafe {
                    pass_sums(mb, row.as_ptr(), xp, k, sr, g, (c0, c1), |i, v| {
                        let p = t[i].as_mut_ptr();
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v))
                    })
                }
                i0 += mb;
            }
        }
        c0 = c1;
    }
    for r in 0..n {
        let mr = &mm[r * groups..(r + 1) * groups];
        for i in 0..m {
            let xs = &xsum[i * groups..(i + 1) * groups];
            // SAFETY: the token proves AVX2, FMA and AVX-512 F; `tot` rows hold 16 lanes.
            out[r * m + i] =
                unsafe { _mm512_reduce_add_ps(_mm512_loadu_ps(tot[r * m + i].as_ptr())) + super::dot_avx2(mr, xs) };
        }
    }
}

/// One canonical 4-bit weight row against M = `out.len()` activation rows, as
/// [`rows_wide`] computes it, all columns at once (for M = 1, whose x stays in L1).
pub fn row_wide(
    _: HasAvx512Vnni,
    row: &[u8],
    x: &[f32],
    k: usize,
    xsum: &[f32],
    s: &[f32],
    mm: &[f32],
    g: usize,
    out: &mut [f32],
) {
    let m = out.len();
    assert!(g > 0 && g.is_multiple_of(32) && k.is_multiple_of(g));
    let groups = k / g;
    assert!(row.len() >= k / 2 && s.len() >= groups && mm.len() >= groups);
    assert!(m.checked_mul(k).is_some_and(|n| x.len() >= n) && xsum.len() >= m * groups);
    let mut i0 = 0;
    while i0 < m {
        let mb = (m - i0).min(PASS_ROWS);
        let (xp, o) = (x[i0 * k..].as_ptr(), &mut out[i0..i0 + mb]);
        // SAFETY: the token proves AVX2, FMA and AVX-512 F/VL; the asserts cover every load:
        // the row's k/2 bytes, mb rows of k activations from row i0, L scales and offsets.
        unsafe {
            pass_sums(mb, row.as_ptr(), xp, k, s, g, (0, k), |i, v| {
                let xs = &xsum[(i0 + i) * groups..(i0 + i + 1) * groups];
                o[i] = _mm512_reduce_add_ps(v) + super::dot_avx2(mm, xs)
            })
        }
        i0 += mb;
    }
}

/// [`add_sums`] for `mb` <= 8 activation rows (chosen at run time), each row's 16-lane sum
/// handed to `put`.
///
/// # Safety
/// As [`add_sums`], with mb rows of x.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn pass_sums(
    mb: usize,
    row: *const u8,
    x: *const f32,
    k: usize,
    s: &[f32],
    g: usize,
    cols: (usize, usize),
    mut put: impl FnMut(usize, __m512),
) {
    macro_rules! call {
        ($mb:literal, $t:literal) => {
            for (i, v) in add_sums::<$mb, $t>(row, x, k, s, g, cols).into_iter().enumerate() {
                put(i, v)
            }
        };
    }
    match mb {
        1 => call!(1, 4),
        2 => call!(2, 2),
        3 => call!(3, 1),
        4 => call!(4, 1),
        5 => call!(5, 1),
        6 => call!(6, 1),
        7 => call!(7, 1),
        _ => call!(8, 1),
    }
}

/// Each of MB activation rows' Σ_l s[l] · Σ_{k∈l} q[k]·x[i,k] over the groups of columns
/// c0..c1, as 16 lanes; T accumulators per row take the groups in turn, so that few rows
/// still give the FMA units independent chains.
///
/// # Safety
/// AVX2, FMA and AVX-512 F/VL are available; `row` holds k/2 bytes, `x` MB rows of k values,
/// `s` L = k/g values; g % 32 == 0, c0 and c1 are multiples of g, c1 <= k.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn add_sums<const MB: usize, const T: usize>(
    row: *const u8,
    x: *const f32,
    k: usize,
    s: &[f32],
    g: usize,
    (c0, c1): (usize, usize),
) -> [__m512; MB] {
    let lut = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    let mut tot = [[_mm512_setzero_ps(); T]; MB];
    for l in c0 / g..c1 / g {
        let mut lo_acc = [_mm512_setzero_ps(); MB];
        let mut hi_acc = [_mm512_setzero_ps(); MB];
        let mut j = l * g;
        let end = j + g;
        while j < end {
            // Every block (16 bytes) asks for its line: cheaper than testing for a new line.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(j / 2 + PREFETCH_AHEAD) as *const i8);
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(j / 2) as *const __m128i));
            let lo = _mm512_permutexvar_ps(v, lut);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut);
            for i in 0..MB {
                let xp = x.add(i * k + j);
                lo_acc[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), lo_acc[i]);
                hi_acc[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), hi_acc[i]);
            }
            j += 32;
        }
        let sv = _mm512_set1_ps(*s.get_unchecked(l));
        for i in 0..MB {
            let t = &mut tot[i][l % T];
            *t = _mm512_fmadd_ps(sv, _mm512_add_ps(lo_acc[i], hi_acc[i]), *t);
        }
    }
    tot.map(|t| t[1..].iter().fold(t[0], |a, &b| _mm512_add_ps(a, b)))
}
