//! bfloat16 in the CPU core, two ways:
//!
//! - **bf16 tiles for training.** Under `torch.autocast("cpu", torch.bfloat16)` the frozen
//!   base runs as bf16 GEMMs on dequantized bf16 tiles: [`dequantize_rows_bf16`] writes
//!   bf16(s·q + m) (one f32 FMA, then one rounding to nearest even) straight from the packed
//!   codes, with no f32 tile in between.
//! - **The bf16-activation route** for small batches ([`qmatmul_bf16_with`]): the activations
//!   are rounded to bf16 (to nearest even, as torch's own int4 kernel does), each group's
//!   Σ q·x is accumulated in f32 (the products are exact: a code times a bf16 value fits in
//!   an f32), and the offsets' term uses the group sums of the *unrounded* x. So per output
//!
//!   ```text
//!   y = Σ_l s_l · Σ_{k∈l} q_k · bf16(x_k) + m_l · Σ_{k∈l} x_k
//!   ```
//!
//!   and |y − y_exact| ≤ Σ_k |s·q_k| · |x_k − bf16(x_k)| ≤ 2^-8 Σ_k |s·q_k·x_k| (plus f32
//!   accumulation rounding). The products run as f32 FMAs on the rounded x: with AVX-512 the
//!   wide route's kernel (`matmul/wide.rs`), elsewhere the exact route's kernels (AVX2, or the
//!   scalar twin), whose offsets' term is then moved onto the exact sums. (`vdpbf16ps` was
//!   tried: on the Xeon the benchmarks ran on it takes about five times as long as an f32
//!   FMA per instruction, so it multiplies fewer values per second; see benches/RESULTS.md.)
//!
//! Hardware conversions flush f32 denormals (below 1.2e-38) to zero; the scalar conversion
//! [`bf16_bits`] keeps them. Nothing else differs.

use super::exact::qmatmul_with;
use super::{check_call, dot_isa, group_sums, GroupParams};
use crate::error::Result;
use crate::isa::Isa;
use crate::layout::QuantLayout;
use crate::pack::unpack_row;

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN).
#[inline]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to bf16, as f32.
#[inline]
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits((bf16_bits(v) as u32) << 16)
}

/// Scalar twin of the SIMD conversions: dst[i] = bf16_bits(src[i]).
pub fn f32_to_bf16_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bf16_bits(v);
    }
}

/// [`f32_to_bf16_scalar`] compiled for AVX2 (the loop vectorizes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn f32_to_bf16_avx2(src: &[f32], dst: &mut [u16]) {
    f32_to_bf16_scalar(src, dst)
}

/// f32 -> bf16 bits with the given instruction set.
pub fn f32_to_bf16_with(isa: Isa, src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx512_bf16() {
        return crate::x86::bf16::f32_to_bf16(cpu, src, dst);
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: `avx2()` proves the CPU has AVX2 (the body is safe code, bounds-checked).
        return unsafe { f32_to_bf16_avx2(src, dst) };
    }
    let _ = isa;
    f32_to_bf16_scalar(src, dst)
}

/// Scratch of one worker of [`dequantize_rows_bf16`].
pub struct DequantScratch {
    s: Vec<f32>,
    m: Vec<f32>,
    codes: Vec<u8>,
    row: Vec<f32>,
}

impl DequantScratch {
    pub fn new(layout: &QuantLayout) -> Self {
        let groups = layout.groups();
        Self { s: vec![0f32; groups], m: vec![0f32; groups], codes: vec![0u8; layout.k], row: vec![0f32; layout.k] }
    }
}

/// Dequantizes weight rows [row0, row0 + rows) to bf16 bits, row-major into `out`
/// (rows·K values): out = bf16(s·q + m). `layout.n` is the layer's row count; `scratch`
/// from [`DequantScratch::new`] for this layout.
pub fn dequantize_rows_bf16(
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    (row0, rows): (usize, usize),
    out: &mut [u16],
    scratch: &mut DequantScratch,
    isa: Isa,
) -> Result<()> {
    params.check(packed.len(), &layout)?;
    let (k, g, groups) = (layout.k, layout.group_size, layout.groups());
    if row0.checked_add(rows).is_none_or(|end| end > layout.n) || out.len() != rows * k {
        return Err(crate::error::KernelError::internal("dequantize_rows_bf16: rows out of range"));
    }
    let rb = layout.row_bytes();
    let DequantScratch { s, m, codes, row: wrow } = scratch;
    for (i, o) in out.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
        let r = row0 + i;
        params.row_into(r, (0, groups), isa, s, m);
        let prow = &packed[r * rb..(r + 1) * rb];
        #[cfg(target_arch = "x86_64")]
        if let (Some(cpu), true) = (isa.avx512_bf16(), g.is_multiple_of(16)) {
            use crate::x86::RowCodes;
            let src = match layout.bits {
                4 => RowCodes::Nib(prow),
                8 => RowCodes::Bytes(prow),
                bits => {
                    unpack_row(prow, bits, codes);
                    RowCodes::Bytes(codes)
                }
            };
            crate::x86::bf16::dequant_row_bf16(cpu, src, s, m, g, o);
            continue;
        }
        // Other instruction sets: the f32 row (the exact route's dequantization), rounded.
        let one_row = QuantLayout { n: 1, ..layout };
        if isa.avx2().is_some() {
            crate::quant::dequantize_row(prow, s, m, one_row, 0, codes, wrow);
        } else {
            crate::quant::dequantize_row_scalar(prow, s, m, one_row, 0, codes, wrow);
        }
        f32_to_bf16_with(isa, wrow, o);
    }
    Ok(())
}

/// Whether [`qmatmul_bf16_with`] rounds the activations for this layout: 4-bit weights with
/// a group size that is a multiple of 32. Other layouts are computed exactly.
pub fn supported(layout: &QuantLayout) -> bool {
    layout.bits == 4 && layout.group_size.is_multiple_of(32)
}

/// x (M rows of K, K % 32 == 0) as bf16 bits, each 32-block reordered to
/// [x0, x2, .., x30, x1, x3, .., x31]: the order in which the AVX-512 BF16 kernel takes the
/// low and high nibbles of 16 packed bytes.
pub fn pair_order(x: &[f32], isa: Isa) -> Vec<u16> {
    let mut perm = vec![0f32; x.len()];
    for (o, c) in perm.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for t in 0..16 {
            o[t] = c[2 * t];
            o[16 + t] = c[2 * t + 1];
        }
    }
    let mut out = vec![0u16; x.len()];
    f32_to_bf16_with(isa, &perm, &mut out);
    out
}

/// y = x W~^T with activations rounded to bf16 (see the module docs for what that changes);
/// layouts outside [`supported`] are computed exactly.
pub fn qmatmul_bf16_with(
    x: &[f32],
    m: usize,
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    if !supported(&layout) {
        return qmatmul_with(x, m, packed, params, layout, out, isa);
    }
    check_call(x, m, packed, &params, &layout, out)?;
    if m == 0 {
        return Ok(());
    }
    let QuantLayout { n, k, group_size: g, .. } = layout;
    // The offsets' term on the exact x.
    let xsum = group_sums(x, m, k, g);
    let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = super::wide::route(isa, &layout) {
        super::wide::qmatmul_wide(cpu, &xr, &xsum, m, packed, params, layout, out, isa);
        super::dense_rows_where_needed(x, m, packed, params, layout, isa, out);
        return Ok(());
    }
    // Other instruction sets: the exact route on the rounded x, whose offsets' term (on the
    // rounded sums) is then moved onto the exact sums.
    qmatmul_with(&xr, m, packed, params, layout, out, isa)?;
    let groups = layout.groups();
    let diff: Vec<f32> = xsum.iter().zip(group_sums(&xr, m, k, g)).map(|(a, b)| a - b).collect();
    let (mut s, mut mm) = (vec![0f32; groups], vec![0f32; groups]);
    for row in 0..n {
        params.row_into(row, (0, groups), isa, &mut s, &mut mm);
        for i in 0..m {
            out[i * n + row] += dot_isa(&mm, &diff[i * groups..(i + 1) * groups], isa);
        }
    }
    // Non-finite or huge rows: a dense matmul's results, as on every other route.
    super::dense_rows_where_needed(x, m, packed, params, layout, isa, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_codes, random_f32, SplitMix};

    #[test]
    fn bf16_rounding_is_nearest_even() {
        for (v, want) in [
            (1.0f32, 0x3F80u16),
            (-2.0, 0xC000),
            (f32::from_bits(0x3F80_8000), 0x3F80), // tie, even stays
            (f32::from_bits(0x3F81_8000), 0x3F82), // tie, odd rounds up
            (f32::from_bits(0x3F80_8001), 0x3F81),
            (f32::MAX, 0x7F80), // rounds up to infinity
            (f32::INFINITY, 0x7F80),
        ] {
            assert_eq!(bf16_bits(v), want, "{v:e}");
        }
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        let mut r = SplitMix::new(3);
        let src: Vec<f32> = (0..1037).map(|_| r.uniform() * 1e3).collect();
        let mut want = vec![0u16; src.len()];
        f32_to_bf16_scalar(&src, &mut want);
        for (v, &b) in src.iter().zip(&want) {
            let back = f32::from_bits((b as u32) << 16) as f64;
            assert!((back - *v as f64).abs() <= (*v as f64).abs() * 2f64.powi(-8), "{v}");
        }
        for isa in Isa::available() {
            let mut got = vec![0u16; src.len()];
            f32_to_bf16_with(isa, &src, &mut got);
            assert_eq!(got, want, "{isa:?}");
        }
    }

    fn f16_params(n: usize, groups: usize, rng: &mut SplitMix) -> (Vec<u16>, Vec<u16>, Vec<f32>, Vec<f32>) {
        let s16: Vec<u16> = random_f32(n * groups, rng.next_u64())
            .iter()
            .map(|v| half::f16::from_f32(0.01 + 0.1 * v.abs()).to_bits())
            .collect();
        let m16: Vec<u16> =
            random_f32(n * groups, rng.next_u64()).iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
        let s32 = s16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
        let m32 = m16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
        (s16, m16, s32, m32)
    }

    /// Every instruction set, both parameter dtypes, every bit width and odd shapes against a
    /// float64 reference: each value within half a bf16 step of s·q + m, and the SIMD twins
    /// within one bf16 step of the scalar one (they may round s·q + m once or twice in f32).
    #[test]
    fn dequantize_rows_bf16_matches_f64_reference() {
        let mut rng = SplitMix::new(17);
        for bits in [2u32, 3, 4, 8] {
            for &(n, k, g) in &[(5usize, 64usize, 16usize), (3, 96, 32), (4, 40, 8), (2, 256, 128), (3, 48, 24)] {
                if bits == 3 && g % 8 != 0 {
                    continue;
                }
                let layout = QuantLayout::new(n, k, bits, g).unwrap();
                let groups = k / g;
                let codes = random_codes(n * k, bits, rng.next_u64());
                let mut p = vec![0u8; layout.packed_len()];
                crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
                let (s16, m16, s32, m32) = f16_params(n, groups, &mut rng);
                let mut scalar = vec![0u16; 0];
                for isa in Isa::available() {
                    for params in [
                        GroupParams::F32 { scales: &s32, offsets: &m32 },
                        GroupParams::F16 { scales: &s16, offsets: &m16 },
                    ] {
                        // Rows 1.. only: a row offset must be honoured.
                        let mut out = vec![0u16; (n - 1) * k];
                        let mut sc = DequantScratch::new(&layout);
                        dequantize_rows_bf16(&p, params, layout, (1, n - 1), &mut out, &mut sc, isa).unwrap();
                        for (t, &b) in out.iter().enumerate() {
                            let (row, col) = (1 + t / k, t % k);
                            let l = row * groups + col / g;
                            let want = s32[l] as f64 * codes[row * k + col] as f64 + m32[l] as f64;
                            let got = f32::from_bits((b as u32) << 16) as f64;
                            assert!(
                                (got - want).abs() <= want.abs() * 2f64.powi(-8) * (1.0 + 1e-6) + 1e-30,
                                "bits={bits} k={k} g={g} {isa:?}: [{row},{col}] got {got} want {want}"
                            );
                        }
                        if isa == Isa::Scalar {
                            scalar = out;
                        } else {
                            for (a, b) in out.iter().zip(&scalar) {
                                assert!((*a as i32 - *b as i32).abs() <= 1, "{isa:?} differs from scalar by > 1 ulp");
                            }
                        }
                    }
                }
            }
        }
        let layout = QuantLayout::new(2, 32, 4, 32).unwrap();
        let (p, s) = (vec![0u8; 32], vec![0f32; 2]);
        let mut sc = DequantScratch::new(&layout);
        let params = GroupParams::F32 { scales: &s, offsets: &s };
        assert!(dequantize_rows_bf16(&p, params, layout, (1, 2), &mut [0u16; 64], &mut sc, Isa::Scalar).is_err());
        assert!(dequantize_rows_bf16(&p[1..], params, layout, (0, 1), &mut [0u16; 32], &mut sc, Isa::Scalar).is_err());
    }

    /// The route's definition checked on every instruction set against float64: the scale
    /// term on bf16(x), the offsets' term on x, for M = 1..=16 (pairs, single rows and their
    /// splits), odd N, g = 32/64/128/256 and a layer large enough to run in parallel; other
    /// layouts must equal the exact route.
    #[test]
    fn bf16_route_matches_f64_reference() {
        let mut rng = SplitMix::new(23);
        let cases: &[(usize, usize, usize)] =
            &[(7, 64, 32), (13, 96, 32), (5, 192, 64), (9, 256, 128), (3, 768, 256), (601, 512, 32)];
        for &(n, k, g) in cases {
            let layout = QuantLayout::new(n, k, 4, g).unwrap();
            let groups = k / g;
            let codes = random_codes(n * k, 4, rng.next_u64());
            let mut p = vec![0u8; layout.packed_len()];
            crate::pack::pack(&codes, n, k, 4, &mut p).unwrap();
            let (s16, m16, s32, m32) = f16_params(n, groups, &mut rng);
            let ms: Vec<usize> = if n > 100 { vec![1, 2, 5, 16] } else { (1..=16).collect() };
            for m in ms {
                let mut x = random_f32(m * k, rng.next_u64());
                x[0] *= 1e4; // a large activation: its rounding dominates
                for isa in Isa::available() {
                    for params in [
                        GroupParams::F32 { scales: &s32, offsets: &m32 },
                        GroupParams::F16 { scales: &s16, offsets: &m16 },
                    ] {
                        let mut y = vec![0f32; m * n];
                        qmatmul_bf16_with(&x, m, &p, params, layout, &mut y, isa).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let (mut want, mut mag) = (0f64, 0f64);
                                for t in 0..k {
                                    let l = j * groups + t / g;
                                    let xv = x[i * k + t];
                                    let v = s32[l] as f64 * codes[j * k + t] as f64 * round_bf16(xv) as f64
                                        + m32[l] as f64 * xv as f64;
                                    want += v;
                                    mag += v.abs();
                                }
                                let got = y[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (mag + 1.0),
                                    "n={n} k={k} g={g} m={m} {isa:?} [{i},{j}]: got {got} want {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        for (bits, g) in [(2u32, 32usize), (3, 32), (8, 32), (4, 16)] {
            let (n, k, m) = (6usize, 64usize, 2usize);
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let codes = random_codes(n * k, bits, 3);
            let mut p = vec![0u8; layout.packed_len()];
            crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
            let (s, o) = (random_f32(n * k / g, 4), random_f32(n * k / g, 5));
            let x = random_f32(m * k, 6);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            let params = GroupParams::F32 { scales: &s, offsets: &o };
            qmatmul_bf16_with(&x, m, &p, params, layout, &mut a, Isa::detect_best()).unwrap();
            qmatmul_with(&x, m, &p, params, layout, &mut b, Isa::detect_best()).unwrap();
            assert_eq!(a, b, "bits={bits} g={g}");
        }
    }

    /// The documented bound: |y_bf16 − y_exact| ≤ 2^-8 Σ_k |s·q_k·x_k| (+ f32 rounding).
    #[test]
    fn error_is_within_the_documented_bound() {
        let (n, k, m, g) = (48usize, 512usize, 3usize, 32usize);
        let layout = QuantLayout::new(n, k, 4, g).unwrap();
        let w = random_f32(n * k, 31);
        let x = random_f32(m * k, 32);
        let mut p = vec![0u8; layout.packed_len()];
        let (mut s, mut o) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
        crate::quant::quantize(&w, layout, crate::quant::ParamDtype::F32, &mut p, &mut s, &mut o).unwrap();
        let mut codes = vec![0u8; n * k];
        crate::pack::unpack(&p, n, k, 4, &mut codes).unwrap();
        let params = GroupParams::F32 { scales: &s, offsets: &o };
        let (mut exact, mut approx) = (vec![0f32; m * n], vec![0f32; m * n]);
        qmatmul_with(&x, m, &p, params, layout, &mut exact, Isa::detect_best()).unwrap();
        for isa in Isa::available() {
            qmatmul_bf16_with(&x, m, &p, params, layout, &mut approx, isa).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let bound: f64 = (0..k)
                        .map(|t| (s[j * (k / g) + t / g] as f64 * codes[j * k + t] as f64 * x[i * k + t] as f64).abs())
                        .sum::<f64>()
                        * 2f64.powi(-8);
                    let err = (approx[i * n + j] as f64 - exact[i * n + j] as f64).abs();
                    assert!(err <= bound + 1e-4, "{isa:?} [{i},{j}] err {err} bound {bound}");
                }
            }
        }
    }
}
