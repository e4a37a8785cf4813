//! x86-64 SIMD kernels, one file per route (`exact.rs`, `int8.rs`, `bf16.rs`, `wide.rs`,
//! `tiled.rs`, and the merge's `merge.rs`), and here the helpers they share: compiled for
//! any x86-64 and run only on a CPU that has the features. Each has a scalar twin beside the
//! code that calls it (`matmul/`, `quant.rs`, `merge.rs`) that the tests hold it to.
//!
//! Safety, once for the whole folder: the kernels (`unsafe fn`, private) are reached only
//! through the safe `pub fn`s of each file. Each of those takes a proof token from
//! [`crate::isa`] (so the CPU has the features the kernel was compiled for) and checks, with
//! `assert!`, that every buffer covers what the kernel reads or writes (so the raw loads and
//! stores stay in bounds). A failed check is a bug in the caller and panics.

use std::arch::x86_64::*;

use crate::isa::HasAvx2;
use crate::matmul::GroupInts;

pub mod bf16;
pub mod exact;
pub mod int8;
pub(crate) mod merge;
pub mod tiled;
pub mod wide;

// ---- safe entry points -------------------------------------------------------------------

/// One weight row as the exact kernels read it.
#[derive(Debug, Clone, Copy)]
pub enum RowCodes<'a> {
    /// A canonical 4-bit row (code k in byte k/2); activations go in [`exact::permute_x_nib`] order.
    Nib(&'a [u8]),
    /// One code per byte, natural order.
    Bytes(&'a [u8]),
}

impl<'a> RowCodes<'a> {
    /// `Nib(row)` for a canonical 4-bit row, else `Bytes(row)`.
    pub fn new(nibbles: bool, row: &'a [u8]) -> Self {
        if nibbles {
            RowCodes::Nib(row)
        } else {
            RowCodes::Bytes(row)
        }
    }

    /// Whether the row holds codes [0, cols).
    fn holds(&self, cols: usize) -> bool {
        match self {
            RowCodes::Nib(r) => r.len().checked_mul(2).is_some_and(|c| c >= cols),
            RowCodes::Bytes(r) => r.len() >= cols,
        }
    }

    fn ptr(&self) -> *const u8 {
        match self {
            RowCodes::Nib(r) | RowCodes::Bytes(r) => r.as_ptr(),
        }
    }
}

/// `Some(l1 * g)` when groups [l0, l1) of size `g` are a valid range (l0 <= l1, no overflow).
fn range_end(g: usize, (l0, l1): (usize, usize)) -> usize {
    assert!(l0 <= l1, "group range ({l0}, {l1})");
    l1.checked_mul(g).expect("group range end overflows")
}

/// Asks for the cache lines of `v` ahead of use (a hint, nothing is read).
#[inline]
pub fn prefetch<T>(v: &[T]) {
    let p = v.as_ptr() as *const i8;
    for off in (0..std::mem::size_of_val(v)).step_by(64) {
        // SAFETY: SSE is part of x86-64, and a prefetch never faults; the address lies
        // inside `v` besides.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
    }
}

/// Σ a[l] · b[l] over the shorter of the two.
#[inline]
pub fn dot(_: HasAvx2, a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the token proves AVX2+FMA; `dot_avx2` reads min(a.len(), b.len()) of each.
    unsafe { dot_avx2(a, b) }
}

/// f16 bits -> f32, over the shorter of the two.
#[inline]
pub fn f16_to_f32(_: HasAvx2, src: &[u16], dst: &mut [f32]) {
    // SAFETY: the token proves AVX2+FMA+F16C; the kernel touches min(src.len(), dst.len()).
    unsafe { f16_to_f32_avx2(src, dst) }
}

/// Factored group parameters of whole factors: `out[i] = f32(factors[i / per]) · ints[i]`
/// for `factors.len()` factors of `per` groups each; `per % 8 == 0`, `ints` and `out` hold
/// `factors.len() · per` values. Signed (`i8`) or unsigned (`u8`) integers.
pub fn factored_params(_: HasAvx2, ints: GroupInts<'_>, factors: &[u16], per: usize, out: &mut [f32]) {
    let len = factors.len().checked_mul(per).expect("factored parameters: length overflows");
    assert!(per > 0 && per.is_multiple_of(8) && ints.len() >= len && out.len() >= len);
    // SAFETY: the token proves AVX2+F16C; the assert covers `len` integers and outputs, read
    // and written 8 at a time within each factor's `per`.
    unsafe { factored_params_avx2(ints, factors, per, out) }
}

/// Unpacks the leading whole groups of eight `bits`-bit codes (`bits` in 2, 3, 5, 6; a group
/// is `bits` bytes) that it can read as 8-byte words inside `packed`, 32 codes per step;
/// returns how many codes it wrote (a multiple of 32), the rest is the caller's.
pub fn unpack_groups(_: HasAvx2, packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
    assert!(matches!(bits, 2 | 3 | 5 | 6));
    // SAFETY: the token proves AVX2; the kernel loads 8 bytes at g·bits only while that
    // stays inside `packed`, and stores 32 codes only while they fit in `out`.
    unsafe { unpack_groups_avx2(packed, bits as usize, out) }
}

/// Dequantizes one row: out[k] = s[l]·q[k] + m[l] for the L = `scales.len()` groups of `g`
/// codes. `g % 8 == 0`.
pub fn dequant_row(_: HasAvx2, row: RowCodes<'_>, scales: &[f32], offsets: &[f32], g: usize, out: &mut [f32]) {
    let end = range_end(g, (0, scales.len()));
    assert!(g > 0 && g.is_multiple_of(8) && offsets.len() >= scales.len() && out.len() >= end && row.holds(end));
    // SAFETY: the token proves AVX2+FMA; the asserts cover the row's codes and `out` up to
    // L*g, in steps of 8 that divide g.
    unsafe {
        match row {
            RowCodes::Nib(r) => dequant_row_nib(r, scales, offsets, g, out),
            RowCodes::Bytes(r) => dequant_row_bytes(r, scales, offsets, g, out),
        }
    }
}

// ---- shared kernels -------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX2 and FMA are available.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut j = 0;
    while j + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), acc);
        j += 8;
    }
    let mut s = hsum(acc);
    while j < n {
        s += a[j] * b[j];
        j += 1;
    }
    s
}

/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32_avx2(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut j = 0;
    while j + 8 <= n {
        let h = _mm_loadu_si128(src.as_ptr().add(j) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(j), _mm256_cvtph_ps(h));
        j += 8;
    }
    while j < n {
        dst[j] = half::f16::from_bits(src[j]).to_f32();
        j += 1;
    }
}

/// Dequantizes a canonical 4-bit row (natural order): out[k] = s·q[k] + m. Eight codes are
/// one u32 broadcast to all lanes and shifted by 0, 4, .., 28.
///
/// # Safety
/// AVX2 and FMA are available; `packed` holds L·g/2 bytes and `out` L·g values
/// (L = `scales.len()`); `g % 8 == 0`.
/// # Safety
/// AVX2 is available; `bits` in 2..=7.
#[target_feature(enable = "avx2")]
unsafe fn unpack_groups_avx2(packed: &[u8], b: usize, out: &mut [u8]) -> usize {
    // A group's 8 codes are the low 8·b bits of a little-endian u64 read at g·b: shifted by
    // 0, 2b, 4b, 6b in the four 64-bit lanes, each lane's two codes go to its two 32-bit
    // halves; four groups are then narrowed to 32 bytes in order.
    let mask = _mm256_set1_epi64x((1i64 << b) - 1);
    let b64 = b as i64;
    let shifts = _mm256_setr_epi64x(0, 2 * b64, 4 * b64, 6 * b64);
    let by_b = _mm_cvtsi32_si128(b as i32);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let (p, o) = (packed.as_ptr(), out.as_mut_ptr());
    let mut g = 0;
    while (g + 4) * 8 <= out.len() && (g + 3) * b + 8 <= packed.len() {
        let mut v = [_mm256_setzero_si256(); 4];
        for (t, lane) in v.iter_mut().enumerate() {
            let word = (p.add((g + t) * b) as *const u64).read_unaligned();
            let a = _mm256_srlv_epi64(_mm256_set1_epi64x(word as i64), shifts);
            let low = _mm256_and_si256(a, mask);
            let high = _mm256_and_si256(_mm256_srl_epi64(a, by_b), mask);
            *lane = _mm256_or_si256(low, _mm256_slli_epi64::<32>(high));
        }
        // packus works within 128-bit halves: half 0 ends up with codes 0-3 of each group,
        // half 1 with codes 4-7; the dword permutation restores group order.
        let bytes = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_packus_epi32(v[2], v[3]));
        _mm256_storeu_si256(o.add(g * 8) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
        g += 4;
    }
    g * 8
}

/// # Safety
/// AVX2 and F16C are available; `ints` and `out` hold `factors.len() · per` values, `per % 8 == 0`.
#[target_feature(enable = "avx2,f16c")]
unsafe fn factored_params_avx2(ints: GroupInts<'_>, factors: &[u16], per: usize, out: &mut [f32]) {
    let o = out.as_mut_ptr();
    for (j, &h) in factors.iter().enumerate() {
        let f = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))));
        for t in (j * per..(j + 1) * per).step_by(8) {
            let q = match ints {
                GroupInts::U8(v) => _mm256_cvtepu8_epi32(_mm_loadl_epi64(v.as_ptr().add(t) as *const __m128i)),
                GroupInts::I8(v) => _mm256_cvtepi8_epi32(_mm_loadl_epi64(v.as_ptr().add(t) as *const __m128i)),
            };
            _mm256_storeu_ps(o.add(t), _mm256_mul_ps(f, _mm256_cvtepi32_ps(q)));
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dequant_row_nib(packed: &[u8], scales: &[f32], offsets: &[f32], g: usize, out: &mut [f32]) {
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let mask = _mm256_set1_epi32(0xF);
    let (p, o) = (packed.as_ptr(), out.as_mut_ptr());
    for l in 0..scales.len() {
        let s = _mm256_set1_ps(scales[l]);
        let m = _mm256_set1_ps(offsets[l]);
        let mut j = l * g;
        while j < (l + 1) * g {
            let word = _mm256_set1_epi32((p.add(j / 2) as *const i32).read_unaligned());
            let q = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask);
            _mm256_storeu_ps(o.add(j), _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, m));
            j += 8;
        }
    }
}

/// Dequantizes one row of byte codes (natural order): out[k] = s·q[k] + m.
///
/// # Safety
/// AVX2 and FMA are available; `codes` and `out` hold L·g values (L = `scales.len()`);
/// `g % 8 == 0`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dequant_row_bytes(codes: &[u8], scales: &[f32], offsets: &[f32], g: usize, out: &mut [f32]) {
    let (p, o) = (codes.as_ptr(), out.as_mut_ptr());
    for l in 0..scales.len() {
        let s = _mm256_set1_ps(scales[l]);
        let m = _mm256_set1_ps(offsets[l]);
        let mut j = l * g;
        while j < (l + 1) * g {
            let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(j) as *const __m128i));
            _mm256_storeu_ps(o.add(j), _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, m));
            j += 8;
        }
    }
}

/// How far ahead of the block being multiplied the small-M kernels (canonical int8, the
/// 512-bit f32 route of `x86/wide.rs`, the tiled layout's) ask for weight bytes (rows, and
/// tiles, are contiguous, so this runs on into the next ones). The hardware prefetcher
/// alone left the kernels waiting on loads: with layers streamed from DRAM this cut the
/// M = 1 time by a fifth (canonical int8, 4096 x 14336), by 13-29% (f32 route, 4096 x 4096)
/// and by a third (tiled). The address may lie past the end of the buffer: it is formed
/// with `wrapping_add` and only hinted, never read.
pub(crate) const PREFETCH_AHEAD: usize = 4096;
