//! GPTQ's column loop inside one block of columns (Frantar et al., 2022), over plain f32
//! slices.
//!
//! Given the block's current weights `w` (N rows × B columns) and the block of the upper
//! Cholesky factor `u` of the inverse Hessian (B × B), each column i in turn is rounded
//! under its group's parameters and its error e = (w_i − ŵ_i) / u_ii is spread over the
//! block's later columns, w_j −= e · u_ij. Rows are independent (parameters are per row), so
//! rows run in parallel. The caller owns the factorization and applies the block's errors to
//! the columns after the block (one matrix product: the lazy batch update).
//!
//! Parameters and codes follow [`crate::quant`] exactly (min-max rounded to the storage dtype
//! before codes are chosen, ties to even). With [`Params::AtGroupStart`] a group's parameters
//! come from the row's current weights when its first column comes up (the block holds whole
//! groups); with [`Params::Given`] (act-order, static groups) they are read.

use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::layout::max_code;
use crate::parallel::PARALLEL_THRESHOLD;
use crate::quant::{code_of, group_params, ParamDtype};

/// Where a block's group parameters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    /// Min-max of the row's current weights at the group's first column.
    AtGroupStart,
    /// Read from `scales` / `offsets` (static groups).
    Given,
}

/// One block of the column loop (row-major buffers).
pub struct Block<'a> {
    /// The block's current weights (N × B); updated in place.
    pub w: &'a mut [f32],
    /// The block of the upper Cholesky factor of the inverse Hessian (B × B).
    pub u: &'a [f32],
    /// Out: the scaled errors e (N × B) for the lazy update of later columns.
    pub err: &'a mut [f32],
    /// Out: the codes (N × B).
    pub codes: &'a mut [u8],
    /// Group parameters (N × L, stored values): written at group starts with
    /// [`Params::AtGroupStart`], read with [`Params::Given`].
    pub scales: &'a mut [f32],
    pub offsets: &'a mut [f32],
    /// Group of each of the block's columns (length B, each < L).
    pub group_of: &'a [usize],
}

/// Sizes and settings of a block: `n` rows, `b` columns, `groups` (L) per row.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub n: usize,
    pub b: usize,
    pub groups: usize,
    pub group_size: usize,
    pub bits: u32,
    pub dtype: ParamDtype,
    pub params: Params,
}

/// One row's share of a block's buffers.
struct Row<'a> {
    w: &'a mut [f32],
    err: &'a mut [f32],
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    offsets: &'a mut [f32],
}

/// The row slices as the zipped chunk iterators hand them out.
type Zipped<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut [u8]), (&'a mut [f32], &'a mut [f32]));

impl<'a> From<Zipped<'a>> for Row<'a> {
    fn from((((w, err), codes), (scales, offsets)): Zipped<'a>) -> Self {
        Row { w, err, codes, scales, offsets }
    }
}

fn quantize_row(s: &BlockShape, u: &[f32], group_of: &[usize], r: Row<'_>) {
    let (b, g) = (s.b, s.group_size);
    let qmax = max_code(s.bits) as f32;
    for i in 0..b {
        let l = group_of[i];
        if s.params == Params::AtGroupStart && i % g == 0 {
            let (scale, offset) = group_params(&r.w[i..i + g], s.bits, s.dtype);
            r.scales[l] = scale;
            r.offsets[l] = offset;
        }
        let (scale, offset) = (r.scales[l], r.offsets[l]);
        let q = code_of(r.w[i], scale, offset, qmax);
        r.codes[i] = q;
        let e = (r.w[i] - (scale * q as f32 + offset)) / u[i * b + i];
        r.err[i] = e;
        for (wj, &uij) in r.w[i + 1..].iter_mut().zip(&u[i * b + i + 1..(i + 1) * b]) {
            *wj -= e * uij;
        }
    }
}

/// Runs the column loop of one block.
pub fn quantize_block(blk: Block<'_>, s: BlockShape) -> Result<()> {
    let Block { w, u, err, codes, scales, offsets, group_of } = blk;
    let (n, b, groups) = (s.n, s.b, s.groups);
    let sizes_ok = w.len() == n * b
        && err.len() == n * b
        && codes.len() == n * b
        && u.len() == b * b
        && scales.len() == n * groups
        && offsets.len() == n * groups
        && group_of.len() == b
        && group_of.iter().all(|&l| l < groups);
    let groups_ok = s.group_size > 0 && (s.params == Params::Given || b % s.group_size == 0);
    if !sizes_ok || !groups_ok || b == 0 || groups == 0 {
        return Err(KernelError::internal("gptq block: buffer sizes do not match the block's shape"));
    }
    let rows = |z: Zipped<'_>| quantize_row(&s, u, group_of, Row::from(z));
    if n * b * b / 2 < PARALLEL_THRESHOLD {
        w.chunks_mut(b)
            .zip(err.chunks_mut(b))
            .zip(codes.chunks_mut(b))
            .zip(scales.chunks_mut(groups).zip(offsets.chunks_mut(groups)))
            .for_each(rows);
    } else {
        w.par_chunks_mut(b)
            .zip(err.par_chunks_mut(b))
            .zip(codes.par_chunks_mut(b))
            .zip(scales.par_chunks_mut(groups).zip(offsets.par_chunks_mut(groups)))
            .for_each(rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_f32;

    fn identity(b: usize) -> Vec<f32> {
        let mut u = vec![0.0; b * b];
        for i in 0..b {
            u[i * b + i] = 1.0;
        }
        u
    }

    /// An identity factor feeds no error forward: every code is RTN's.
    #[test]
    fn identity_factor_is_round_to_nearest() {
        let (n, b, g, bits) = (3, 16, 8, 3);
        let mut w = random_f32(n * b, 7);
        let orig = w.clone();
        let (mut err, mut codes, mut sc, mut off) =
            (vec![0.0; n * b], vec![0u8; n * b], vec![0.0; n * 2], vec![0.0; n * 2]);
        let group_of: Vec<usize> = (0..b).map(|c| c / g).collect();
        let shape =
            BlockShape { n, b, groups: 2, group_size: g, bits, dtype: ParamDtype::F16, params: Params::AtGroupStart };
        let u = identity(b);
        let blk = Block {
            w: &mut w,
            u: &u,
            err: &mut err,
            codes: &mut codes,
            scales: &mut sc,
            offsets: &mut off,
            group_of: &group_of,
        };
        quantize_block(blk, shape).unwrap();
        for r in 0..n {
            for c in 0..b {
                let (s, m) = group_params(&orig[r * b + c / g * g..r * b + c / g * g + g], bits, ParamDtype::F16);
                assert_eq!((s, m), (sc[r * 2 + c / g], off[r * 2 + c / g]));
                assert_eq!(codes[r * b + c], code_of(orig[r * b + c], s, m, 7.0));
            }
        }
    }

    /// One error step by hand: column 0's error moves column 1 by e · u01.
    #[test]
    fn error_feedback_by_hand() {
        let (b, g) = (2, 2);
        let mut w = vec![0.3f32, 0.9];
        let u = vec![2.0f32, 0.5, 0.0, 1.0];
        let (mut err, mut codes, mut sc, mut off) = (vec![0.0; 2], vec![0u8; 2], vec![0.0; 1], vec![0.0; 1]);
        let shape = BlockShape {
            n: 1,
            b,
            groups: 1,
            group_size: g,
            bits: 2,
            dtype: ParamDtype::F32,
            params: Params::AtGroupStart,
        };
        let blk = Block {
            w: &mut w,
            u: &u,
            err: &mut err,
            codes: &mut codes,
            scales: &mut sc,
            offsets: &mut off,
            group_of: &[0, 0],
        };
        quantize_block(blk, shape).unwrap();
        // min 0.3, step 0.2: column 0 is exactly code 0, no error; column 1 is code 3.
        assert_eq!((codes[0], codes[1]), (0, 3));
        assert_eq!(err[0], 0.0);
        let mut w = vec![0.35f32, 0.9];
        let blk = Block {
            w: &mut w,
            u: &u,
            err: &mut err,
            codes: &mut codes,
            scales: &mut sc,
            offsets: &mut off,
            group_of: &[0, 0],
        };
        quantize_block(blk, shape).unwrap();
        let (s, m) = (sc[0], off[0]);
        let e0 = (0.35f32 - (s * codes[0] as f32 + m)) / 2.0;
        assert_eq!(err[0], e0);
        assert_eq!(w[1], 0.9 - e0 * 0.5);
    }

    #[test]
    fn rejects_mismatched_buffers() {
        let mut w = vec![0.0f32; 8];
        let (mut e, mut c, mut s, mut m) = (vec![0.0f32; 8], vec![0u8; 8], vec![0.0f32; 1], vec![0.0f32; 1]);
        let shape = BlockShape {
            n: 1,
            b: 8,
            groups: 1,
            group_size: 8,
            bits: 4,
            dtype: ParamDtype::F32,
            params: Params::AtGroupStart,
        };
        let blk = Block {
            w: &mut w,
            u: &[1.0; 4],
            err: &mut e,
            codes: &mut c,
            scales: &mut s,
            offsets: &mut m,
            group_of: &[0; 8],
        };
        assert!(quantize_block(blk, shape).is_err());
    }
}
