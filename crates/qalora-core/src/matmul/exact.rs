//! Fused dequantize-and-multiply for small M (generation), the exact route: y = x W~^T
//! straight from the packed codes, never materialising W~.
//!
//! Per (weight row n, group l) the kernels form Σ_k q[n,k]·x[i,k] from codes converted to
//! f32 in registers, then add s[n,l]·Σ + m[n,l]·xsum[i,l], where xsum (the group sums of x)
//! is computed once per call. Accumulation is exact f32 (no activation quantization).
//! The AVX2/FMA kernels live in `x86/exact.rs`, chosen at run time (`isa.rs`); [`row_scalar`]
//! is their twin. Rows the factored form cannot take are recomputed densely, as on every
//! route (`matmul/mod.rs`).

use super::{check_call, dense_rows_where_needed, for_weight_rows, group_sums, GroupParams};
use crate::error::Result;
use crate::isa::Isa;
use crate::layout::QuantLayout;
use crate::pack::unpack_row;

/// Scalar twin of the SIMD row kernels: for each of the `out.len()` activation rows i,
/// out[i] = Σ_l (s_l · Σ_{k in l} q[k]·x[i,k] + m_l · xsum[i,l]). `codes` in natural order.
#[allow(clippy::too_many_arguments)]
pub fn row_scalar(codes: &[u8], x: &[f32], ks: usize, xsum: &[f32], s: &[f32], m: &[f32], g: usize, out: &mut [f32]) {
    let groups = s.len();
    for (i, o) in out.iter_mut().enumerate() {
        let xi = &x[i * ks..i * ks + groups * g];
        let mut y = 0f32;
        for l in 0..groups {
            let mut acc = 0f32;
            for (&q, &v) in codes[l * g..(l + 1) * g].iter().zip(&xi[l * g..(l + 1) * g]) {
                acc += q as f32 * v;
            }
            y += s[l] * acc + m[l] * xsum[i * groups + l];
        }
        *o = y;
    }
}

/// Per-worker buffers: one row's f32 scales/offsets and unpacked codes, twice (row pairs).
struct Scratch {
    s: Vec<f32>,
    m: Vec<f32>,
    codes: Vec<u8>,
    s2: Vec<f32>,
    m2: Vec<f32>,
    codes2: Vec<u8>,
}

/// How a call feeds weight rows to the kernels (the SIMD routes carry their CPU proof).
#[derive(Clone, Copy)]
enum Route {
    /// AVX2 straight on the canonical 4-bit row, x permuted to match.
    #[cfg(target_arch = "x86_64")]
    Nib(crate::isa::HasAvx2),
    /// AVX2 on one byte per code (8-bit rows as they are, 2/3-bit rows unpacked).
    #[cfg(target_arch = "x86_64")]
    Bytes(crate::isa::HasAvx2),
    /// Scalar twin on unpacked codes.
    Scalar,
}

impl Route {
    fn choose(isa: Isa, layout: &QuantLayout) -> Route {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = isa.avx2() {
            if layout.group_size.is_multiple_of(16) {
                return if layout.bits == 4 { Route::Nib(cpu) } else { Route::Bytes(cpu) };
            }
        }
        let _ = (isa, layout);
        Route::Scalar
    }

    /// Whether the route reads the canonical 4-bit row as it is.
    fn reads_nibbles(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Route::Nib(_) = self {
            return true;
        }
        false
    }
}

/// Row `row`'s codes for groups [l0, l1) in the encoding `route` reads, indexed by absolute
/// column: the packed row itself for 4-bit rows on the nibble route and for 8-bit rows,
/// else `codes` with the block's 2/3/4-bit codes unpacked into it.
fn row_codes<'a>(
    packed: &'a [u8],
    layout: &QuantLayout,
    nibbles: bool,
    row: usize,
    (l0, l1): (usize, usize),
    codes: &'a mut [u8],
) -> &'a [u8] {
    let rb = layout.row_bytes();
    let prow = &packed[row * rb..(row + 1) * rb];
    if nibbles || layout.bits == 8 {
        prow
    } else {
        let (k0, k1, b) = (l0 * layout.group_size, l1 * layout.group_size, layout.bits as usize);
        unpack_row(&prow[k0 * b / 8..k1 * b / 8], layout.bits, &mut codes[k0..k1]);
        codes
    }
}

/// x: (M, K) row-major; out: (M, N) row-major; scales/offsets as f32.
pub fn qmatmul(
    x: &[f32],
    m: usize,
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: QuantLayout,
    out: &mut [f32],
) -> Result<()> {
    qmatmul_with(x, m, packed, GroupParams::F32 { scales, offsets }, layout, out, Isa::detect_best())
}

/// [`qmatmul`] with scales/offsets in either storage dtype and an explicit instruction set
/// (an unavailable one falls back to scalar).
pub fn qmatmul_with(
    x: &[f32],
    m: usize,
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    check_call(x, m, packed, &params, &layout, out)?;
    let QuantLayout { n, k, group_size: g, .. } = layout;
    if m == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = super::wide::route(isa, &layout) {
        super::wide::qmatmul_wide(cpu, x, &group_sums(x, m, k, g), m, packed, params, layout, out, isa);
        dense_rows_where_needed(x, m, packed, params, layout, isa, out);
        return Ok(());
    }
    let isa = isa.exact();
    let route = Route::choose(isa, &layout);
    let nibbles = route.reads_nibbles();
    let groups = layout.groups();
    // Once per call: the group sums of x (offset term) and, for Nib, x in nibble order.
    let xsum = group_sums(x, m, k, g);
    let x_nib;
    let xk: &[f32] = if nibbles {
        let mut p = vec![0f32; m * k];
        for (o, r) in p.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
            #[cfg(target_arch = "x86_64")]
            crate::x86::exact::permute_x_nib(r, o);
            #[cfg(not(target_arch = "x86_64"))]
            o.copy_from_slice(r);
        }
        x_nib = p;
        &x_nib
    } else {
        x
    };
    // One weight row against all M activation rows: outputs land transposed, (N, M).
    // The whole row is one block of groups. Cutting K into L1-sized blocks of x (so M > 1
    // does not re-read x from L2 for every weight row) was measured slower, with or without
    // software prefetch of the strided weight blocks; the kernels still take a group range.
    let block_groups = groups;
    // Weight rows against all M activation rows: outputs land transposed, (N, M).
    let run_rows = |row0: usize, o: &mut [f32], scratch: &mut Scratch| {
        let Scratch { s, m: mm, codes, s2, m2, codes2 } = scratch;
        let nrows = o.len() / m;
        o.fill(0.0);
        let mut l0 = 0;
        while l0 < groups {
            let lr = (l0, (l0 + block_groups).min(groups));
            let mut r = 0;
            // M = 1 on AVX2: rows in pairs (see `x86::exact::gemv2`).
            #[cfg(target_arch = "x86_64")]
            if let (1, Route::Nib(cpu) | Route::Bytes(cpu)) = (m, route) {
                use crate::x86::{dot, exact::gemv2, RowCodes};
                while r + 2 <= nrows {
                    let row = row0 + r;
                    params.row_into(row, lr, isa, s, mm);
                    params.row_into(row + 1, lr, isa, s2, m2);
                    let rows = [
                        RowCodes::new(nibbles, row_codes(packed, &layout, nibbles, row, lr, codes)),
                        RowCodes::new(nibbles, row_codes(packed, &layout, nibbles, row + 1, lr, codes2)),
                    ];
                    let (y0, y1) = gemv2(cpu, rows, xk, s, s2, g, lr);
                    let xs = &xsum[lr.0..lr.1];
                    o[r] += y0 + dot(cpu, &mm[lr.0..lr.1], xs);
                    o[r + 1] += y1 + dot(cpu, &m2[lr.0..lr.1], xs);
                    r += 2;
                }
            }
            while r < nrows {
                let row = row0 + r;
                params.row_into(row, lr, isa, s, mm);
                let src = row_codes(packed, &layout, nibbles, row, lr, codes);
                let orow = &mut o[r * m..(r + 1) * m];
                match route {
                    Route::Scalar => row_scalar(src, xk, k, &xsum, s, mm, g, orow),
                    #[cfg(target_arch = "x86_64")]
                    Route::Nib(cpu) | Route::Bytes(cpu) => {
                        let row = crate::x86::RowCodes::new(nibbles, src);
                        crate::x86::exact::rows_exact(cpu, row, xk, k, &xsum, groups, s, mm, g, lr, orow)
                    }
                }
                r += 1;
            }
            l0 = lr.1;
        }
    };
    let init = || Scratch {
        s: vec![0f32; groups],
        m: vec![0f32; groups],
        codes: vec![0u8; k],
        s2: vec![0f32; groups],
        m2: vec![0f32; groups],
        codes2: vec![0u8; k],
    };
    for_weight_rows(n, m, k, out, init, run_rows);
    dense_rows_where_needed(x, m, packed, params, layout, isa, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize, ParamDtype};
    use crate::testutil::{random_f32, SplitMix};

    #[test]
    fn matches_f64_reference() {
        for bits in crate::SUPPORTED_BITS {
            let (n, k, g, m) = (37usize, 128usize, 32usize, 3usize);
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let w = random_f32(n * k, 11);
            let x = random_f32(m * k, 12);
            let mut p = vec![0u8; layout.packed_len()];
            let (mut s, mut o) = (vec![0f32; n * 4], vec![0f32; n * 4]);
            quantize(&w, layout, ParamDtype::F16, &mut p, &mut s, &mut o).unwrap();
            let mut wq = vec![0f32; n * k];
            dequantize(&p, &s, &o, layout, &mut wq).unwrap();
            let mut y = vec![0f32; m * n];
            qmatmul(&x, m, &p, &s, &o, layout, &mut y).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * wq[j * k + t] as f64).sum();
                    assert!((y[i * n + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
    }

    /// Every instruction set and both parameter dtypes against a float64 reference built from
    /// unpacked codes, on odd shapes: M = 1..=16 (all block splits), N not a multiple of the
    /// chunking, K in several chunks, group sizes with and without a SIMD path, and a layer
    /// large enough to run in parallel.
    #[test]
    fn simd_and_scalar_twins_match_f64_reference() {
        let mut rng = SplitMix::new(99);
        let cases: &[(usize, usize, usize)] = &[
            (7, 64, 16),
            (13, 96, 32),
            (5, 48, 48),
            (11, 40, 8),
            (9, 24, 24),
            (3, 256, 128),
            (600, 512, 64), // parallel path (N*K above the threshold)
            // The 512-bit route's K chunks for M > 1 (16 KiB of x: 512 columns at M = 8,
            // 256 at M = 16) with a short last chunk, and row blocks of 16 with a remainder.
            (37, 1120, 32),
            (21, 640, 128),
        ];
        for bits in crate::SUPPORTED_BITS {
            for &(n, k, g) in cases {
                if !g.is_multiple_of(crate::layout::group_multiple(bits)) {
                    continue;
                }
                let layout = QuantLayout::new(n, k, bits, g).unwrap();
                let groups = k / g;
                let codes = crate::testutil::random_codes(n * k, bits, rng.next_u64());
                let mut p = vec![0u8; layout.packed_len()];
                crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
                // Scales and offsets exactly representable in f16, so both dtypes agree.
                let s16: Vec<u16> = random_f32(n * groups, rng.next_u64())
                    .iter()
                    .map(|v| half::f16::from_f32(0.01 + 0.1 * v.abs()).to_bits())
                    .collect();
                let m16: Vec<u16> =
                    random_f32(n * groups, rng.next_u64()).iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
                let s32: Vec<f32> = s16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
                let m32: Vec<f32> = m16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
                let ms: Vec<usize> = if n * k > 100_000 { vec![1, 3, 8, 13] } else { (1..=16).collect() };
                for m in ms {
                    let x = random_f32(m * k, rng.next_u64());
                    let mut want = vec![0f64; m * n];
                    let mut scale = vec![0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let (mut acc, mut mag) = (0f64, 0f64);
                            for t in 0..k {
                                let l = j * groups + t / g;
                                let w = s32[l] as f64 * codes[j * k + t] as f64 + m32[l] as f64;
                                acc += w * x[i * k + t] as f64;
                                mag += (w * x[i * k + t] as f64).abs();
                            }
                            want[i * n + j] = acc;
                            scale[i * n + j] = mag;
                        }
                    }
                    for isa in Isa::available() {
                        for params in [
                            GroupParams::F32 { scales: &s32, offsets: &m32 },
                            GroupParams::F16 { scales: &s16, offsets: &m16 },
                        ] {
                            let mut y = vec![0f32; m * n];
                            qmatmul_with(&x, m, &p, params, layout, &mut y, isa).unwrap();
                            for t in 0..m * n {
                                let err = (y[t] as f64 - want[t]).abs();
                                // f32 accumulation: error bounded by ~K·eps times Σ|w·x|.
                                assert!(
                                    err <= 1e-5 * (scale[t] + 1.0),
                                    "bits={bits} n={n} k={k} g={g} m={m} {isa:?} {params:?}: got {} want {}",
                                    y[t],
                                    want[t]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        let layout = QuantLayout::new(4, 32, 4, 16).unwrap();
        let (p, s) = (vec![0u8; 64], vec![0f32; 8]);
        let mut y = vec![0f32; 4];
        assert!(qmatmul(&[0f32; 31], 1, &p, &s, &s, layout, &mut y).is_err());
        assert!(qmatmul(&[0f32; 32], 1, &p[1..], &s, &s, layout, &mut y).is_err());
    }
}
