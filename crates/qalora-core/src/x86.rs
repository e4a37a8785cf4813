//! AVX2 + FMA (+ F16C, + AVX-512 VNNI) kernels, compiled for any x86-64 and run only on a CPU
//! that has the features. Each has a scalar twin in `qmatmul.rs` / `quant.rs` / `q8.rs` that
//! the tests hold it to.
//!
//! Safety, once for the whole module: the kernels (`unsafe fn`, private) are reached only
//! through the safe `pub fn`s below. Each of those takes a proof token from
//! [`crate::isa`] (so the CPU has the features the kernel was compiled for) and checks, with
//! `assert!`, that every buffer covers what the kernel reads or writes (so the raw loads and
//! stores stay in bounds). A failed check is a bug in the caller and panics.
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

use crate::isa::{HasAvx2, HasAvx512Vnni};

// ---- safe entry points -------------------------------------------------------------------

/// One weight row as the exact kernels read it.
#[derive(Debug, Clone, Copy)]
pub enum RowCodes<'a> {
    /// A canonical 4-bit row (code k in byte k/2); activations go in [`permute_x_nib`] order.
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

/// Checks the buffers of an int8 row kernel (see `q8::int8_rows_scalar` for their meaning).
fn check_int8(row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, m: usize) {
    assert!(matches!(block, 32 | 64 | 128) && k.is_multiple_of(block));
    assert!(row.len() >= k / 2);
    assert!(m.checked_mul(k).is_some_and(|n| q.len() >= n) && coef.len() >= m * (k / block));
}

/// SIMD twin of `q8::int8_rows_scalar` (AVX2 `maddubs`).
pub fn int8_rows(_: HasAvx2, row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    check_int8(row, q, coef, k, block, out.len());
    // SAFETY: the token proves AVX2+FMA; `check_int8` covers every load (the row's k/2
    // bytes, M·k activations in `q8::q_offset` order, M·(k/block) coefficients).
    unsafe { int8_rows_avx2(row, q, coef, k, block, out) }
}

/// SIMD twin of `q8::int8_rows_scalar` (AVX-512 VNNI `vpdpbusd` on 256-bit vectors).
pub fn int8_rows_vnni(_: HasAvx512Vnni, row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    check_int8(row, q, coef, k, block, out.len());
    // SAFETY: the token proves AVX2+FMA+AVX-512 F/VL/VNNI; `check_int8` covers every load.
    unsafe { int8_rows_vnni_avx512(row, q, coef, k, block, out) }
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

/// Dequantizes a canonical 4-bit row (natural order): out[k] = s·q[k] + m. Eight codes are
/// one u32 broadcast to all lanes and shifted by 0, 4, .., 28.
///
/// # Safety
/// AVX2 and FMA are available; `packed` holds L·g/2 bytes and `out` L·g values
/// (L = `scales.len()`); `g % 8 == 0`.
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

// ---- int8-activation route (see `q8.rs`) -------------------------------------------------

/// The 32 codes of 4-bit block `b` of a row as bytes: the 16 low nibbles (even codes) in
/// the lower 128 bits, the 16 high nibbles (odd codes) in the upper, matching the order
/// `q8::quantize_acts` stores activations in.
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

/// How far ahead of the block being multiplied the small-M kernels (canonical int8, the
/// 512-bit f32 route of `x86_wide.rs`, the tiled layout's) ask for weight bytes (rows, and
/// tiles, are contiguous, so this runs on into the next ones). The hardware prefetcher
/// alone left the kernels waiting on loads: with layers streamed from DRAM this cut the
/// M = 1 time by a fifth (canonical int8, 4096 x 14336), by 13-29% (f32 route, 4096 x 4096)
/// and by a third (tiled). The address may lie past the end of the buffer: it is formed
/// with `wrapping_add` and only hinted, never read.
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// Defines `$rows`, one 4-bit weight row against the M = `out.len()` int8 activation rows
/// (`q` laid out as `q8::q_offset` says; `coef` (M, K/block) the per-block scale products):
/// sets out[i] = Σ_a coef[i,a] · (integer dot of activation block a), the SIMD twin of
/// `q8::int8_rows_scalar`, with `$idot` accumulating one 32-code block. Rows go in blocks of
/// up to 8; each 32-code block is expanded once and feeds every row; the SUB = block/32
/// integer sums of an activation block stay in i32 and are converted once. Up to 4 rows,
/// activation blocks alternate between two float accumulator sets (FMA latency).
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

// ---- bandwidth probe (see `probe.rs`) -----------------------------------------------------

/// XOR of the 64-bit words of `c` (bytes past the last whole word ignored): the SIMD twin of
/// `probe::xor_words_scalar`, four 32-byte loads in flight.
pub fn xor_words(_: HasAvx2, c: &[u8]) -> u64 {
    // SAFETY: the token proves AVX2; the kernel reads only inside `c`.
    unsafe { xor_words_avx2(c) }
}

/// # Safety
/// AVX2 is available.
#[target_feature(enable = "avx2")]
unsafe fn xor_words_avx2(c: &[u8]) -> u64 {
    let p = c.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut j = 0;
    while j + 128 <= c.len() {
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm256_xor_si256(*a, _mm256_loadu_si256(p.add(j + 32 * t) as *const __m256i));
        }
        j += 128;
    }
    let v = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    let mut words = [0u64; 4];
    _mm256_storeu_si256(words.as_mut_ptr() as *mut __m256i, v);
    words.iter().fold(crate::probe::xor_words_scalar(&c[j..]), |a, w| a ^ w)
}
