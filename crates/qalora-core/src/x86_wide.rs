//! The small-M f32 route on 512-bit vectors (AVX-512 F), for canonical 4-bit rows with groups
//! of a multiple of 32: the exact route and the bf16-activation route run it (`wide.rs`).
//! Safety as in `x86.rs`: reached only through the safe entry point, which takes the proof
//! token and asserts the buffer sizes.
//!
//! 16 packed bytes (32 codes) become two vectors of 16 floats with three instructions: the
//! bytes widened to 16 lanes, and the low and high nibble of each lane looked up in a table
//! of 0.0..15.0 (`vpermps` reads only the low 4 bits of an index, so the low nibble needs
//! no mask, the high one one shift). The activations are reordered once per call to match
//! (even columns of each 32-block, then odd ones: [`crate::wide::nibble_order`]).

#![allow(clippy::too_many_arguments)]

use std::arch::x86_64::*;

use crate::isa::HasAvx512Vnni;
use crate::x86::PREFETCH_AHEAD;

/// Activation rows one pass over a weight row takes at most (32 registers).
pub const PASS_ROWS: usize = 8;

/// One canonical 4-bit weight row against M = `out.len()` activation rows: out[i] =
/// Σ_l s[l] · Σ_{k∈l} q[k]·x[i,k] + mm[l] · xsum[i,l]; `x` has M rows of `k` values in
/// nibble order, `xsum` M rows of k/g sums. `g % 32 == 0`.
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
        let (xp, sp, o) = (x[i0 * k..].as_ptr(), &xsum[i0 * groups..], &mut out[i0..i0 + mb]);
        // SAFETY: the token proves AVX2, FMA and AVX-512 F/VL; the asserts cover every load:
        // the row's k/2 bytes, mb rows of k activations and of L sums from row i0, L scales
        // and offsets.
        unsafe {
            macro_rules! call {
                ($mb:literal, $t:literal) => {
                    block_wide::<$mb, $t>(row.as_ptr(), xp, k, sp, s, mm, g, o)
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
        i0 += mb;
    }
}

/// MB activation rows; T accumulators per row take the groups in turn, so that few rows
/// still give the FMA units independent chains.
///
/// # Safety
/// AVX2, FMA and AVX-512 F/VL are available; `row` holds k/2 bytes, `x` MB rows of k values,
/// `xsum` MB rows of L = k/g values, `s` and `mm` L values; g % 32 == 0.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn block_wide<const MB: usize, const T: usize>(
    row: *const u8,
    x: *const f32,
    k: usize,
    xsum: &[f32],
    s: &[f32],
    mm: &[f32],
    g: usize,
    out: &mut [f32],
) {
    let lut = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    let groups = k / g;
    let mut tot = [[_mm512_setzero_ps(); T]; MB];
    for l in 0..groups {
        let mut lo_acc = [_mm512_setzero_ps(); MB];
        let mut hi_acc = [_mm512_setzero_ps(); MB];
        let mut j = l * g;
        let end = j + g;
        while j < end {
            if j.is_multiple_of(128) {
                // Once per 64-byte line of codes.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(j / 2 + PREFETCH_AHEAD) as *const i8);
            }
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
    for i in 0..MB {
        let v = tot[i][1..].iter().fold(tot[i][0], |a, &b| _mm512_add_ps(a, b));
        let xs = &xsum[i * groups..(i + 1) * groups];
        out[i] = _mm512_reduce_add_ps(v) + crate::x86::dot_avx2(mm, xs);
    }
}
