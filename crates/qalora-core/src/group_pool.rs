//! Group-average pooling of activations: pool(x)[l] = mean of x[k] for k in group l.
//! It is what lets a QA-LoRA update be constant inside each quantization group.

use crate::error::{KernelError, Result};
use crate::layout::check_group_size;
use crate::parallel::{for_each_row_above, STREAMING_THRESHOLD};

fn check(len: usize, k: usize, g: usize, what: &str) -> Result<usize> {
    check_group_size(k, None, g)?;
    if k == 0 || !len.is_multiple_of(k) {
        return Err(KernelError::shape(format!("{what}: {len} values do not form rows of {k}")));
    }
    Ok(len / k)
}

/// Sums a group with eight independent accumulators (vectorizes, and is more accurate
/// than one running sum).
#[inline]
pub fn group_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// x: rows of `k` values; out: rows of k/g group means.
pub fn group_pool(x: &[f32], k: usize, g: usize, out: &mut [f32]) -> Result<()> {
    let rows = check(x.len(), k, g, "x")?;
    let groups = k / g;
    if out.len() != rows * groups {
        return Err(KernelError::internal("group_pool output has the wrong length"));
    }
    let inv = 1.0 / g as f32;
    for_each_row_above(out, groups, x.len(), STREAMING_THRESHOLD, |r, o| {
        let xr = &x[r * k..(r + 1) * k];
        for (l, v) in o.iter_mut().enumerate() {
            *v = group_sum(&xr[l * g..(l + 1) * g]) * inv;
        }
    });
    Ok(())
}

/// Backward of [`group_pool`]: grad_x[k] = grad[l(k)] / g.
pub fn group_pool_backward(grad: &[f32], k: usize, g: usize, out: &mut [f32]) -> Result<()> {
    let rows = check(out.len(), k, g, "grad_input")?;
    let groups = k / g;
    if grad.len() != rows * groups {
        return Err(KernelError::shape(format!(
            "grad: got {} values, expected rows*(K/g) = {rows}*{groups}",
            grad.len()
        )));
    }
    let inv = 1.0 / g as f32;
    for_each_row_above(out, k, out.len(), STREAMING_THRESHOLD, |r, o| {
        for (l, chunk) in o.chunks_exact_mut(g).enumerate() {
            chunk.fill(grad[r * groups + l] * inv);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_f32;

    #[test]
    fn matches_f64_mean_and_backward_spreads() {
        let (rows, k) = (13, 120);
        let x = random_f32(rows * k, 3);
        for g in [1usize, 5, 8, 40, 120] {
            let mut out = vec![0f32; rows * k / g];
            group_pool(&x, k, g, &mut out).unwrap();
            for (i, v) in out.iter().enumerate() {
                let (r, l) = (i / (k / g), i % (k / g));
                let want: f64 = x[r * k + l * g..r * k + (l + 1) * g].iter().map(|&v| v as f64).sum::<f64>() / g as f64;
                assert!((*v as f64 - want).abs() < 1e-6, "g={g}");
            }
            let mut back = vec![0f32; rows * k];
            group_pool_backward(&out, k, g, &mut back).unwrap();
            assert!((back[k + g] - out[k / g + 1] / g as f32).abs() < 1e-7);
        }
        assert_eq!(group_pool(&x, k, 7, &mut [0f32; 1]).unwrap_err().kind, crate::ErrorKind::GroupSize);
    }
}
