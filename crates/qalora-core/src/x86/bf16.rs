//! AVX-512 BF16 kernels: rows dequantized straight to bf16 (the training tiles) and f32 ->
//! bf16 conversion, both with `vcvtneps2bf16` (round to nearest even). Compiled for any
//! x86-64 and run only where [`crate::isa::Isa::avx512_bf16`] hands out its token; the
//! scalar twins live in `matmul/bf16.rs`.
//!
//! Safety, as in `x86/mod.rs`: the kernels (`unsafe fn`, private) are reached only through the
//! safe `pub fn`s here, which take the proof token and `assert!` that every buffer covers
//! what the kernel reads or writes.

use std::arch::x86_64::*;

use super::RowCodes;
use crate::isa::HasAvx512Bf16;

/// The 16 bf16 values as plain bits, to store.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512bf16")]
fn bits256(v: __m256bh) -> __m256i {
    // SAFETY: both are 256-bit vectors of plain bits; every bit pattern is valid in each.
    unsafe { std::mem::transmute::<__m256bh, __m256i>(v) }
}

/// Dequantizes one row to bf16 bits: out[k] = bf16(s[l]·q[k] + m[l]) (one f32 FMA, then
/// round to nearest even) for the L = `scales.len()` groups of `g` codes. `g % 16 == 0`.
pub fn dequant_row_bf16(
    _: HasAvx512Bf16,
    row: RowCodes<'_>,
    scales: &[f32],
    offsets: &[f32],
    g: usize,
    out: &mut [u16],
) {
    let end = scales.len().checked_mul(g).expect("row length overflows");
    assert!(g > 0 && g.is_multiple_of(16) && offsets.len() >= scales.len() && out.len() >= end);
    // SAFETY: the token proves the features; the asserts cover `out` up to L·g and the
    // checks below the row's codes, in steps of 16 that divide g.
    unsafe {
        match row {
            RowCodes::Nib(r) => {
                assert!(r.len().checked_mul(2).is_some_and(|c| c >= end));
                dequant_nib_bf16(r.as_ptr(), scales, offsets, g, out.as_mut_ptr())
            }
            RowCodes::Bytes(r) => {
                assert!(r.len() >= end);
                dequant_bytes_bf16(r.as_ptr(), scales, offsets, g, out.as_mut_ptr())
            }
        }
    }
}

/// # Safety
/// The features are available; `row` holds L·g/2 bytes, `out` L·g values; g % 16 == 0.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16")]
unsafe fn dequant_nib_bf16(row: *const u8, scales: &[f32], offsets: &[f32], g: usize, out: *mut u16) {
    // Byte t of 8 goes to lanes 2t (low nibble) and 2t + 1 (high nibble).
    let spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    let mask = _mm512_set1_epi32(0xF);
    for l in 0..scales.len() {
        let s = _mm512_set1_ps(scales[l]);
        let m = _mm512_set1_ps(offsets[l]);
        let mut j = l * g;
        while j < (l + 1) * g {
            let b = _mm512_cvtepu8_epi32(_mm_loadl_epi64(row.add(j / 2) as *const __m128i));
            let q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, b), shifts), mask);
            let w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, m);
            _mm256_storeu_si256(out.add(j) as *mut __m256i, bits256(_mm512_cvtneps_pbh(w)));
            j += 16;
        }
    }
}

/// # Safety
/// The features are available; `row` holds L·g codes (one per byte), `out` L·g values;
/// g % 16 == 0.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16")]
unsafe fn dequant_bytes_bf16(row: *const u8, scales: &[f32], offsets: &[f32], g: usize, out: *mut u16) {
    for l in 0..scales.len() {
        let s = _mm512_set1_ps(scales[l]);
        let m = _mm512_set1_ps(offsets[l]);
        let mut j = l * g;
        while j < (l + 1) * g {
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(j) as *const __m128i));
            let w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, m);
            _mm256_storeu_si256(out.add(j) as *mut __m256i, bits256(_mm512_cvtneps_pbh(w)));
            j += 16;
        }
    }
}

/// f32 -> bf16 bits (round to nearest even), over the shorter of the two.
pub fn f32_to_bf16(_: HasAvx512Bf16, src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    // SAFETY: the token proves the features; the kernel touches n values of each.
    unsafe { f32_to_bf16_avx512(src.as_ptr(), dst.as_mut_ptr(), n) }
}

/// # Safety
/// The features are available; `src` and `dst` hold n values.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16")]
unsafe fn f32_to_bf16_avx512(src: *const f32, dst: *mut u16, n: usize) {
    let mut j = 0;
    while j + 16 <= n {
        let v = _mm512_loadu_ps(src.add(j));
        _mm256_storeu_si256(dst.add(j) as *mut __m256i, bits256(_mm512_cvtneps_pbh(v)));
        j += 16;
    }
    while j < n {
        *dst.add(j) = crate::matmul::bf16::bf16_bits(*src.add(j));
        j += 1;
    }
}
