//! The AVX-512 merge (`merge.rs`): offsets are converted from and to their storage dtype in
//! registers (no f32 scratch pass), with the arithmetic of `merge::merge_rows` (its scalar
//! twin). Reached only through `OffsetElem::merge_rows_avx512`, whose caller proves AVX-512 F.

use core::arch::x86_64::*;

use half::{bf16, f16};

/// 16 offsets of a storage dtype to and from one f32 vector, rounding as torch's casts
/// (and `half`'s conversions, which the scalar path uses) do.
pub(crate) trait Lanes: Copy + Default {
    /// # Safety
    /// `p` is valid for reading 16 values; the CPU has AVX-512 F.
    unsafe fn load16(p: *const Self) -> __m512;
    /// # Safety
    /// `p` is valid for writing 16 values; the CPU has AVX-512 F.
    unsafe fn store16(p: *mut Self, v: __m512);
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f32, v: __m512) {
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_ps(p, v) }
    }
}

impl Lanes for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller's contract (16 f16 are the 32 bytes read).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f16, v: __m512) {
        // Round to nearest even, as F16C (which `half` uses) does.
        // SAFETY: the caller's contract.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_storeu_si256(p as *mut __m256i, h)
        }
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller's contract; bf16 is the high half of an f32.
        unsafe {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }
    #[inline(always)]
    unsafe fn store16(p: *mut bf16, v: __m512) {
        // Round to nearest even by adding 0x7fff plus the kept lowest bit; a NaN keeps
        // its high bits with the quiet bit set (what `half::bf16::from_f32` gives).
        // SAFETY: the caller's contract.
        unsafe {
            let x = _mm512_castps_si512(v);
            let hi = _mm512_srli_epi32::<16>(x);
            let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
            let rounded =
                _mm512_srli_epi32::<16>(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
            let bits = _mm512_mask_blend_epi32(nan, rounded, quiet);
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(bits))
        }
    }
}

/// One row's columns l..l + 16·V: sums over the rank in V registers, then
/// fma(factor, s, m) stored in the row's dtype. `tail` < 16 marks a last, partial
/// vector (V = 1), staged through a 16-value buffer so nothing past the row is touched.
///
/// # Safety
/// AVX-512 F; `src` and `out` hold `groups` values; l + 16·V ≤ groups unless `tail`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn merge_cols<T: Lanes, const V: usize>(
    src: *const T,
    out: *mut T,
    brow: &[f32],
    a: &[f32],
    groups: usize,
    l: usize,
    tail: Option<usize>,
    factor: __m512,
) {
    // SAFETY: loads of `a` stay within row t (masked on a tail); offsets by the contract.
    unsafe {
        let mask: __mmask16 = match tail {
            Some(rem) => ((1u32 << rem) - 1) as __mmask16,
            None => 0xffff,
        };
        let mut acc = [_mm512_setzero_ps(); V];
        for (t, &bt) in brow.iter().enumerate() {
            let bt = _mm512_set1_ps(bt);
            let at = a.as_ptr().add(t * groups + l);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(bt, _mm512_maskz_loadu_ps(mask, at.add(16 * v)), *acc);
            }
        }
        match tail {
            None => {
                for (v, acc) in acc.iter().enumerate() {
                    let m = T::load16(src.add(l + 16 * v));
                    T::store16(out.add(l + 16 * v), _mm512_fmadd_ps(factor, *acc, m));
                }
            }
            Some(rem) => {
                let mut buf = [T::default(); 16];
                core::ptr::copy_nonoverlapping(src.add(l), buf.as_mut_ptr(), rem);
                let m = T::load16(buf.as_ptr());
                T::store16(buf.as_mut_ptr(), _mm512_fmadd_ps(factor, acc[0], m));
                core::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(l), rem);
            }
        }
    }
}

/// `rows` rows: out[i, :] = fma(factor, Σ_t b[i, t] a[t, :], src[i, :]); `src` may be
/// `out` itself (each vector is read before it is written).
///
/// # Safety
/// AVX-512 F; `src` and `out` hold rows × groups values, `b` rows × rank, `a` rank × groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn merge_rows<T: Lanes>(
    src: *const T,
    out: *mut T,
    rows: usize,
    b: &[f32],
    a: &[f32],
    rank: usize,
    groups: usize,
    factor: f32,
) {
    let factor = _mm512_set1_ps(factor);
    for (i, brow) in b.chunks_exact(rank).take(rows).enumerate() {
        // SAFETY: row i lies within `src` and `out` by the contract; columns as checked.
        unsafe {
            let (s, o) = (src.add(i * groups), out.add(i * groups));
            let mut l = 0;
            while l + 128 <= groups {
                merge_cols::<T, 8>(s, o, brow, a, groups, l, None, factor);
                l += 128;
            }
            while l + 16 <= groups {
                merge_cols::<T, 1>(s, o, brow, a, groups, l, None, factor);
                l += 16;
            }
            if l < groups {
                merge_cols::<T, 1>(s, o, brow, a, groups, l, Some(groups - l), factor);
            }
        }
    }
}
