//! Fused dequantize-and-multiply for small M (generation): y = x W~^T without ever
//! materialising W~ beyond one row per worker.

use crate::error::{KernelError, Result};
use crate::layout::QuantLayout;
use crate::parallel::for_each_row_with;
use crate::quant::dequantize_row;

/// Dot product with eight independent accumulators (auto-vectorizes to 8-wide FMA lanes).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// x: (M, K) row-major; out: (M, N) row-major.
pub fn qmatmul(
    x: &[f32],
    m: usize,
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: QuantLayout,
    out: &mut [f32],
) -> Result<()> {
    layout.check_buffers(packed.len(), scales.len(), offsets.len())?;
    let QuantLayout { n, k, .. } = layout;
    if x.len() != m * k {
        return Err(KernelError::shape(format!("x: got {} values, expected M*K = {m}*{k}", x.len())));
    }
    if out.len() != m * n {
        return Err(KernelError::internal("qmatmul output has the wrong length"));
    }
    if m == 0 {
        return Ok(());
    }
    // Each worker produces whole output columns (one weight row against all M inputs),
    // written transposed and flipped back at the end.
    let mut out_t = vec![0f32; n * m];
    for_each_row_with(
        &mut out_t,
        m,
        n * k,
        || (vec![0u8; k], vec![0f32; k]),
        |(codes, w), row, o| {
            dequantize_row(packed, scales, offsets, layout, row, codes, w);
            for (i, v) in o.iter_mut().enumerate() {
                *v = dot(w, &x[i * k..(i + 1) * k]);
            }
        },
    );
    for (row, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + row] = v;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize, ParamDtype};
    use crate::testutil::random_f32;

    #[test]
    fn matches_f64_reference() {
        for bits in [2u32, 3, 4, 8] {
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
}
