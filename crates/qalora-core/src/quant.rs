//! Group-wise asymmetric min-max round-to-nearest quantization and its inverse.
//!
//! Offset form (docs/design.md §1): W~[n,k] = s[n,l] * q[n,k] + m[n,l], l = k / g.
//! Scales and offsets are rounded to their storage dtype *before* the codes are chosen, so
//! the codes are the nearest ones under the parameters that are actually stored.

use half::{bf16, f16};

use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::layout::{max_code, QuantLayout};
use crate::pack::{pack_row, unpack_row};
use crate::parallel::{for_each_row_with, install, PARALLEL_THRESHOLD};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Storage dtype of scales and offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamDtype {
    F16,
    BF16,
    F32,
}

impl ParamDtype {
    /// Rounds `v` to the nearest value representable in this dtype.
    pub fn round(self, v: f32) -> f32 {
        match self {
            ParamDtype::F16 => f16::from_f32(v).to_f32(),
            ParamDtype::BF16 => bf16::from_f32(v).to_f32(),
            ParamDtype::F32 => v,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ParamDtype::F16 => "float16",
            ParamDtype::BF16 => "bfloat16",
            ParamDtype::F32 => "float32",
        }
    }
}

/// Fails at the first NaN or infinite weight, naming its position.
pub fn check_finite(w: &[f32], k: usize, what: &str) -> Result<()> {
    match w.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(KernelError::value(format!(
            "{what}: value {} at row {}, column {} is not finite; quantization needs finite weights",
            w[i],
            i / k,
            i % k
        ))),
    }
}

/// Scale and offset of one group, rounded to `dtype`. A constant group (max == min) or a
/// range too small for the dtype gets scale 0: every code is 0 and the group dequantizes
/// to its offset, with no division by zero.
pub fn group_params(group: &[f32], bits: u32, dtype: ParamDtype) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in group {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let offset = dtype.round(lo);
    let scale = dtype.round((hi - lo) / max_code(bits) as f32);
    (scale, offset)
}

/// Nearest code of `v` under (scale, offset), clamped to [0, 2^bits - 1]; ties round to
/// even, as torch.round does, so the CPU and device paths choose the same codes.
#[inline]
pub fn code_of(v: f32, scale: f32, offset: f32, qmax: f32) -> u8 {
    if scale > 0.0 {
        ((v - offset) / scale).round_ties_even().clamp(0.0, qmax) as u8
    } else {
        0
    }
}

/// Codes of one row, group by group: the same arithmetic as [`code_of`], with the scale
/// test hoisted out of the group so the inner loop is straight-line (vectorizes).
#[inline(always)]
fn codes_row(wr: &[f32], scales: &[f32], offsets: &[f32], g: usize, qmax: f32, codes: &mut [u8]) {
    for ((cg, wg), (&s, &m)) in codes.chunks_exact_mut(g).zip(wr.chunks_exact(g)).zip(scales.iter().zip(offsets)) {
        if s > 0.0 {
            for (c, &v) in cg.iter_mut().zip(wg) {
                *c = ((v - m) / s).round_ties_even().clamp(0.0, qmax) as u8;
            }
        } else {
            cg.fill(0);
        }
    }
}

/// [`codes_row`] compiled for AVX2, where rounding is one instruction (SSE2 has none, so
/// the portable build calls a library function per element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn codes_row_avx2(wr: &[f32], scales: &[f32], offsets: &[f32], g: usize, qmax: f32, codes: &mut [u8]) {
    codes_row(wr, scales, offsets, g, qmax, codes)
}

fn codes_row_with(isa: Isa, wr: &[f32], s: &[f32], m: &[f32], g: usize, qmax: f32, codes: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: `avx2()` proves the CPU has AVX2 (the body is safe code, bounds-checked).
        return unsafe { codes_row_avx2(wr, s, m, g, qmax, codes) };
    }
    let _ = isa;
    codes_row(wr, s, m, g, qmax, codes)
}

/// Quantizes a row-major (N, K) weight. Writes packed codes (N, K*b/8) and scales/offsets
/// (N, K/g) as f32 values already rounded to `dtype`.
pub fn quantize(
    w: &[f32],
    layout: QuantLayout,
    dtype: ParamDtype,
    packed: &mut [u8],
    scales: &mut [f32],
    offsets: &mut [f32],
) -> Result<()> {
    let QuantLayout { n, k, bits, group_size: g } = layout;
    if w.len() != n * k {
        return Err(KernelError::shape(format!("weight: got {} values, expected {n}*{k}", w.len())));
    }
    layout.check_buffers(packed.len(), scales.len(), offsets.len())?;
    check_finite(w, k, "weight")?;
    // Parameters first: a min/max pass over all of W, so rows run in parallel (the lowest
    // overflowing group is reported, as a sequential scan would).
    let groups = layout.groups();
    let first_bad = AtomicUsize::new(usize::MAX);
    let per_row = |(row, (sr, mr)): (usize, (&mut [f32], &mut [f32]))| {
        let wr = &w[row * k..(row + 1) * k];
        for (l, ((s, m), wg)) in sr.iter_mut().zip(mr.iter_mut()).zip(wr.chunks_exact(g)).enumerate() {
            let (sc, off) = group_params(wg, bits, dtype);
            if !sc.is_finite() || !off.is_finite() {
                first_bad.fetch_min(row * groups + l, Ordering::Relaxed);
            }
            *s = sc;
            *m = off;
        }
    };
    if n * k < PARALLEL_THRESHOLD {
        scales.chunks_mut(groups).zip(offsets.chunks_mut(groups)).enumerate().for_each(per_row);
    } else {
        install(|| scales.par_chunks_mut(groups).zip(offsets.par_chunks_mut(groups)).enumerate().for_each(per_row));
    }
    let bad = first_bad.into_inner();
    if bad != usize::MAX {
        let (row, l) = (bad / groups, bad % groups);
        return Err(KernelError::value(format!(
            "weight: group {l} of row {row} spans a range that overflows {} scales/offsets; use scale_dtype=torch.float32",
            dtype.name()
        )));
    }
    let qmax = max_code(bits) as f32;
    let row_bytes = layout.row_bytes();
    let (scales, offsets) = (&*scales, &*offsets);
    let isa = Isa::detect();
    for_each_row_with(
        packed,
        row_bytes,
        n * k,
        || vec![0u8; k],
        |codes, row, out| {
            let wr = &w[row * k..(row + 1) * k];
            let (s, m) = (&scales[row * groups..(row + 1) * groups], &offsets[row * groups..(row + 1) * groups]);
            codes_row_with(isa, wr, s, m, g, qmax, codes);
            pack_row(codes, bits, out);
        },
    );
    Ok(())
}

/// Dequantizes rows of packed codes into a row-major f32 matrix: out = s * q + m.
/// `packed`, `scales`, `offsets` and `out` may cover any whole-row slice of a layer
/// (`layout.n` is the number of rows given).
pub fn dequantize(packed: &[u8], scales: &[f32], offsets: &[f32], layout: QuantLayout, out: &mut [f32]) -> Result<()> {
    layout.check_buffers(packed.len(), scales.len(), offsets.len())?;
    let QuantLayout { n, k, .. } = layout;
    if out.len() != n * k {
        return Err(KernelError::internal("dequantize output has the wrong length"));
    }
    for_each_row_with(
        out,
        k,
        n * k,
        || vec![0u8; k],
        |codes, row, o| dequantize_row(packed, scales, offsets, layout, row, codes, o),
    );
    Ok(())
}

/// Dequantizes row `row` into `out` (K values), using `codes` (K bytes) as scratch.
/// AVX2 when the CPU has it (4-bit rows straight from the packed bytes), else
/// [`dequantize_row_scalar`].
#[inline]
pub fn dequantize_row(
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: QuantLayout,
    row: usize,
    codes: &mut [u8],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(cpu)) = (layout.group_size.is_multiple_of(8), Isa::detect().avx2()) {
        use crate::x86::{dequant_row, RowCodes};
        let (rb, groups) = (layout.row_bytes(), layout.groups());
        let prow = &packed[row * rb..(row + 1) * rb];
        let (s, m) = (&scales[row * groups..(row + 1) * groups], &offsets[row * groups..(row + 1) * groups]);
        let codes = match layout.bits {
            4 => RowCodes::Nib(prow),
            8 => RowCodes::Bytes(prow),
            bits => {
                unpack_row(prow, bits, codes);
                RowCodes::Bytes(codes)
            }
        };
        return dequant_row(cpu, codes, s, m, layout.group_size, &mut out[..layout.k]);
    }
    dequantize_row_scalar(packed, scales, offsets, layout, row, codes, out)
}

/// Scalar twin of [`dequantize_row`]. Like the SIMD kernels (FMA), it rounds `s·q + m`
/// once: `f32::mul_add`. This is what makes a GGUF tensor imported into the offset form
/// dequantize to ggml's own values bit for bit on every path (see docs/gguf.md).
pub fn dequantize_row_scalar(
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: QuantLayout,
    row: usize,
    codes: &mut [u8],
    out: &mut [f32],
) {
    let rb = layout.row_bytes();
    let g = layout.group_size;
    let groups = layout.groups();
    unpack_row(&packed[row * rb..(row + 1) * rb], layout.bits, codes);
    for l in 0..groups {
        let (s, m) = (scales[row * groups + l], offsets[row * groups + l]);
        for (o, &q) in out[l * g..(l + 1) * g].iter_mut().zip(&codes[l * g..(l + 1) * g]) {
            *o = (q as f32).mul_add(s, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_f32;

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        for bits in crate::SUPPORTED_BITS {
            for (n, k, g) in [(7usize, 64usize, 32usize), (5, 96, 16), (3, 48, 48)] {
                let layout = QuantLayout::new(n, k, bits, g).unwrap();
                let w = random_f32(n * k, (bits as u64) << 8 | g as u64);
                let mut packed = vec![0u8; layout.packed_len()];
                let (mut s, mut m) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
                quantize(&w, layout, ParamDtype::F32, &mut packed, &mut s, &mut m).unwrap();
                let mut wq = vec![0f32; n * k];
                dequantize(&packed, &s, &m, layout, &mut wq).unwrap();
                for i in 0..n * k {
                    let step = s[(i / k) * (k / g) + (i % k) / g];
                    assert!((w[i] - wq[i]).abs() <= 0.5 * step * (1.0 + 1e-5) + 1e-7, "bits={bits}");
                }
            }
        }
    }

    /// The dispatched (SIMD) row dequantizer equals its scalar twin bit for bit (both round
    /// s·q + m once), and both are within an f64 bound of the exact value.
    #[test]
    fn dequantize_row_matches_scalar_twin() {
        for bits in crate::SUPPORTED_BITS {
            for (n, k, g) in [(5usize, 48usize, 8usize), (3, 96, 32), (4, 40, 40), (2, 256, 128), (3, 30, 6)] {
                let Ok(layout) = QuantLayout::new(n, k, bits, g) else { continue };
                let w = random_f32(n * k, 77 + k as u64);
                let mut p = vec![0u8; layout.packed_len()];
                let (mut s, mut m) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
                quantize(&w, layout, ParamDtype::F16, &mut p, &mut s, &mut m).unwrap();
                let mut codes = vec![0u8; k];
                for row in 0..n {
                    let (mut fast, mut slow) = (vec![0f32; k], vec![0f32; k]);
                    dequantize_row(&p, &s, &m, layout, row, &mut codes, &mut fast);
                    dequantize_row_scalar(&p, &s, &m, layout, row, &mut codes, &mut slow);
                    let mut q = vec![0u8; k];
                    unpack_row(&p[row * layout.row_bytes()..(row + 1) * layout.row_bytes()], bits, &mut q);
                    assert_eq!(
                        fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "bits={bits} k={k} g={g}"
                    );
                    for t in 0..k {
                        let l = row * (k / g) + t / g;
                        let want = s[l] as f64 * q[t] as f64 + m[l] as f64;
                        assert!((fast[t] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "bits={bits} k={k} g={g}");
                        assert!((slow[t] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }

    /// s·q + m is rounded once, on every path: with float32 scales of 24 significant bits the
    /// product s·q is not a float32, and rounding it before the add (mul then add) gives
    /// another answer for a good share of codes. The reference is the exact sum in f64 (the
    /// operands are chosen so that it is exact there), rounded once to f32.
    #[test]
    fn dequantize_rounds_once_on_every_path() {
        let (n, k, g) = (4usize, 64usize, 16usize);
        let mut r = crate::testutil::SplitMix::new(99);
        for bits in crate::SUPPORTED_BITS {
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let codes = crate::testutil::random_codes(n * k, bits, 3 + bits as u64);
            let mut p = vec![0u8; layout.packed_len()];
            crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
            // Scales in [1, 2) with a full 24-bit mantissa; offsets within a few binades.
            let s: Vec<f32> = (0..n * k / g).map(|_| 1.0 + (r.next_u64() >> 41) as f32 / (1u64 << 23) as f32).collect();
            let m: Vec<f32> = (0..n * k / g).map(|_| -3.0 * (1.0 + r.uniform())).collect();
            let mut twice_rounded_differs = 0;
            let mut codes_scratch = vec![0u8; k];
            for row in 0..n {
                let (mut fast, mut slow) = (vec![0f32; k], vec![0f32; k]);
                dequantize_row(&p, &s, &m, layout, row, &mut codes_scratch, &mut fast);
                dequantize_row_scalar(&p, &s, &m, layout, row, &mut codes_scratch, &mut slow);
                for t in 0..k {
                    let l = row * (k / g) + t / g;
                    let q = codes[row * k + t] as f64;
                    let want = (s[l] as f64 * q + m[l] as f64) as f32;
                    assert_eq!(fast[t].to_bits(), want.to_bits(), "bits={bits} row={row} t={t}");
                    assert_eq!(slow[t].to_bits(), want.to_bits(), "bits={bits} row={row} t={t}");
                    twice_rounded_differs += usize::from(((s[l] * q as f32) + m[l]).to_bits() != want.to_bits());
                }
            }
            if bits >= 4 {
                assert!(twice_rounded_differs > 0, "bits={bits}: the test must tell one rounding from two");
            }
        }
    }

    #[test]
    fn constant_groups_have_no_nan() {
        let layout = QuantLayout::new(2, 8, 4, 4).unwrap();
        let w = [0.5f32, 0.5, 0.5, 0.5, -1.0, 2.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0];
        let mut packed = vec![0u8; layout.packed_len()];
        let (mut s, mut m) = (vec![0f32; 4], vec![0f32; 4]);
        quantize(&w, layout, ParamDtype::F16, &mut packed, &mut s, &mut m).unwrap();
        let mut wq = vec![0f32; 16];
        dequantize(&packed, &s, &m, layout, &mut wq).unwrap();
        assert_eq!(&wq[..4], &[0.5; 4]);
        assert_eq!(&wq[8..], &[3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(wq.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_non_finite_and_fp16_overflow() {
        let layout = QuantLayout::new(1, 4, 4, 4).unwrap();
        let mut p = vec![0u8; 2];
        let (mut s, mut m) = (vec![0f32; 1], vec![0f32; 1]);
        let err = quantize(&[1.0, f32::NAN, 0.0, 1.0], layout, ParamDtype::F16, &mut p, &mut s, &mut m);
        assert!(err.unwrap_err().message.contains("column 1"));
        let err = quantize(&[1e6, -1e6, 0.0, 1.0], layout, ParamDtype::F16, &mut p, &mut s, &mut m);
        assert!(err.unwrap_err().message.contains("float32"));
        quantize(&[1e6, -1e6, 0.0, 1.0], layout, ParamDtype::F32, &mut p, &mut s, &mut m).unwrap();
    }

    /// The vectorized code loop picks exactly the codes of [`code_of`] on every ISA,
    /// including ties, values outside the range and zero-scale groups.
    #[test]
    fn codes_row_matches_code_of() {
        let (k, g) = (96usize, 16usize);
        let mut w = random_f32(k, 5);
        w[3] = 0.5; // with offset 0 and scale 1/4 below: exactly 2, a tie-free point
        let s: Vec<f32> = (0..k / g).map(|l| if l == 2 { 0.0 } else { 0.25 / (1 + l) as f32 }).collect();
        let m: Vec<f32> = (0..k / g).map(|l| -0.5 + 0.1 * l as f32).collect();
        // Exact ties: v - m = (j + 0.5) * s.
        for j in 0..g {
            w[g + j] = m[1] + (j as f32 + 0.5) * s[1];
        }
        for isa in Isa::available() {
            for qmax in [3.0f32, 7.0, 15.0, 255.0] {
                let mut codes = vec![0u8; k];
                codes_row_with(isa, &w, &s, &m, g, qmax, &mut codes);
                for j in 0..k {
                    assert_eq!(codes[j], code_of(w[j], s[j / g], m[j / g], qmax), "{isa:?} j={j}");
                }
            }
        }
    }
}
