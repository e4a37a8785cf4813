//! SIMD kernels of the tiled int8 layout (`matmul/tiled.rs`): AVX2 (`vpmaddubsw` +
//! `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd` on 256-bit vectors). Safety as in `x86/mod.rs`:
//! reached only through the safe entry point, which takes the proof tokens and asserts the
//! buffer sizes.

#![allow(clippy::too_many_arguments)]

use std::arch::x86_64::*;

use super::PREFETCH_AHEAD;
use crate::isa::{HasAvx2, HasAvx512Vnni};

/// Activation rows one pass over a tile takes at most (registers: 32 with AVX-512 VL).
const PASS_ROWS_VNNI: usize = 8;
/// With AVX2 alone there are 16 vector registers.
const PASS_ROWS_AVX2: usize = 4;

/// One tile (its L records of `matmul::tiled::record_bytes(g)` bytes) against M activation
/// rows: `q` (M, K) int8, `d` (M, K/block) scales, `xsum` (M, L) exact group sums; writes
/// out[j·M + i] = y[i, row j of the tile]. SIMD twin of `matmul::tiled::tile_scalar`.
pub fn tile_rows(
    _: HasAvx2,
    vnni: Option<HasAvx512Vnni>,
    tile: &[u8],
    q: &[i8],
    d: &[f32],
    xsum: &[f32],
    m: usize,
    k: usize,
    g: usize,
    block: usize,
    out: &mut [f32],
) {
    assert!(g > 0 && g.is_multiple_of(32) && k.is_multiple_of(g) && matches!(block, 32 | 64 | 128));
    assert!(g.is_multiple_of(block));
    let (groups, na) = (k / g, k / block);
    assert!(tile.len() >= groups * (32 + 4 * g) && out.len() >= 8 * m);
    assert!(m.checked_mul(k).is_some_and(|n| q.len() >= n) && d.len() >= m * na && xsum.len() >= m * groups);
    let step = if vnni.is_some() { PASS_ROWS_VNNI } else { PASS_ROWS_AVX2 };
    let mut i0 = 0;
    while i0 < m {
        let mb = (m - i0).min(step);
        let mut acc = [[0f32; 8]; PASS_ROWS_VNNI];
        let (qp, dp, sp) = (q[i0 * k..].as_ptr(), d[i0 * na..].as_ptr(), xsum[i0 * groups..].as_ptr());
        // SAFETY: the token(s) prove the features; the asserts above cover every load: the
        // tile's L records, mb <= m - i0 rows of k int8 values, na scales and L sums from row
        // i0; `acc` holds mb <= 8 rows of 8 lanes.
        unsafe {
            macro_rules! call {
                ($kernel:ident, $mb:literal) => {
                    $kernel::<$mb>(tile.as_ptr(), qp, dp, sp, k, g, block, &mut acc)
                };
            }
            if vnni.is_some() {
                match mb {
                    1 => call!(tile_vnni, 1),
                    2 => call!(tile_vnni, 2),
                    3 => call!(tile_vnni, 3),
                    4 => call!(tile_vnni, 4),
                    5 => call!(tile_vnni, 5),
                    6 => call!(tile_vnni, 6),
                    7 => call!(tile_vnni, 7),
                    _ => call!(tile_vnni, 8),
                }
            } else {
                match mb {
                    1 => call!(tile_avx2, 1),
                    2 => call!(tile_avx2, 2),
                    3 => call!(tile_avx2, 3),
                    _ => call!(tile_avx2, 4),
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(mb) {
            for (j, &v) in a.iter().enumerate() {
                out[j * m + i0 + i] = v;
            }
        }
        i0 += mb;
    }
}

/// Σ over 4-byte lanes of u8 codes × i8 activations, added to `acc` (AVX2: the pair sums of
/// `maddubs` cannot saturate, 2 · 15 · 127 < 2^15).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn idot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(w, x);
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn idot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, x)
}

/// Defines one tile kernel for MB activation rows: per group, the 8 rows' scales and
/// offsets converted at once, the offsets' term as one FMA per activation row, then per
/// activation block the integer sums of 8 rows in the 8 lanes (two partial sums while
/// there are few rows, so the dot-product chains overlap), one conversion and one FMA.
macro_rules! tile_kernel {
    ($name:ident, $features:literal, $idot:ident) => {
        /// # Safety
        /// The features are available; `tile` holds L = k/g records, `q` MB rows of k int8
        /// values, `d` MB rows of k/block scales, `xsum` MB rows of L sums; g % block == 0.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $name<const MB: usize>(
            tile: *const u8,
            q: *const i8,
            d: *const f32,
            xsum: *const f32,
            k: usize,
            g: usize,
            block: usize,
            out: &mut [[f32; 8]; PASS_ROWS_VNNI],
        ) {
            let (groups, na, rec) = (k / g, k / block, 32 + 4 * g);
            let split = MB <= 4;
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); MB];
            for l in 0..groups {
                let r = tile.add(l * rec);
                // The record PREFETCH_AHEAD bytes on (this tile's or the next one's); at
                // M = 1 from DRAM, 2-8 KiB all cut the time by a third, 4 KiB the most.
                let mut o = 0;
                while o < rec {
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(PREFETCH_AHEAD + o) as *const i8);
                    o += 64;
                }
                let s8 = _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i));
                let m8 = _mm256_cvtph_ps(_mm_loadu_si128(r.add(16) as *const __m128i));
                for i in 0..MB {
                    acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(*xsum.add(i * groups + l)), acc[i]);
                }
                for a in 0..g / block {
                    let mut sa = [_mm256_setzero_si256(); MB];
                    let mut sb = [_mm256_setzero_si256(); MB];
                    for b in 0..block / 32 {
                        let bi = a * (block / 32) + b;
                        let cp = r.add(32 + bi * 128);
                        let col = l * g + bi * 32;
                        for c in 0..4 {
                            let v = _mm256_loadu_si256(cp.add(32 * c) as *const __m256i);
                            let lo = _mm256_and_si256(v, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                            for i in 0..MB {
                                let xp = q.add(i * k + col + 8 * c) as *const i32;
                                let x0 = _mm256_set1_epi32(xp.read_unaligned());
                                let x1 = _mm256_set1_epi32(xp.add(1).read_unaligned());
                                sa[i] = $idot(sa[i], lo, x0);
                                if split {
                                    sb[i] = $idot(sb[i], hi, x1);
                                } else {
                                    sa[i] = $idot(sa[i], hi, x1);
                                }
                            }
                        }
                    }
                    for i in 0..MB {
                        let isum = if split { _mm256_add_epi32(sa[i], sb[i]) } else { sa[i] };
                        let coef = _mm256_mul_ps(s8, _mm256_set1_ps(*d.add(i * na + l * (g / block) + a)));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), coef, acc[i]);
                    }
                }
            }
            for i in 0..MB {
                _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
            }
        }
    };
}

tile_kernel!(tile_avx2, "avx2,fma,f16c", idot_avx2);
tile_kernel!(tile_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", idot_vnni);
