//! The gradient of a quantized layer's per-group scales, for training them
//! (docs/design.md §1, "Trainable group parameters").
//!
//! For y = x·W̃ᵀ with W̃[n,k] = s[n,l(k)]·q[n,k] + m[n,l(k)] and P = grad_yᵀ·x (N × K):
//!
//! ```text
//! ∂L/∂s[n,l] = Σ_{k in group l} q[n,k]·P[n,k]
//! ```
//!
//! (the offsets' gradient, Σ_{k in l} P[n,k], is grad_yᵀ times the group sums of x, which
//! pooling already computes). P is formed by the binding a tile of rows at a time with
//! torch's GEMM; this reduces one tile against the packed codes.

use crate::error::{KernelError, Result};
use crate::layout::QuantLayout;
use crate::pack::unpack_row;
use crate::parallel::for_each_row_with;

/// `out[i, l] = Σ_{k in group l} q[row0 + i, k] · prod[i, k]` for the `prod.len() / K` rows
/// of the weight starting at `row0`. `out` holds those rows' K/g sums.
pub fn scale_grad_rows(packed: &[u8], layout: QuantLayout, row0: usize, prod: &[f32], out: &mut [f32]) -> Result<()> {
    let (k, g, groups, rb) = (layout.k, layout.group_size, layout.groups(), layout.row_bytes());
    if k == 0 || !prod.len().is_multiple_of(k) {
        return Err(KernelError::shape(format!("prod: {} values do not form rows of K = {k}", prod.len())));
    }
    let rows = prod.len() / k;
    if out.len() != rows * groups {
        return Err(KernelError::internal("scale_grad_rows: the output has the wrong length"));
    }
    if row0.checked_add(rows).is_none_or(|end| end > layout.n) || packed.len() != layout.packed_len() {
        return Err(KernelError::internal("scale_grad_rows: rows outside the weight"));
    }
    for_each_row_with(
        out,
        groups,
        rows * k,
        || vec![0u8; k],
        |codes, i, o| {
            let row = row0 + i;
            unpack_row(&packed[row * rb..(row + 1) * rb], layout.bits, codes);
            let p = &prod[i * k..(i + 1) * k];
            for (l, v) in o.iter_mut().enumerate() {
                *v = code_dot(&codes[l * g..(l + 1) * g], &p[l * g..(l + 1) * g]);
            }
        },
    );
    Ok(())
}

/// Σ q·p over one group, with eight independent accumulators (vectorizes; more accurate
/// than one running sum).
#[inline]
fn code_dot(q: &[u8], p: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, pc) = (q.chunks_exact(8), p.chunks_exact(8));
    let tail: f32 = qc.remainder().iter().zip(pc.remainder()).map(|(&a, &b)| a as f32 * b).sum();
    for (a, b) in qc.zip(pc) {
        for i in 0..8 {
            acc[i] = (a[i] as f32).mul_add(b[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::pack;
    use crate::testutil::random_f32;

    /// An independent float64 reference: unpacked codes times P, summed per group.
    fn reference(codes: &[u8], prod: &[f32], n: usize, k: usize, g: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * (k / g)];
        for r in 0..n {
            for c in 0..k {
                out[r * (k / g) + c / g] += codes[r * k + c] as f64 * prod[r * k + c] as f64;
            }
        }
        out
    }

    #[test]
    fn matches_a_float64_reference_for_every_bit_width_and_odd_shapes() {
        for bits in crate::SUPPORTED_BITS {
            // Groups of 8, 16, 32 and 72 columns: every bit width's byte rule holds.
            for &(n, groups, g) in &[(1usize, 1usize, 8usize), (7, 3, 16), (13, 5, 32), (33, 2, 72)] {
                let k = groups * g;
                let layout = QuantLayout::new(n, k, bits, g).unwrap();
                let qmax = (1u32 << bits) - 1;
                let noise = random_f32(n * k, 17 + bits as u64);
                let codes: Vec<u8> = noise.iter().map(|v| ((v.abs() * 1000.0) as u32 % (qmax + 1)) as u8).collect();
                let mut packed = vec![0u8; layout.packed_len()];
                pack(&codes, n, k, bits, &mut packed).unwrap();
                let prod = random_f32(n * k, 5 + n as u64);
                // The whole weight at once, then in two tiles of rows.
                let want = reference(&codes, &prod, n, k, g);
                let mut got = vec![0f32; n * groups];
                scale_grad_rows(&packed, layout, 0, &prod, &mut got).unwrap();
                let split = n / 2;
                let mut tiled = vec![0f32; n * groups];
                let (a, b) = tiled.split_at_mut(split * groups);
                scale_grad_rows(&packed, layout, 0, &prod[..split * k], a).unwrap();
                scale_grad_rows(&packed, layout, split, &prod[split * k..], b).unwrap();
                for i in 0..n * groups {
                    let tol = 1e-5 * (1.0 + want[i].abs()) * g as f64;
                    assert!((got[i] as f64 - want[i]).abs() <= tol, "bits {bits} n {n} k {k} g {g} at {i}");
                    assert_eq!(got[i], tiled[i], "tiling changed the sums");
                }
            }
        }
    }

    #[test]
    fn refuses_buffers_that_do_not_fit() {
        let layout = QuantLayout::new(4, 64, 4u32, 32usize).unwrap();
        let packed = vec![0u8; layout.packed_len()];
        let mut out = vec![0f32; 2 * 2];
        assert!(scale_grad_rows(&packed, layout, 0, &[0.5; 63], &mut out).is_err());
        assert!(scale_grad_rows(&packed, layout, 3, &[0.5; 128], &mut out).is_err());
        assert!(scale_grad_rows(&packed[1..], layout, 0, &[0.5; 128], &mut out).is_err());
        assert!(scale_grad_rows(&packed, layout, 0, &[0.5; 128], &mut out[1..]).is_err());
    }
}
