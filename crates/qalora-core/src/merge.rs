//! The exact QA-LoRA merge: m'[n,l] = m[n,l] + c * (B A)[n,l] / g (DESIGN.md §1). The 1/g
//! comes from mean pooling: the adapter sees the mean of each group, so its update spreads
//! evenly over the g weights of that group.

use ndarray::ArrayView2;

use crate::error::{KernelError, Result};

/// offsets: (N, L); lora_a: (r, L); lora_b: (N, r). Writes merged offsets (N, L), computed in
/// f32 (B A by ndarray's blocked GEMM).
#[allow(clippy::too_many_arguments)]
pub fn merge_offsets(
    offsets: &[f32],
    n: usize,
    groups: usize,
    lora_a: &[f32],
    lora_b: &[f32],
    rank: usize,
    scaling: f32,
    group_size: usize,
    out: &mut [f32],
) -> Result<()> {
    if !scaling.is_finite() {
        return Err(KernelError::value(format!("scaling: got {scaling}, it must be finite")));
    }
    if group_size == 0 {
        return Err(KernelError::new(crate::ErrorKind::GroupSize, "group_size: got 0, it must be positive"));
    }
    let shape_err = |what: &str, got: usize, want: usize| {
        KernelError::shape(format!("{what}: got {got} values, expected {want}"))
    };
    if offsets.len() != n * groups || out.len() != n * groups {
        return Err(shape_err("offsets", offsets.len(), n * groups));
    }
    let a = ArrayView2::from_shape((rank, groups), lora_a)
        .map_err(|_| shape_err("lora_A", lora_a.len(), rank * groups))?;
    let b = ArrayView2::from_shape((n, rank), lora_b)
        .map_err(|_| shape_err("lora_B", lora_b.len(), n * rank))?;
    let delta = b.dot(&a);
    let factor = scaling / group_size as f32;
    for ((o, &m), &d) in out.iter_mut().zip(offsets).zip(delta.iter()) {
        *o = m + factor * d;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_f32;

    #[test]
    fn matches_f64_reference() {
        let (n, l, r, g, c) = (9usize, 6usize, 3usize, 32usize, 2.5f32);
        let (m, a, b) = (random_f32(n * l, 1), random_f32(r * l, 2), random_f32(n * r, 3));
        let mut out = vec![0f32; n * l];
        merge_offsets(&m, n, l, &a, &b, r, c, g, &mut out).unwrap();
        for i in 0..n {
            for j in 0..l {
                let ba: f64 = (0..r).map(|t| b[i * r + t] as f64 * a[t * l + j] as f64).sum();
                let want = m[i * l + j] as f64 + c as f64 * ba / g as f64;
                assert!((out[i * l + j] as f64 - want).abs() < 1e-6);
            }
        }
        assert!(merge_offsets(&m, n, l, &a[1..], &b, r, c, g, &mut out).is_err());
    }
}
