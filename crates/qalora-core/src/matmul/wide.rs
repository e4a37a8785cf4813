//! The small-M f32 route on 512-bit vectors, where the CPU has AVX-512 (`x86/wide.rs`): the
//! exact route and the bf16-activation route take it for 4-bit weights in groups of a
//! multiple of 32. Same arithmetic as the AVX2 kernels (exact f32 products of codes and
//! activations, f32 accumulation per group, then s·Σ + m·xsum), with half the instructions
//! per weight: codes become floats by a table lookup, 32 per three instructions.

use super::{for_weight_rows, GroupParams};
use crate::isa::Isa;
use crate::layout::QuantLayout;

/// Weight rows that share each chunk of x when M > 1.
const ROW_BLOCK: usize = 16;
/// Bytes of x (M rows of a chunk of columns) kept in L1 while a block of rows uses them.
const X_CHUNK_BYTES: usize = 16 << 10;

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
    // M > 1: blocks of weight rows share each chunk of x that fits L1 (16 KiB of it).
    let kc = if m == 1 { k } else { ((X_CHUNK_BYTES / (4 * m)) / g * g).max(g) };
    let block = if m == 1 { 1 } else { ROW_BLOCK };
    // Weight rows from row0 against all M activation rows; `o` is (rows, M).
    let run_rows = |row0: usize, o: &mut [f32], (s, mm): &mut (Vec<f32>, Vec<f32>)| {
        for (b, ob) in o.chunks_mut(block * m).enumerate() {
            let (r0, nr) = (row0 + b * block, ob.len() / m);
            for r in 0..nr {
                params.prefetch_row(r0 + r + 4, groups);
                let span = r * groups..(r + 1) * groups;
                params.row_into(r0 + r, (0, groups), isa, &mut s[span.clone()], &mut mm[span]);
            }
            // The block's scales and offsets (nr rows of L), converted above.
            let (s_rows, mm_rows) = (&s[..nr * groups], &mm[..nr * groups]);
            let rows = &packed[r0 * rb..(r0 + nr) * rb];
            if m == 1 {
                crate::x86::wide::row_wide(cpu, rows, &xp, k, xsum, s_rows, mm_rows, g, ob);
            } else {
                crate::x86::wide::rows_wide(cpu, rows, &xp, k, xsum, s_rows, mm_rows, g, kc, ob);
            }
        }
    };
    let scratch = || (vec![0f32; block * groups], vec![0f32; block * groups]);
    for_weight_rows(n, m, k, out, scratch, run_rows);
}
