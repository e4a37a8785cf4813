//! Opt-in int8-activation route for small M (generation): the llama.cpp route.
//!
//! Each activation row is quantized per block of B values to int8 with one f32 scale
//! d = max|x| / 127 (B = [`act_block`] of the group size: 128, 64 or 32), and the weight side
//! stays the exact 4-bit codes, so every block's Σ q·x_q is an exact integer dot product
//! (u8 × i8 → i32 on the SIMD units) that one group scale multiplies:
//!
//!   y[i,n] ≈ Σ_a s[n,l(a)] · d[i,a] · Σ_{k∈a} q[n,k] · x_q[i,k]  +  Σ_l m[n,l] · xsum[i,l]
//!
//! The offset term uses the exact f32 group sums of x, so the only approximation is the
//! rounding of x: |x − d·x_q| ≤ d/2 per element, hence
//! |y_int8 − y_exact| ≤ Σ_k |s[n,l(k)] · q[n,k]| · d[i,a(k)] / 2 (plus f32 rounding), which
//! `error_is_within_the_documented_bound` checks. Blocks as large as the group (up to 128)
//! let the integer sums run across a whole group before one conversion to float. It covers
//! 4-bit weights with group sizes that are multiples of 32; any other layout is computed
//! by the exact route, and so is any activation row holding a value that is not finite
//! (its scale would be infinite), with a dense matmul's IEEE semantics.

use super::exact::qmatmul_with;
use super::{group_sums, GroupParams};
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::layout::QuantLayout;

/// Codes per SIMD block: 16 bytes of a 4-bit row. Activation blocks are 1, 2 or 4 of these.
pub const CODE_BLOCK: usize = 32;

/// Whether the int8 route covers this layout (otherwise [`qmatmul_int8_with`] is exact).
pub fn supported(layout: &QuantLayout) -> bool {
    layout.bits == 4 && layout.group_size.is_multiple_of(CODE_BLOCK)
}

/// Activations per int8 scale for group size `g` (a multiple of 32): the largest of 128, 64
/// and 32 that divides g, so a block never straddles two groups.
pub fn act_block(g: usize) -> usize {
    [128, 64, 32].into_iter().find(|b| g.is_multiple_of(*b)).unwrap_or(CODE_BLOCK)
}

/// Activation rows quantized per block. Within each 32-code block the int8 values are
/// stored in the order the 4-bit row yields its codes: the 16 even positions, then the 16
/// odd ones (a canonical 4-bit byte holds code 2t in its low nibble and 2t + 1 in its high
/// nibble). 32-code blocks are stored pair-major for all rows together (see [`q_offset`]).
pub struct Int8Acts {
    /// M·K int8 values, block-permuted and laid out as [`q_offset`] says.
    pub q: Vec<i8>,
    /// (M, K / block) scales, row-major.
    pub d: Vec<f32>,
    /// Activations per scale (32, 64 or 128).
    pub block: usize,
}

/// Offset of row i's 32-code block b (of `blocks` per row, M rows) in [`Int8Acts::q`]:
/// pairs of blocks of every row lie together, [pair][row][64 bytes], and an odd last block
/// as [row][32 bytes]. A kernel walking M rows then reads one contiguous run, not M streams
/// K bytes apart (which collide in the same L1 sets when K is a multiple of 4096).
#[inline]
pub fn q_offset(m: usize, blocks: usize, i: usize, b: usize) -> usize {
    let (pair, pairs) = (b / 2, blocks / 2);
    if pair < pairs {
        pair * m * 64 + i * 64 + (b % 2) * 32
    } else {
        pairs * m * 64 + i * 32
    }
}

/// Quantizes M rows of K activations with one scale per `block` values (32, 64 or 128,
/// dividing K), rounding half to even.
pub fn quantize_acts(x: &[f32], m: usize, k: usize, block: usize) -> Result<Int8Acts> {
    if ![32, 64, 128].contains(&block) {
        return Err(KernelError::value(format!("block: got {block}, allowed: 32, 64, 128")));
    }
    if !k.is_multiple_of(block) || x.len() != crate::layout::size_product("x", &[m, k])? {
        return Err(KernelError::shape(format!(
            "x: got {} values for M = {m} rows of K = {k}; K must be a multiple of {block}",
            x.len()
        )));
    }
    let blocks = k / CODE_BLOCK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * k / block];
    for (j, (xa, da)) in x.chunks_exact(block).zip(d.iter_mut()).enumerate() {
        let amax = xa.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let (i, a) = (j / (k / block), j % (k / block));
        for (sub, xb) in xa.chunks_exact(CODE_BLOCK).enumerate() {
            let b = a * (block / CODE_BLOCK) + sub;
            let qb = &mut q[q_offset(m, blocks, i, b)..][..CODE_BLOCK];
            for t in 0..CODE_BLOCK / 2 {
                qb[t] = round_to_i8(xb[2 * t] * inv);
                qb[CODE_BLOCK / 2 + t] = round_to_i8(xb[2 * t + 1] * inv);
            }
        }
        *da = scale;
    }
    Ok(Int8Acts { q, d, block })
}

/// Round half to even of |v| <= ~127, clamped to ±127. Adding and subtracting 1.5·2^23
/// rounds in the FPU's default mode without a call to libm's `rintf` (this crate builds for
/// baseline x86-64, which has no rounding instruction).
#[inline]
pub(crate) fn round_to_i8(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let r = (v.clamp(-127.0, 127.0) + MAGIC) - MAGIC;
    r as i8
}

/// Scalar twin of the SIMD int8 kernels: for each of the M = `out.len()` activation rows,
/// out[i] = Σ_a coef[i,a] · Σ_{b∈a} Σ_{t<16} (lo_t · q[i,b,t] + hi_t · q[i,b,16+t]), where
/// a runs over activation blocks of `block` values, b over their 32-code blocks, lo_t/hi_t
/// are the low/high nibbles of byte t of block b, `q` is laid out as [`q_offset`] says and
/// coef (M, K/block) = activation scale × weight scale of the block's group.
pub fn int8_rows_scalar(row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    let (m, blocks, na, sub) = (out.len(), k / CODE_BLOCK, k / block, block / CODE_BLOCK);
    for (i, o) in out.iter_mut().enumerate() {
        let mut y = 0f32;
        for a in 0..na {
            let mut acc = 0i32;
            for b in a * sub..(a + 1) * sub {
                let bytes = &row[b * 16..b * 16 + 16];
                let qb = &q[q_offset(m, blocks, i, b)..][..CODE_BLOCK];
                for t in 0..16 {
                    acc += (bytes[t] & 0xF) as i32 * qb[t] as i32 + (bytes[t] >> 4) as i32 * qb[16 + t] as i32;
                }
            }
            y += coef[i * na + a] * acc as f32;
        }
        *o = y;
    }
}

/// [`int8_rows_scalar`] or its SIMD twin, by instruction set.
fn int8_rows_with(isa: Isa, row: &[u8], q: &[i8], coef: &[f32], k: usize, block: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx512_vnni() {
        return crate::x86::int8::int8_rows_vnni(cpu, row, q, coef, k, block, out);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx2() {
        return crate::x86::int8::int8_rows(cpu, row, q, coef, k, block, out);
    }
    int8_rows_scalar(row, q, coef, k, block, out)
}

/// `out[b] = s[b / P]`; a constant P lets the compiler store whole vectors (a run-time chunk
/// length made this a scalar loop that cost a quarter of the M = 1 time at g = 128).
fn repeat_each<'a, const P: usize>(s: &[f32], out: &'a mut [f32]) -> &'a [f32] {
    for (chunk, &v) in out.chunks_exact_mut(P).zip(s) {
        *<&mut [f32; P]>::try_from(chunk).expect("chunks_exact yields P values") = [v; P];
    }
    out
}

/// y = x W~^T like [`qmatmul_with`], with activations quantized to int8 per
/// block of [`act_block`] values (see the module docs for the error). Layouts outside
/// [`supported`] are computed exactly.
pub fn qmatmul_int8_with(
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
    super::check_call(x, m, packed, &params, &layout, out)?;
    if m == 0 {
        return Ok(());
    }
    let isa = isa.usable();
    let QuantLayout { n, k, group_size: g, .. } = layout;
    let block = act_block(g);
    let (groups, na, rb) = (layout.groups(), k / block, layout.row_bytes());
    let acts = quantize_acts(x, m, k, block)?;
    let xsum = group_sums(x, m, k, g);
    let per_group = g / block;
    // Weight rows from row0 against all M activation rows; `o` is (rows, M).
    let run_rows = |row0: usize, o: &mut [f32], scratch: &mut (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)| {
        let (s, mm, sa, coef) = scratch;
        for (r, orow) in o.chunks_exact_mut(m).enumerate() {
            let row = row0 + r;
            // The scales' stream, a few rows ahead (see `x86::PREFETCH_AHEAD`).
            #[cfg(target_arch = "x86_64")]
            params.prefetch_row(row + 4, groups);
            params.row_into(row, (0, groups), isa, s, mm);
            // coef[i, a] = d[i, a] · s[group of a]: one multiply per row and activation
            // block, made here in a vectorized loop rather than inside the kernels.
            let sa: &[f32] = match per_group {
                1 => s,
                2 => repeat_each::<2>(s, sa),
                4 => repeat_each::<4>(s, sa),
                _ => {
                    for (chunk, &v) in sa.chunks_exact_mut(per_group).zip(s.iter()) {
                        chunk.fill(v);
                    }
                    sa
                }
            };
            for (c, d) in coef.chunks_exact_mut(na).zip(acts.d.chunks_exact(na)) {
                for ((c, &dv), &sv) in c.iter_mut().zip(d).zip(sa) {
                    *c = dv * sv;
                }
            }
            let prow = &packed[row * rb..(row + 1) * rb];
            int8_rows_with(isa, prow, &acts.q, coef, k, block, orow);
            for (i, y) in orow.iter_mut().enumerate() {
                *y += super::dot_isa(mm, &xsum[i * groups..(i + 1) * groups], isa);
            }
        }
    };
    let init = || (vec![0f32; groups], vec![0f32; groups], vec![0f32; na], vec![0f32; na * m]);
    super::for_weight_rows(n, m, k, out, init, run_rows);
    // Rows with an infinite, NaN or huge value: their int8 scale is not finite, so they are
    // recomputed exactly, as a dense matmul does.
    super::dense_rows_where_needed(x, m, packed, params, layout, isa, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_codes, random_f32, SplitMix};

    /// Natural-order dequantized activations d·x_q, undoing the block permutation.
    fn dequantized_acts(a: &Int8Acts, m: usize, k: usize) -> Vec<f64> {
        let mut v = vec![0f64; m * k];
        let blocks = k / CODE_BLOCK;
        for i in 0..m {
            for b in 0..blocks {
                let d = a.d[i * (k / a.block) + b * CODE_BLOCK / a.block] as f64;
                let (base, qo) = (i * k + b * CODE_BLOCK, q_offset(m, blocks, i, b));
                for t in 0..16 {
                    v[base + 2 * t] = d * a.q[qo + t] as f64;
                    v[base + 2 * t + 1] = d * a.q[qo + 16 + t] as f64;
                }
            }
        }
        v
    }

    #[test]
    fn activation_quantization_rounds_within_half_a_step() {
        let (m, k) = (3, 384);
        let mut x = random_f32(m * k, 5);
        x[40] = 7.5; // one outlier block
        for block in [32, 64, 128] {
            let a = quantize_acts(&x, m, k, block).unwrap();
            assert_eq!(a.d.len(), m * k / block);
            let xd = dequantized_acts(&a, m, k);
            for i in 0..m * k {
                let d = a.d[i / block] as f64;
                let amax = x[i / block * block..][..block].iter().fold(0f64, |s, v| s.max(v.abs() as f64));
                assert!((d - amax / 127.0).abs() <= 1e-6 * amax);
                assert!((xd[i] - x[i] as f64).abs() <= 0.5 * d * (1.0 + 1e-5), "block {block} element {i}");
            }
            assert!(a.q.iter().all(|&v| v >= -127));
        }
        assert!(quantize_acts(&x[1..], m, k, 32).is_err());
        assert!(quantize_acts(&x[..3 * 96], 3, 96, 64).is_err());
        assert!(quantize_acts(&x, m, k, 48).is_err());
        // An all-zero block quantizes to zeros with scale 0, not NaN.
        let z = quantize_acts(&[0f32; 32], 1, 32, 32).unwrap();
        assert!(z.d[0] == 0.0 && z.q.iter().all(|&v| v == 0));
        assert_eq!(
            (act_block(32), act_block(64), act_block(96), act_block(128), act_block(384)),
            (32, 64, 32, 128, 128)
        );
    }

    /// Scalar and SIMD twins against a float64 reference built from the unpacked codes and
    /// the dequantized int8 activations, on odd shapes, both parameter dtypes, M = 1..=16,
    /// and a layer large enough to run in parallel; other layouts must equal the exact route.
    #[test]
    fn int8_twins_match_f64_reference() {
        let mut rng = SplitMix::new(7);
        let cases: &[(usize, usize, usize)] = &[
            (7, 64, 32),
            (13, 96, 32),
            (5, 192, 64),
            (4, 192, 96),
            (9, 256, 128),
            (3, 768, 256),
            (600, 512, 32),
            (300, 1024, 128),
        ];
        for &(n, k, g) in cases {
            let layout = QuantLayout::new(n, k, 4, g).unwrap();
            let groups = k / g;
            let codes = random_codes(n * k, 4, rng.next_u64());
            let mut p = vec![0u8; layout.packed_len()];
            crate::pack::pack(&codes, n, k, 4, &mut p).unwrap();
            let s16: Vec<u16> = random_f32(n * groups, rng.next_u64())
                .iter()
                .map(|v| half::f16::from_f32(0.01 + 0.1 * v.abs()).to_bits())
                .collect();
            let m16: Vec<u16> =
                random_f32(n * groups, rng.next_u64()).iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
            let s32: Vec<f32> = s16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
            let m32: Vec<f32> = m16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
            let ms: Vec<usize> = if n > 100 { vec![1, 2, 8, 13] } else { (1..=16).collect() };
            for m in ms {
                let x = random_f32(m * k, rng.next_u64());
                let xd = dequantized_acts(&quantize_acts(&x, m, k, act_block(g)).unwrap(), m, k);
                for isa in Isa::available() {
                    for params in [
                        GroupParams::F32 { scales: &s32, offsets: &m32 },
                        GroupParams::F16 { scales: &s16, offsets: &m16 },
                    ] {
                        let mut y = vec![0f32; m * n];
                        qmatmul_int8_with(&x, m, &p, params, layout, &mut y, isa).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let (mut want, mut mag) = (0f64, 0f64);
                                for t in 0..k {
                                    let l = j * groups + t / g;
                                    let q = codes[j * k + t] as f64;
                                    // Scale term on the int8 activations, offset term on exact x.
                                    let v = s32[l] as f64 * q * xd[i * k + t] + m32[l] as f64 * x[i * k + t] as f64;
                                    want += v;
                                    mag += v.abs();
                                }
                                let got = y[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (mag + 1.0),
                                    "n={n} k={k} g={g} m={m} {isa:?} {params:?} [{i},{j}]: got {got} want {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Layouts the int8 route does not cover are computed exactly.
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
            qmatmul_int8_with(&x, m, &p, params, layout, &mut a, Isa::detect()).unwrap();
            qmatmul_with(&x, m, &p, params, layout, &mut b, Isa::detect()).unwrap();
            assert_eq!(a, b, "bits={bits} g={g}");
        }
    }

    /// The documented bound on the int8 route's error against the exact product, for each
    /// activation block size.
    #[test]
    fn error_is_within_the_documented_bound() {
        let (n, k, m) = (64usize, 512usize, 4usize);
        for g in [32usize, 64, 128] {
            let layout = QuantLayout::new(n, k, 4, g).unwrap();
            let w = random_f32(n * k, 21);
            let mut x = random_f32(m * k, 22);
            for v in x.iter_mut().step_by(97) {
                *v *= 20.0; // outliers, as real activations have
            }
            let mut p = vec![0u8; layout.packed_len()];
            let (mut s, mut o) = (vec![0f32; n * k / g], vec![0f32; n * k / g]);
            crate::quant::quantize(&w, layout, crate::quant::ParamDtype::F32, &mut p, &mut s, &mut o).unwrap();
            let mut codes = vec![0u8; n * k];
            crate::pack::unpack(&p, n, k, 4, &mut codes).unwrap();
            let block = act_block(g);
            let a = quantize_acts(&x, m, k, block).unwrap();
            let (mut exact, mut approx) = (vec![0f32; m * n], vec![0f32; m * n]);
            let params = GroupParams::F32 { scales: &s, offsets: &o };
            qmatmul_with(&x, m, &p, params, layout, &mut exact, Isa::detect()).unwrap();
            qmatmul_int8_with(&x, m, &p, params, layout, &mut approx, Isa::detect()).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let bound: f64 = (0..k)
                        .map(|t| {
                            let sq = s[j * (k / g) + t / g] as f64 * codes[j * k + t] as f64;
                            sq.abs() * a.d[i * (k / block) + t / block] as f64 / 2.0
                        })
                        .sum();
                    let err = (approx[i * n + j] as f64 - exact[i * n + j] as f64).abs();
                    assert!(err <= bound + 1e-4, "g={g} [{i},{j}] err {err} bound {bound}");
                }
            }
        }
    }
}
