//! The small-M f32 route on 512-bit vectors, where the CPU has AVX-512 (`x86_wide.rs`): the
//! exact route and the bf16-activation route take it for 4-bit weights in groups of a
//! multiple of 32. Same arithmetic as the AVX2 kernels (exact f32 products of codes and
//! activations, f32 accumulation per group, then s·Σ + m·xsum), with half the instructions
//! per weight: codes become floats by a table lookup, 32 per three instructions.

use crate::isa::Isa;
use crate::layout::QuantLayout;
use crate::qmatmul::{for_weight_rows, GroupParams};

/// The proof token when this call can take the wide route.
#[cfg(target_arch = "x86_64")]
pub fn route(isa: Isa, layout: &QuantLayout) -> Option<crate::isa::HasAvx512Vnni> {
    if layout.bits == 4 && layout.group_size.is_multiple_of(32) {
        isa.avx512_vnni()
    } else {
        None
    }
}

/// Each 32-block of each row of x reordered to [x0, x2, .., x30, x1, x3, .., x31]: the order
/// in which the kernel takes the low and high nibbles of 16 packed bytes.
pub fn nibble_order(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, c) in out.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for t in 0..16 {
            o[t] = c[2 * t];
            o[16 + t] = c[2 * t + 1];
        }
    }
    out
}

/// y = Σ_l s·Σ q·x + m·xsum over checked buffers: `x` (M, K) natural order, `xsum` (M, L).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn qmatmul_wide(
    cpu: crate::isa::HasAvx512Vnni,
    x: &[f32],
    xsum: &[f32],
    m: usize,
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    out: &mut [f32],
    isa: Isa,
) {
    let QuantLayout { n, k, group_size: g, .. } = layout;
    let (groups, rb) = (layout.groups(), layout.row_bytes());
    let xp = nibble_order(x);
    // Weight rows from row0 against all M activation rows; `o` is (rows, M).
    let run_rows = |row0: usize, o: &mut [f32], (s, mm): &mut (Vec<f32>, Vec<f32>)| {
        for (r, orow) in o.chunks_exact_mut(m).enumerate() {
            let row = row0 + r;
            params.prefetch_row(row + 4, groups);
            params.row_into(row, (0, groups), isa, s, mm);
            crate::x86_wide::row_wide(cpu, &packed[row * rb..(row + 1) * rb], &xp, k, xsum, s, mm, g, orow);
        }
    };
    for_weight_rows(n, m, k, out, || (vec![0f32; groups], vec![0f32; groups]), run_rows);
}
