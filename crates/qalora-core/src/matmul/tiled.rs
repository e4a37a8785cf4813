//! The int8 route's repacked layout: one stream of row tiles, made once per layer, that
//! replaces the canonical codes, scales and offsets in memory (docs/design.md §3).
//!
//! At M = 1 the canonical layout costs the int8 route more instructions per weight than the
//! memory system needs: each 32-code block of each row is expanded on its own, its integer
//! sum reduced across lanes, converted and scaled on its own, and the scales live in a
//! second and third stream that are converted from f16 in a separate pass per row. The
//! tiled layout puts eight rows side by side, so that the eight 32-bit lanes of a vector
//! *are* the eight rows:
//!
//! For tile t (rows 8t..8t+7) and group l, one record of 32 + 4g bytes:
//! - the 8 rows' scales (f16), then their 8 offsets (f16): 32 bytes;
//! - for each 32-code block of the group, four 32-byte chunks c = 0..3; in chunk c, lane j
//!   (bytes 4j..4j+3) holds row 8t+j's codes 8c+u (low nibble of byte u) and 8c+4+u (high
//!   nibble), u = 0..3, counted from the block's first column.
//!
//! A tile's records follow each other (groups in order), and tiles follow each other, so a
//! layer is one sequential stream of N·(K/2 + 4·L) bytes, the canonical size. One `vpdpbusd`
//! multiplies a chunk's nibbles (8 rows × 4 codes) by four activations broadcast to every
//! lane and adds into 8 per-row integer sums: no horizontal reductions, one conversion and
//! one FMA per 8 rows and activation block, the scales converted 8 at a time where they are
//! used.
//!
//! The arithmetic is the canonical int8 route's (`matmul/int8.rs`): the same activation blocks and
//! int8 values, exact integer block sums, the offsets' term on the exact group sums of x.
//! Only the order of the f32 additions differs. Layouts: 4-bit, g a multiple of 32, N a
//! multiple of 8, f16 scales and offsets ([`supported`]).

use rayon::prelude::*;

use super::group_sums;
use super::int8::act_block;
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::layout::QuantLayout;

/// Rows per tile (the lanes of a 256-bit vector of i32).
pub const TILE_ROWS: usize = 8;
/// Bytes of a tile record's scales and offsets (8 f16 each).
const PARAM_BYTES: usize = 32;
/// Bytes of a 32-code block of a tile (8 rows × 16 bytes).
const BLOCK_BYTES: usize = 128;

/// Whether a layer can be stored tiled: 4-bit codes, groups of a multiple of 32 columns,
/// a multiple of 8 rows, f16 scales and offsets.
pub fn supported(layout: &QuantLayout, f16_params: bool) -> bool {
    layout.bits == 4 && layout.group_size.is_multiple_of(32) && layout.n.is_multiple_of(TILE_ROWS) && f16_params
}

fn check_supported(layout: &QuantLayout) -> Result<()> {
    if !supported(layout, true) {
        return Err(KernelError::value(format!(
            "the tiled int8 layout takes 4-bit weights with a group size that is a multiple of 32 and \
             out_features a multiple of {TILE_ROWS}; got bits = {}, group_size = {}, out_features = {}",
            layout.bits, layout.group_size, layout.n
        )));
    }
    Ok(())
}

/// Bytes of one tile record (one group of 8 rows).
fn record_bytes(g: usize) -> usize {
    PARAM_BYTES + g / 32 * BLOCK_BYTES
}

/// Bytes of a tiled layer: the same as its canonical codes + f16 scales + f16 offsets.
pub fn tiled_len(layout: &QuantLayout) -> usize {
    layout.n / TILE_ROWS * layout.groups() * record_bytes(layout.group_size)
}

/// Position, inside a tile record's code part, of (row j of the tile, column u of a 32-code
/// block b of the group): (byte offset, high nibble?).
#[inline]
fn code_position(b: usize, j: usize, u: usize) -> (usize, bool) {
    let (c, w) = (u / 8, u % 8);
    (b * BLOCK_BYTES + c * 32 + j * 4 + w % 4, w >= 4)
}

/// Canonical 4-bit codes + f16 scales/offsets (as bits) -> the tiled stream.
pub fn repack(packed: &[u8], scales: &[u16], offsets: &[u16], layout: QuantLayout, out: &mut [u8]) -> Result<()> {
    check_supported(&layout)?;
    layout.check_buffers(packed.len(), scales.len(), offsets.len())?;
    if out.len() != tiled_len(&layout) {
        return Err(KernelError::internal("repack: output has the wrong length"));
    }
    let (groups, g, rb) = (layout.groups(), layout.group_size, layout.row_bytes());
    let rec = record_bytes(g);
    crate::parallel::install(|| {
        out.par_chunks_mut(groups * rec).enumerate().for_each(|(t, tile)| {
            for (l, r) in tile.chunks_exact_mut(rec).enumerate() {
                for j in 0..TILE_ROWS {
                    let row = t * TILE_ROWS + j;
                    r[2 * j..2 * j + 2].copy_from_slice(&scales[row * groups + l].to_le_bytes());
                    r[16 + 2 * j..16 + 2 * j + 2].copy_from_slice(&offsets[row * groups + l].to_le_bytes());
                }
                let codes = &mut r[PARAM_BYTES..];
                codes.fill(0);
                for b in 0..g / 32 {
                    for j in 0..TILE_ROWS {
                        let prow = &packed[(t * TILE_ROWS + j) * rb..];
                        for u in 0..32 {
                            let col = l * g + b * 32 + u;
                            let q = (prow[col / 2] >> (4 * (col % 2))) & 0xF;
                            let (pos, high) = code_position(b, j, u);
                            codes[pos] |= if high { q << 4 } else { q };
                        }
                    }
                }
            }
        })
    });
    Ok(())
}

/// The tiled stream -> canonical 4-bit codes + f16 scales/offsets (as bits): the exact
/// inverse of [`repack`].
pub fn unrepack(
    tiled: &[u8],
    layout: QuantLayout,
    packed: &mut [u8],
    scales: &mut [u16],
    offsets: &mut [u16],
) -> Result<()> {
    check_supported(&layout)?;
    layout.check_buffers(packed.len(), scales.len(), offsets.len())?;
    if tiled.len() != tiled_len(&layout) {
        return Err(KernelError::shape(format!(
            "tiled weight: got {} bytes, a {}x{} layer at group size {} takes {}",
            tiled.len(),
            layout.n,
            layout.k,
            layout.group_size,
            tiled_len(&layout)
        )));
    }
    let (groups, g, rb) = (layout.groups(), layout.group_size, layout.row_bytes());
    let rec = record_bytes(g);
    let tile_packed = TILE_ROWS * rb;
    let params = scales.par_chunks_mut(TILE_ROWS * groups).zip(offsets.par_chunks_mut(TILE_ROWS * groups));
    crate::parallel::install(|| {
        packed.par_chunks_mut(tile_packed).zip(params).enumerate().for_each(|(t, (pk, (sc, of)))| {
            for l in 0..groups {
                let r = &tiled[(t * groups + l) * rec..][..rec];
                for j in 0..TILE_ROWS {
                    sc[j * groups + l] = u16::from_le_bytes([r[2 * j], r[2 * j + 1]]);
                    of[j * groups + l] = u16::from_le_bytes([r[16 + 2 * j], r[16 + 2 * j + 1]]);
                }
                let codes = &r[PARAM_BYTES..];
                for b in 0..g / 32 {
                    for j in 0..TILE_ROWS {
                        for u in 0..32 {
                            let (pos, high) = code_position(b, j, u);
                            let q = if high { codes[pos] >> 4 } else { codes[pos] & 0xF };
                            let col = l * g + b * 32 + u;
                            let byte = &mut pk[j * rb + col / 2];
                            if col % 2 == 0 {
                                *byte = (*byte & 0xF0) | q;
                            } else {
                                *byte = (*byte & 0x0F) | (q << 4);
                            }
                        }
                    }
                }
            }
        })
    });
    Ok(())
}

/// Activation rows quantized per block for the tiled kernels: natural column order, the
/// same values and scales as the canonical int8 route's (`int8::quantize_acts`).
pub struct TiledActs {
    /// M·K int8 values, row-major.
    pub q: Vec<i8>,
    /// (M, K / block) scales.
    pub d: Vec<f32>,
    /// (M, L) exact group sums of x (the offsets' term).
    pub xsum: Vec<f32>,
    pub block: usize,
}

/// Quantizes M rows of K activations for a layer with group size `g`.
pub fn quantize_acts(x: &[f32], m: usize, k: usize, g: usize) -> TiledActs {
    let block = act_block(g);
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * k / block];
    for ((xa, qa), da) in x.chunks_exact(block).zip(q.chunks_exact_mut(block)).zip(d.iter_mut()) {
        let amax = xa.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, &v) in qa.iter_mut().zip(xa) {
            *o = super::int8::round_to_i8(v * inv);
        }
        *da = scale;
    }
    TiledActs { q, d, xsum: group_sums(x, m, k, g), block }
}

/// Scalar twin of the tiled kernels: one tile (`tile`: its L records) against the M
/// activation rows; out[j·M + i] = y[i, row j of the tile].
pub fn tile_scalar(tile: &[u8], acts: &TiledActs, m: usize, k: usize, g: usize, out: &mut [f32]) {
    let (groups, rec, block) = (k / g, record_bytes(g), acts.block);
    let na = k / block;
    out.fill(0.0);
    for l in 0..groups {
        let r = &tile[l * rec..(l + 1) * rec];
        let f16 = |off: usize| half::f16::from_bits(u16::from_le_bytes([r[off], r[off + 1]])).to_f32();
        for j in 0..TILE_ROWS {
            let (s, mo) = (f16(2 * j), f16(16 + 2 * j));
            for i in 0..m {
                let mut y = mo * acts.xsum[i * groups + l];
                for a in 0..g / block {
                    let mut isum = 0i32;
                    for u in 0..block {
                        let col_in_group = a * block + u;
                        let (pos, high) = code_position(col_in_group / 32, j, col_in_group % 32);
                        let byte = r[PARAM_BYTES + pos];
                        let q = if high { byte >> 4 } else { byte & 0xF };
                        isum += q as i32 * acts.q[i * k + l * g + col_in_group] as i32;
                    }
                    y += s * acts.d[i * na + (l * g) / block + a] * isum as f32;
                }
                out[j * m + i] += y;
            }
        }
    }
}

/// [`tile_scalar`] or its SIMD twin, by instruction set.
fn tile_with(isa: Isa, tile: &[u8], acts: &TiledActs, m: usize, k: usize, g: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx2() {
        let vnni = isa.avx512_vnni();
        return crate::x86::tiled::tile_rows(cpu, vnni, tile, &acts.q, &acts.d, &acts.xsum, m, k, g, acts.block, out);
    }
    let _ = isa;
    tile_scalar(tile, acts, m, k, g, out)
}

/// Below this many weights a call runs on the calling thread (waking rayon costs more).
const PARALLEL_MIN_WEIGHTS: usize = 1 << 19;

/// y = x W~^T on a tiled layer, x: (M, K) row-major, out: (M, N); the int8-activation
/// arithmetic of `matmul/int8.rs`.
pub fn qmatmul_tiled_with(
    x: &[f32],
    m: usize,
    tiled: &[u8],
    layout: QuantLayout,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    check_supported(&layout)?;
    let QuantLayout { n, k, group_size: g, .. } = layout;
    if tiled.len() != tiled_len(&layout) {
        return Err(KernelError::shape(format!(
            "tiled weight: got {} bytes, expected {}",
            tiled.len(),
            tiled_len(&layout)
        )));
    }
    if x.len() != crate::layout::size_product("x", &[m, k])? || out.len() != m * n {
        return Err(KernelError::shape(format!("x: got {} values, expected M*K = {m}*{k}", x.len())));
    }
    if m == 0 {
        return Ok(());
    }
    let isa = isa.usable();
    let acts = quantize_acts(x, m, k, g);
    let tile_bytes = layout.groups() * record_bytes(g);
    let tiles = n / TILE_ROWS;
    // Outputs of a tile land as (8 rows, M): with M = 1 straight into `out`.
    let mut out_t_buf = if m == 1 { Vec::new() } else { vec![0f32; n * m] };
    let out_t: &mut [f32] = if m == 1 { &mut *out } else { &mut out_t_buf };
    let run = |t0: usize, o: &mut [f32]| {
        for (i, ot) in o.chunks_exact_mut(TILE_ROWS * m).enumerate() {
            let t = t0 + i;
            tile_with(isa, &tiled[t * tile_bytes..(t + 1) * tile_bytes], &acts, m, k, g, ot);
        }
    };
    if n * k < PARALLEL_MIN_WEIGHTS {
        run(0, out_t);
    } else {
        let per = crate::parallel::rows_per_task(tiles);
        crate::parallel::for_each_chunk(out_t, per * TILE_ROWS * m, |c, o| run(c * per, o));
    }
    if m > 1 {
        for (row, col) in out_t_buf.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + row] = v;
            }
        }
    }
    // Rows with non-finite or huge values get a dense matmul's results, as on every other
    // route; they are rare (an overflow upstream), so the canonical form is derived for them.
    if (0..m).any(|i| super::needs_dense(&x[i * k..(i + 1) * k], g, 4)) {
        let groups = layout.groups();
        let (mut packed, mut scales, mut offsets) =
            (vec![0u8; n * layout.row_bytes()], vec![0u16; n * groups], vec![0u16; n * groups]);
        unrepack(tiled, layout, &mut packed, &mut scales, &mut offsets)?;
        let params = super::GroupParams::F16 { scales: &scales, offsets: &offsets };
        super::dense_rows_where_needed(x, m, &packed, params, layout, isa, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::int8::qmatmul_int8_with;
    use crate::matmul::GroupParams;
    use crate::testutil::{random_codes, random_f32, SplitMix};

    fn layer(n: usize, k: usize, g: usize, seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u16>, Vec<u16>) {
        let mut rng = SplitMix::new(seed);
        let layout = QuantLayout::new(n, k, 4, g).unwrap();
        let codes = random_codes(n * k, 4, rng.next_u64());
        let mut p = vec![0u8; layout.packed_len()];
        crate::pack::pack(&codes, n, k, 4, &mut p).unwrap();
        let groups = n * k / g;
        let s: Vec<u16> = random_f32(groups, rng.next_u64())
            .iter()
            .map(|v| half::f16::from_f32(0.01 + 0.1 * v.abs()).to_bits())
            .collect();
        let o: Vec<u16> =
            random_f32(groups, rng.next_u64()).iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
        (codes, p, s, o)
    }

    #[test]
    fn repack_round_trips_and_keeps_the_size() {
        for &(n, k, g) in &[(8usize, 32usize, 32usize), (16, 96, 32), (24, 256, 64), (8, 384, 128), (16, 512, 256)] {
            let layout = QuantLayout::new(n, k, 4, g).unwrap();
            let (_, p, s, o) = layer(n, k, g, (n * k + g) as u64);
            let mut t = vec![0u8; tiled_len(&layout)];
            assert_eq!(t.len(), p.len() + 2 * (s.len() + o.len()));
            repack(&p, &s, &o, layout, &mut t).unwrap();
            let (mut p2, mut s2, mut o2) = (vec![0u8; p.len()], vec![0u16; s.len()], vec![0u16; o.len()]);
            unrepack(&t, layout, &mut p2, &mut s2, &mut o2).unwrap();
            assert!(p2 == p && s2 == s && o2 == o, "n={n} k={k} g={g}");
        }
        for (n, k, bits, g) in [(12usize, 64usize, 4u32, 32usize), (8, 64, 4, 16), (8, 64, 8, 32)] {
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let e = repack(&vec![0; layout.packed_len()], &vec![0; n * k / g], &vec![0; n * k / g], layout, &mut []);
            assert_eq!(e.unwrap_err().kind, crate::ErrorKind::Value);
        }
        let layout = QuantLayout::new(8, 32, 4, 32).unwrap();
        let e = unrepack(&[0u8; 10], layout, &mut [0u8; 128], &mut [0u16; 8], &mut [0u16; 8]);
        assert_eq!(e.unwrap_err().kind, crate::ErrorKind::Shape);
    }

    /// Every instruction set against a float64 reference of the int8 arithmetic (the
    /// canonical route's quantized activations), and against the canonical int8 route
    /// itself, for M = 1..=16 (chunks of 8 and their remainders), g = 32/64/96/128/256 and a
    /// layer large enough to run in parallel.
    #[test]
    fn tiled_route_matches_f64_reference_and_the_canonical_int8_route() {
        let cases: &[(usize, usize, usize)] =
            &[(8, 64, 32), (16, 96, 32), (24, 192, 64), (8, 192, 96), (16, 256, 128), (8, 768, 256), (1024, 512, 32)];
        let mut rng = SplitMix::new(41);
        for &(n, k, g) in cases {
            let layout = QuantLayout::new(n, k, 4, g).unwrap();
            let groups = k / g;
            let (codes, p, s, o) = layer(n, k, g, rng.next_u64());
            let mut t = vec![0u8; tiled_len(&layout)];
            repack(&p, &s, &o, layout, &mut t).unwrap();
            let sf: Vec<f32> = s.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
            let of: Vec<f32> = o.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
            let ms: Vec<usize> = if n > 100 { vec![1, 3, 9] } else { (1..=16).collect() };
            for m in ms {
                let mut x = random_f32(m * k, rng.next_u64());
                x[m * k / 2] = 9.0; // an outlier block
                let acts = quantize_acts(&x, m, k, g);
                let mut canon = vec![0f32; m * n];
                let params = GroupParams::F16 { scales: &s, offsets: &o };
                qmatmul_int8_with(&x, m, &p, params, layout, &mut canon, Isa::detect_best()).unwrap();
                for isa in Isa::available() {
                    let mut y = vec![0f32; m * n];
                    qmatmul_tiled_with(&x, m, &t, layout, &mut y, isa).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for c in 0..k {
                                let l = j * groups + c / g;
                                let xd =
                                    acts.d[i * (k / acts.block) + c / acts.block] as f64 * acts.q[i * k + c] as f64;
                                let v =
                                    sf[l] as f64 * codes[j * k + c] as f64 * xd + of[l] as f64 * x[i * k + c] as f64;
                                want += v;
                                mag += v.abs();
                            }
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (mag + 1.0),
                                "n={n} k={k} g={g} m={m} {isa:?} [{i},{j}]: got {got} want {want}"
                            );
                            let c = canon[i * n + j] as f64;
                            assert!((got - c).abs() <= 2e-5 * (mag + 1.0), "tiled vs canonical int8: {got} vs {c}");
                        }
                    }
                }
            }
        }
    }
}
