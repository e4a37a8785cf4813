//! The int8-activation route's kernels (`matmul/int8.rs`): AVX2 `maddubs` and AVX-512 VNNI
//! `vpdpbusd` on 256-bit vectors. Safety as in `x86/mod.rs`: reached only through the safe
//! entry points, which take the proof tokens and assert the buffer sizes.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{hsum, PREFETCH_AHEAD};
use crate::isa::{HasAvx2, HasAvx512Vnni};

// ---- safe entry points -------------------------------------------------------------------

/// Checks the buffers of an int8 row kernel (see `matmul::int8::int8_rows_scalar` for their
/// meaning).
fn check_int8(row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, m: usize) {
    assert!(matches!(block, 32 | 64 | 128) && k.is_multiple_of(block));
    assert!(row.len() >= k / 2);
    assert!(m.checked_mul(k).is_some_and(|n| q.len() >= n) && coef.len() >= m * (k / block));
}

/// SIMD twin of `matmul::int8::int8_rows_scalar` (AVX2 `maddubs`).
pub fn int8_rows(_: HasAvx2, row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    check_int8(row, q, coef, k, block, out.len());
    // SAFETY: the token proves AVX2+FMA; `check_int8` covers every load (the row's k/2
    // bytes, M·k activations in `matmul::int8::q_offset` order, M·(k/block) coefficients).
    unsafe { int8_rows_avx2(row, q, coef, k, block, out) }
}

/// SIMD twin of `matmul::int8::int8_rows_scalar` (AVX-512 VNNI `vpdpbusd` on 256-bit vectors).
pub fn int8_rows_vnni(_: HasAvx512Vnni, row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    check_int8(row, q, coef, k, block, out.len());
    // SAFETY: the token proves AVX2+FMA+AVX-512 F/VL/VNNI; `check_int8` covers every load.
    unsafe { int8_rows_vnni_avx512(row, q, coef, k, block, out) }
}

// ---- kernels ---------------------------------------------------------------------------

/// The 32 codes of 4-bit block `b` of a row as bytes: the 16 low nibbles (even codes) in
/// the lower 128 bits, the 16 high nibbles (odd codes) in the upper, matching the order
/// `matmul::int8::quantize_acts` stores activations in.
///
/// # Safety
/// AVX2 is available and the row holds bytes [16·b, 16·b + 16).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn nib_block(row: *const u8, b: usize) -> __m256i {
    let t = _mm_loadu_si128(row.add(b * 16) as *const __m128i);
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(t), t), _mm256_set1_epi8(0x0F))
}

/// acc + Σ over a 32-code block of codes (u8, ≤ 15) × int8 activations, as 8 i32 partial
/// sums. maddubs cannot saturate: a pair sums to at most 2 · 15 · 127.
///
/// # Safety
/// AVX2 is available and `x` holds 32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_idot(acc: __m256i, w: __m256i, x: *const i8) -> __m256i {
    let p = _mm256_maddubs_epi16(w, _mm256_loadu_si256(x as *const __m256i));
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
}

/// [`block_idot`] with AVX-512 VNNI on 256-bit vectors: one `vpdpbusd` does it all.
///
/// # Safety
/// AVX2 and AVX-512 F/VL/VNNI are available and `x` holds 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
unsafe fn block_idot_vnni(acc: __m256i, w: __m256i, x: *const i8) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, _mm256_loadu_si256(x as *const __m256i))
}

/// Defines `$rows`, one 4-bit weight row against the M = `out.len()` int8 activation rows
/// (`q` laid out as `matmul::int8::q_offset` says; `coef` (M, K/block) the per-block scale
/// products): sets out[i] = Σ_a coef[i,a] · (integer dot of activation block a), the SIMD twin
/// of `matmul::int8::int8_rows_scalar`, with `$idot` accumulating one 32-code block. Rows go in
/// blocks of up to 8; each 32-code block is expanded once and feeds every row; the SUB =
/// block/32 integer sums of an activation block stay in i32 and are converted once. Up to 4
/// rows, activation blocks alternate between two float accumulator sets (FMA latency).
///
/// Safety of the generated functions: the features are available and the buffers are as
/// `check_int8` checks them.
macro_rules! int8_kernel {
    ($rows:ident, $rows_sub:ident, $block_rows:ident, $features:literal, $idot:ident) => {
        /// # Safety
        /// See the macro.
        #[target_feature(enable = $features)]
        unsafe fn $rows(row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
            match block / 32 {
                1 => $rows_sub::<1>(row, q, coef, k, out),
                2 => $rows_sub::<2>(row, q, coef, k, out),
                _ => $rows_sub::<4>(row, q, coef, k, out),
            }
        }

        /// # Safety
        /// See the macro.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $rows_sub<const SUB: usize>(row: &[u8], q: &[i8], coef: &[f32], k: usize, out: &mut [f32]) {
            let m = out.len();
            let (rp, qp, cp) = (row.as_ptr(), q.as_ptr(), coef.as_ptr());
            let mut i0 = 0;
            while i0 < m {
                let mb = (m - i0).min(8);
                let o = &mut out[i0..i0 + mb];
                match mb {
                    1 => $block_rows::<1, SUB>(rp, qp, cp, m, k, i0, o),
                    2 => $block_rows::<2, SUB>(rp, qp, cp, m, k, i0, o),
                    3 => $block_rows::<3, SUB>(rp, qp, cp, m, k, i0, o),
                    4 => $block_rows::<4, SUB>(rp, qp, cp, m, k, i0, o),
                    5 => $block_rows::<5, SUB>(rp, qp, cp, m, k, i0, o),
                    6 => $block_rows::<6, SUB>(rp, qp, cp, m, k, i0, o),
                    7 => $block_rows::<7, SUB>(rp, qp, cp, m, k, i0, o),
                    _ => $block_rows::<8, SUB>(rp, qp, cp, m, k, i0, o),
                }
                i0 += mb;
            }
        }

        /// # Safety
        /// See the macro; rows [i0, i0 + MB) are below m.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $block_rows<const MB: usize, const SUB: usize>(
            row: *const u8,
            q: *const i8,
            coef: *const f32,
            m: usize,
            k: usize,
            i0: usize,
            out: &mut [f32],
        ) {
            let (blocks, na) = (k / 32, k / (32 * SUB));
            let pairs = blocks / 2;
            let mut acc0 = [_mm256_setzero_ps(); MB];
            let mut acc1 = [_mm256_setzero_ps(); MB];
            let mut a = 0;
            if SUB == 1 && MB <= 4 {
                // One 32-code block per scale: two blocks per step, constant strides, no
                // branches (the general loop below measured 1.5x slower here at M = 1).
                let zero = _mm256_setzero_si256();
                while a + 2 <= na {
                    if a % 4 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(a * 16 + PREFETCH_AHEAD) as *const i8);
                    }
                    let x = q.add((a / 2) * m * 64 + i0 * 64);
                    let (w0, w1) = (nib_block(row, a), nib_block(row, a + 1));
                    let c = coef.add(i0 * na + a);
                    for i in 0..MB {
                        let (c0, c1) = (_mm256_broadcast_ss(&*c.add(i * na)), _mm256_broadcast_ss(&*c.add(i * na + 1)));
                        let (f0, f1) = ($idot(zero, w0, x.add(i * 64)), $idot(zero, w1, x.add(i * 64 + 32)));
                        acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(f0), c0, acc0[i]);
                        acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(f1), c1, acc1[i]);
                    }
                    a += 2;
                }
            }
            // Blocks in full pairs: row r's block b at (b/2)·m·64 + r·64 + (b%2)·32. Only
            // SUB = 1 can leave an odd last block (blocks of 64 or 128 come in pairs).
            let paired = if SUB == 1 { 2 * pairs } else { na };
            let xs = q.add(i0 * 64);
            while a < paired {
                let mut isum = [_mm256_setzero_si256(); MB];
                for j in 0..SUB {
                    let b = a * SUB + j;
                    if b % 4 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * 16 + PREFETCH_AHEAD) as *const i8);
                    }
                    let x = xs.add((b / 2) * m * 64 + (b % 2) * 32);
                    let w = nib_block(row, b);
                    for i in 0..MB {
                        isum[i] = $idot(isum[i], w, x.add(i * 64));
                    }
                }
                let c = coef.add(i0 * na + a);
                if MB <= 4 && a % 2 == 1 {
                    for i in 0..MB {
                        let ci = _mm256_broadcast_ss(&*c.add(i * na));
                        acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), ci, acc1[i]);
                    }
                } else {
                    for i in 0..MB {
                        let ci = _mm256_broadcast_ss(&*c.add(i * na));
                        acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), ci, acc0[i]);
                    }
                }
                a += 1;
            }
            if a < na {
                // The odd last 32-code block (SUB = 1): row r's at pairs·m·64 + r·32.
                let (w, x, c) = (nib_block(row, a), q.add(pairs * m * 64 + i0 * 32), coef.add(i0 * na + a));
                for i in 0..MB {
                    let isum = $idot(_mm256_setzero_si256(), w, x.add(i * 32));
                    let ci = _mm256_broadcast_ss(&*c.add(i * na));
                    acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ci, acc0[i]);
                }
            }
            for i in 0..MB {
                out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i]));
            }
        }
    };
}

int8_kernel!(int8_rows_avx2, int8_rows_sub, int8_block_rows, "avx2,fma", block_idot);
int8_kernel!(
    int8_rows_vnni_avx512,
    int8_rows_sub_vnni,
    int8_block_rows_vnni,
    "avx2,fma,avx512f,avx512vl,avx512vnni",
    block_idot_vnni
);
