//! The fused quantized matmul for small M (generation), y = x W~ᵀ straight from the packed
//! codes: the plumbing every route shares, and one file per route (`exact.rs`, `int8.rs`,
//! `bf16.rs`, `wide.rs`, `tiled.rs`).
//!
//! The factored form is not a dense matmul for every input: an infinite x[k] meets code 0
//! (0·Inf = NaN) and the offsets' term Σx, so a whole output row would turn NaN where a dense
//! matmul gives ±Inf. Activation rows with a value that is not finite, or large enough for
//! the partial sums to overflow, are recomputed the dense way ([`dense_rows_where_needed`]),
//! on every route (int8 too), so results agree with `x @ W~ᵀ` in IEEE arithmetic.

use crate::error::{KernelError, Result};
use crate::group_pool::group_sum;
use crate::isa::Isa;
use crate::layout::{max_code, size_product, QuantLayout};

pub mod bf16;
pub mod exact;
pub mod int8;
pub mod tiled;
pub mod wide;

/// Below or at this many activation rows the fused kernel wins; above it, dequantizing a
/// tile and calling torch's GEMM does. The binding and the Python layers take it from here.
pub const FUSED_MAX_ROWS: usize = 16;

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

/// Scales and offsets of a weight, (N, L) row-major, as f32 values or raw f16 bits (the
/// default storage dtype: converting per row inside the kernel saves a pass over them), or
/// factored as GGUF's K-quants store them (docs/design.md §2).
#[derive(Debug, Clone, Copy)]
pub enum GroupParams<'a> {
    F32 {
        scales: &'a [f32],
        offsets: &'a [f32],
    },
    F16 {
        scales: &'a [u16],
        offsets: &'a [u16],
    },
    /// `scales[n,l] = f32(scale_factors[n, l / per_factor]) · scales[n,l]`, offsets alike:
    /// small integers (N, L) times f16 factors (N, L / per_factor) as raw bits. Both
    /// products are exact in f32 (11 × 8 significant bits).
    Factored {
        scales: GroupInts<'a>,
        scale_factors: &'a [u16],
        offsets: GroupInts<'a>,
        offset_factors: &'a [u16],
        per_factor: usize,
    },
}

/// The integer halves of factored group parameters: unsigned (K-quant sub-block scales and
/// mins) or signed (Q6_K's and Q3_K's scales).
#[derive(Debug, Clone, Copy)]
pub enum GroupInts<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
}

impl GroupInts<'_> {
    pub fn len(&self) -> usize {
        match self {
            GroupInts::U8(v) => v.len(),
            GroupInts::I8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The integers [start, end).
    fn range(&self, start: usize, end: usize) -> Self {
        match self {
            GroupInts::U8(v) => GroupInts::U8(&v[start..end]),
            GroupInts::I8(v) => GroupInts::I8(&v[start..end]),
        }
    }

    /// `out[i] *= self[start + i]`: one pass that vectorizes.
    #[inline]
    fn multiply_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            GroupInts::U8(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &q)| *o *= q as f32),
            GroupInts::I8(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &q)| *o *= q as f32),
        }
    }
}

/// Row `n`'s factored parameters of groups [l0, l1) into `out` (l1 − l0 values). Whole
/// factors of a multiple of 8 groups (K-quants: 8 or 16) take one AVX2 pass (a factor
/// converted by F16C, then 8 integers per multiply); anything else each factor converted
/// and written over its groups, then one pass multiplies by the integers. (A loop per
/// factor over its groups cost 4× the arithmetic of the row.)
#[inline]
#[allow(clippy::too_many_arguments)]
fn factored_row_into(
    ints: &GroupInts<'_>,
    factors: &[u16],
    per: usize,
    n: usize,
    l: usize,
    (l0, l1): (usize, usize),
    isa: Isa,
    out: &mut [f32],
) {
    let row_factors = &factors[n * (l / per)..(n + 1) * (l / per)];
    #[cfg(target_arch = "x86_64")]
    if let (Some(cpu), true) = (isa.avx2(), per.is_multiple_of(8) && l0.is_multiple_of(per) && l1.is_multiple_of(per)) {
        let row_ints = ints.range(n * l + l0, n * l + l1);
        return crate::x86::factored_params(cpu, row_ints, &row_factors[l0 / per..l1 / per], per, out);
    }
    let _ = isa;
    for (i, o) in out[..l1 - l0].iter_mut().enumerate() {
        *o = half::f16::from_bits(row_factors[(l0 + i) / per]).to_f32();
    }
    ints.multiply_into(n * l + l0, &mut out[..l1 - l0]);
}

impl GroupParams<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            GroupParams::F32 { scales, offsets } => (scales.len(), offsets.len()),
            GroupParams::F16 { scales, offsets } => (scales.len(), offsets.len()),
            GroupParams::Factored { scales, offsets, .. } => (scales.len(), offsets.len()),
        }
    }

    /// Checks the buffers against the layout: `packed` bytes, (N, L) parameters, and for factored ones a
    /// factor count that divides L and (N, L / per_factor) factors.
    pub fn check(&self, packed: usize, layout: &QuantLayout) -> Result<()> {
        let (sl, ol) = self.lens();
        layout.check_buffers(packed, sl, ol)?;
        if let GroupParams::Factored { scale_factors, offset_factors, per_factor, .. } = self {
            let groups = layout.groups();
            if *per_factor == 0 || !groups.is_multiple_of(*per_factor) {
                return Err(KernelError::shape(format!(
                    "factored group parameters: {per_factor} groups per factor does not divide the {groups} groups of a row"
                )));
            }
            let want = layout.n * (groups / per_factor);
            for (name, len) in [("scale_factors", scale_factors.len()), ("offset_factors", offset_factors.len())] {
                if len != want {
                    return Err(KernelError::shape(format!(
                        "{name}: got {len} values, expected N*(K/group_size)/{per_factor} = {want}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Asks for row `n`'s scales and offsets (`l` groups per row) ahead of use (a hint;
    /// out-of-range rows are ignored).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn prefetch_row(&self, n: usize, l: usize) {
        fn lines<T>(v: &[T], start: Option<usize>, len: usize) {
            if let Some(r) = start.and_then(|s| v.get(s..s.checked_add(len)?)) {
                crate::x86::prefetch(r);
            }
        }
        let start = n.checked_mul(l);
        match self {
            GroupParams::F32 { scales, offsets } => {
                lines(scales, start, l);
                lines(offsets, start, l);
            }
            GroupParams::F16 { scales, offsets } => {
                lines(scales, start, l);
                lines(offsets, start, l);
            }
            GroupParams::Factored { scales, offsets, .. } => {
                for ints in [scales, offsets] {
                    match ints {
                        GroupInts::U8(v) => lines(v, start, l),
                        GroupInts::I8(v) => lines(v, start, l),
                    }
                }
            }
        }
    }

    /// Row `n`'s scales and offsets of groups [l0, l1) as f32, into `s[l0..l1]` and
    /// `m[l0..l1]` (`s.len()` = L).
    #[inline]
    pub fn row_into(&self, n: usize, (l0, l1): (usize, usize), isa: Isa, s: &mut [f32], m: &mut [f32]) {
        let l = s.len();
        let r = n * l + l0..n * l + l1;
        let (s, m) = (&mut s[l0..l1], &mut m[l0..l1]);
        match self {
            GroupParams::F32 { scales, offsets } => {
                s.copy_from_slice(&scales[r.clone()]);
                m.copy_from_slice(&offsets[r]);
            }
            GroupParams::F16 { scales, offsets } => {
                #[cfg(target_arch = "x86_64")]
                if let Some(cpu) = isa.avx2() {
                    crate::x86::f16_to_f32(cpu, &scales[r.clone()], s);
                    crate::x86::f16_to_f32(cpu, &offsets[r], m);
                    return;
                }
                for (d, &h) in s.iter_mut().zip(&scales[r.clone()]) {
                    *d = half::f16::from_bits(h).to_f32();
                }
                for (d, &h) in m.iter_mut().zip(&offsets[r]) {
                    *d = half::f16::from_bits(h).to_f32();
                }
            }
            GroupParams::Factored { scales, scale_factors, offsets, offset_factors, per_factor } => {
                factored_row_into(scales, scale_factors, *per_factor, n, l, (l0, l1), isa, s);
                factored_row_into(offsets, offset_factors, *per_factor, n, l, (l0, l1), isa, m);
            }
        }
    }
}

/// Below this many weights a call runs on the calling thread: rayon's wake-up
/// (~10-20 µs on two cores) would cost more than the work.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 18;

/// Checks the buffers of a qmatmul call against the layout and M.
pub(crate) fn check_call(
    x: &[f32],
    m: usize,
    packed: &[u8],
    params: &GroupParams<'_>,
    layout: &QuantLayout,
    out: &[f32],
) -> Result<()> {
    params.check(packed.len(), layout)?;
    let k = layout.k;
    if x.len() != size_product("x", &[m, k])? {
        return Err(KernelError::shape(format!("x: got {} values, expected M*K = {m}*{k}", x.len())));
    }
    if out.len() != size_product("qmatmul output", &[m, layout.n])? {
        return Err(KernelError::internal("qmatmul output has the wrong length"));
    }
    Ok(())
}

/// (M, L) group sums of the M rows of x (the offsets' term).
pub(crate) fn group_sums(x: &[f32], m: usize, k: usize, g: usize) -> Vec<f32> {
    let groups = k / g;
    let mut xsum = vec![0f32; m * groups];
    for (i, xs) in xsum.chunks_exact_mut(groups.max(1)).enumerate().take(m) {
        for (l, v) in xs.iter_mut().enumerate() {
            *v = group_sum(&x[i * k + l * g..i * k + (l + 1) * g]);
        }
    }
    xsum
}

/// Whether activation row `x` leaves the factored form: a value that is not finite, or one
/// so large that a group's partial sum Σ q·x (g codes of at most 2^bits − 1) could overflow
/// f32 where the products W~·x of a dense matmul would not.
#[allow(clippy::neg_cmp_op_on_partial_ord)] // the negation is the point: NaN must count
pub(crate) fn needs_dense(x: &[f32], g: usize, bits: u32) -> bool {
    let limit = f32::MAX / (g as f32 * max_code(bits) as f32);
    // NaN compares false with everything, so it is tested on its own; a fold without early
    // exit vectorizes.
    x.iter().fold(false, |bad, v| bad | v.is_nan() | (v.abs() > limit))
}

/// Recomputes, as a dense matmul does, the outputs of the activation rows that
/// [`needs_dense`]: y[i,n] = Σ_k W~[n,k]·x[i,k] with W~ dequantized one row at a time, in
/// IEEE f32 arithmetic, so an infinite input gives ±Inf where the weights it meets share a
/// sign and NaN where it meets a zero weight or both signs, as `x @ W~ᵀ` does. Such rows
/// are rare (an overflow upstream), so this runs on the calling thread.
pub(crate) fn dense_rows_where_needed(
    x: &[f32],
    m: usize,
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    isa: Isa,
    out: &mut [f32],
) {
    let QuantLayout { n, k, bits, group_size: g } = layout;
    let rows: Vec<usize> = (0..m).filter(|&i| needs_dense(&x[i * k..(i + 1) * k], g, bits)).collect();
    if rows.is_empty() {
        return;
    }
    let (groups, rb) = (layout.groups(), layout.row_bytes());
    let one_row = QuantLayout { n: 1, ..layout };
    let (mut s, mut mm, mut codes, mut w) = (vec![0f32; groups], vec![0f32; groups], vec![0u8; k], vec![0f32; k]);
    for row in 0..n {
        params.row_into(row, (0, groups), isa, &mut s, &mut mm);
        crate::quant::dequantize_row(&packed[row * rb..(row + 1) * rb], &s, &mm, one_row, 0, &mut codes, &mut w);
        for &i in &rows {
            out[i * n + row] = w.iter().zip(&x[i * k..(i + 1) * k]).map(|(a, b)| a * b).sum();
        }
    }
}

/// Writes the (N, M) matrix `t` into `out` as (M, N).
fn transpose_into(t: &[f32], n: usize, m: usize, out: &mut [f32]) {
    for (row, col) in t.chunks_exact(m).enumerate().take(n) {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + row] = v;
        }
    }
}

/// Σ a·b with the given instruction set.
#[inline]
pub(crate) fn dot_isa(a: &[f32], b: &[f32], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx2() {
        return crate::x86::dot(cpu, a, b);
    }
    dot(a, b)
}

/// Runs `run_rows(row0, outputs, scratch)` over chunks of the N weight rows, each chunk's
/// outputs laid out (rows, M), in parallel when the layer has at least
/// [`PARALLEL_MIN_WEIGHTS`] weights, and leaves `out` as (M, N). `init` makes one scratch
/// per worker.
pub(crate) fn for_weight_rows<S: Send>(
    n: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
    init: impl Fn() -> S + Send + Sync,
    run_rows: impl Fn(usize, &mut [f32], &mut S) + Send + Sync,
) {
    // Outputs land transposed, one weight row against all M activation rows; with M = 1
    // that is already `out`.
    let mut out_t_buf = if m == 1 { Vec::new() } else { vec![0f32; n * m] };
    let out_t: &mut [f32] = if m == 1 { &mut *out } else { &mut out_t_buf };
    if n * k < PARALLEL_MIN_WEIGHTS {
        run_rows(0, out_t, &mut init());
    } else {
        // A few chunks per thread balance the load; each keeps whole rows, an even number
        // of them (the exact M = 1 kernel takes rows in pairs).
        let chunks = crate::parallel::parallel_threads() * 4;
        let rows = (n.div_ceil(chunks).max(4) + 1) & !1;
        crate::parallel::for_each_chunk(out_t, rows * m, |c, o| run_rows(c * rows, o, &mut init()));
    }
    if m > 1 {
        transpose_into(&out_t_buf, n, m, out);
    }
}

#[cfg(test)]
mod tests {
    use super::exact::qmatmul_with;
    use super::*;
    use crate::quant::{dequantize, quantize, ParamDtype};
    use crate::testutil::random_f32;

    /// Rows with ±Inf, NaN or values large enough to overflow the factored partial sums give
    /// what a dense matmul gives (IEEE: Inf·0 = NaN, Inf − Inf = NaN), on every instruction
    /// set, both parameter dtypes and every route (int8, bf16, tiled); the finite rows of the same call are
    /// untouched.
    #[test]
    fn non_finite_and_huge_inputs_follow_dense_semantics() {
        let (n, k, g, m) = (24usize, 128usize, 32usize, 6usize);
        for bits in [2u32, 3, 4, 8] {
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let mut w = random_f32(n * k, 21);
            w[5 * k..5 * k + g].fill(0.0); // a zero group: W~ = 0 exactly there
            w[9 * k + 32..9 * k + 64].iter_mut().for_each(|v| *v = v.abs() + 0.5); // all positive
            let mut p = vec![0u8; layout.packed_len()];
            let (mut s, mut o) = (vec![0f32; n * 4], vec![0f32; n * 4]);
            quantize(&w, layout, ParamDtype::F16, &mut p, &mut s, &mut o).unwrap();
            let mut wq = vec![0f32; n * k];
            dequantize(&p, &s, &o, layout, &mut wq).unwrap();
            let s16: Vec<u16> = s.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let o16: Vec<u16> = o.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let mut x = random_f32(m * k, 22);
            // Row 0: +Inf in group 0 (it meets the zero group of weight row 5). Row 1: −Inf
            // in group 1 and +Inf in group 3. Row 2: NaN. Row 3: finite. Row 4: one value
            // beyond the factored form's safe range, finite in a dense matmul. Row 5: +Inf
            // in group 1 (all positive on weight row 9).
            let huge = f32::MAX / (g as f32 * max_code(bits) as f32);
            x[3] = f32::INFINITY;
            x[k + 40] = f32::NEG_INFINITY;
            x[k + 100] = f32::INFINITY;
            x[2 * k + 7] = f32::NAN;
            x[4 * k + 10] = -3.0 * huge;
            x[5 * k + 50] = f32::INFINITY;
            let want: Vec<f64> = (0..m * n)
                .map(|t| {
                    let (i, j) = (t / n, t % n);
                    (0..k).map(|c| wq[j * k + c] as f64 * x[i * k + c] as f64).sum()
                })
                .collect();
            assert!(want[5].is_nan() && want[n + 9].is_nan() && want[5 * n + 9] == f64::INFINITY);
            for isa in Isa::available() {
                for params in
                    [GroupParams::F32 { scales: &s, offsets: &o }, GroupParams::F16 { scales: &s16, offsets: &o16 }]
                {
                    // Routes: exact, int8, bf16 activations, and (4-bit, f16) the tiled layout.
                    for route in ["exact", "int8", "bf16", "tiled"] {
                        let f16 = matches!(params, GroupParams::F16 { .. });
                        if route == "tiled" && !(bits == 4 && f16) {
                            continue;
                        }
                        let mut y = vec![0f32; m * n];
                        match route {
                            "exact" => qmatmul_with(&x, m, &p, params, layout, &mut y, isa).unwrap(),
                            "int8" => int8::qmatmul_int8_with(&x, m, &p, params, layout, &mut y, isa).unwrap(),
                            "bf16" => bf16::qmatmul_bf16_with(&x, m, &p, params, layout, &mut y, isa).unwrap(),
                            _ => {
                                let mut t = vec![0u8; tiled::tiled_len(&layout)];
                                tiled::repack(&p, &s16, &o16, layout, &mut t).unwrap();
                                tiled::qmatmul_tiled_with(&x, m, &t, layout, &mut y, isa).unwrap();
                            }
                        }
                        for t in 0..m * n {
                            let (got, want) = (y[t] as f64, want[t]);
                            let case = format!("bits={bits} {isa:?} route={route} row {} col {}", t / n, t % n);
                            if t / n == 3 {
                                // The finite row keeps its route's accuracy (int8: its own bound).
                                assert!(got.is_finite(), "{case}");
                            } else if want.is_finite() {
                                assert!((got - want).abs() <= 1e-5 * want.abs().max(1e30), "{case}: {got} vs {want}");
                            } else {
                                assert!(got.is_nan() == want.is_nan() && (want.is_nan() || got == want), "{case}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Factored (K-quant) group parameters: each value is f32(factor)·int, exactly, for
    /// unsigned and signed ints, whole rows and group ranges that start and end inside a
    /// factor; every route gives the same bits as the same values passed as f32, and the
    /// exact route matches an independent float64 reference.
    #[test]
    fn factored_params_expand_exactly_on_every_route() {
        use crate::testutil::{random_codes, SplitMix};
        let mut rng = SplitMix::new(77);
        for (bits, g, per, n, k) in [
            (4u32, 32usize, 8usize, 10usize, 512usize),
            (6, 16, 16, 7, 768),
            (2, 16, 16, 5, 256),
            (3, 16, 16, 9, 512),
            (5, 32, 8, 6, 256),
            (8, 32, 2, 4, 192),
        ] {
            let layout = QuantLayout::new(n, k, bits, g).unwrap();
            let groups = k / g;
            let codes = random_codes(n * k, bits, rng.next_u64());
            let mut p = vec![0u8; layout.packed_len()];
            crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
            let sub_u: Vec<u8> = (0..n * groups).map(|_| 1 + (rng.next_u64() % 63) as u8).collect();
            let sub_i: Vec<i8> = (0..n * groups).map(|_| (rng.next_u64() % 255) as i32 as i8).collect();
            let factor = |rng: &mut SplitMix| half::f16::from_f32(1e-3 * (1.0 + 4.0 * rng.uniform().abs())).to_bits();
            let sf: Vec<u16> = (0..n * groups / per).map(|_| factor(&mut rng)).collect();
            let of: Vec<u16> = (0..n * groups / per)
                .map(|_| half::f16::from_bits(factor(&mut rng)).to_f32())
                .map(|v| half::f16::from_f32(-v).to_bits())
                .collect();
            for signed in [false, true] {
                let ints = if signed { GroupInts::I8(&sub_i) } else { GroupInts::U8(&sub_u) };
                let int_at = |i: usize| if signed { sub_i[i] as f64 } else { sub_u[i] as f64 };
                let params = GroupParams::Factored {
                    scales: ints,
                    scale_factors: &sf,
                    offsets: GroupInts::U8(&sub_u),
                    offset_factors: &of,
                    per_factor: per,
                };
                // The expansion, by an independent float64 computation.
                let f = |v: &[u16], i: usize| half::f16::from_bits(v[i]).to_f64();
                let want_s: Vec<f64> = (0..n * groups).map(|i| f(&sf, i / per) * int_at(i)).collect();
                let want_m: Vec<f64> = (0..n * groups).map(|i| f(&of, i / per) * sub_u[i] as f64).collect();
                let (mut s, mut m) = (vec![0f32; groups], vec![0f32; groups]);
                for row in 0..n {
                    for range in [(0, groups), (1, groups - 1), (per - 1, (per + 1).min(groups))] {
                        s.fill(f32::NAN);
                        params.row_into(row, range, Isa::Scalar, &mut s, &mut m);
                        for l in range.0..range.1 {
                            assert_eq!(s[l] as f64, want_s[row * groups + l], "bits={bits} row {row} group {l}");
                            assert_eq!(m[l] as f64, want_m[row * groups + l], "bits={bits} row {row} group {l}");
                        }
                    }
                }
                let s32: Vec<f32> = want_s.iter().map(|&v| v as f32).collect();
                let m32: Vec<f32> = want_m.iter().map(|&v| v as f32).collect();
                let plain = GroupParams::F32 { scales: &s32, offsets: &m32 };
                for mrows in [1usize, 3, 16] {
                    let x = random_f32(mrows * k, rng.next_u64());
                    for isa in Isa::available() {
                        for route in ["exact", "int8", "bf16"] {
                            let run = |params| {
                                let mut y = vec![0f32; mrows * n];
                                match route {
                                    "exact" => qmatmul_with(&x, mrows, &p, params, layout, &mut y, isa).unwrap(),
                                    "int8" => {
                                        int8::qmatmul_int8_with(&x, mrows, &p, params, layout, &mut y, isa).unwrap()
                                    }
                                    _ => bf16::qmatmul_bf16_with(&x, mrows, &p, params, layout, &mut y, isa).unwrap(),
                                }
                                y
                            };
                            let y = run(params);
                            assert_eq!(y, run(plain), "bits={bits} m={mrows} {isa:?} {route}");
                            if route == "exact" {
                                for (t, &got) in y.iter().enumerate() {
                                    let (i, j) = (t / n, t % n);
                                    let (mut acc, mut mag) = (0f64, 0f64);
                                    for c in 0..k {
                                        let l = j * groups + c / g;
                                        let w = want_s[l] * codes[j * k + c] as f64 + want_m[l];
                                        acc += w * x[i * k + c] as f64;
                                        mag += (w * x[i * k + c] as f64).abs();
                                    }
                                    assert!(
                                        (got as f64 - acc).abs() <= 1e-5 * (mag + 1e-6),
                                        "bits={bits} {isa:?}: {got} vs {acc}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            // Factor counts that do not fit the layout are refused before any read.
            let mut y = vec![0f32; n];
            let x = random_f32(k, 5);
            let bad = GroupParams::Factored {
                scales: GroupInts::U8(&sub_u),
                scale_factors: &sf[1..],
                offsets: GroupInts::U8(&sub_u),
                offset_factors: &of,
                per_factor: per,
            };
            assert!(qmatmul_with(&x, 1, &p, bad, layout, &mut y, Isa::Scalar).is_err());
            let bad = GroupParams::Factored {
                scales: GroupInts::U8(&sub_u),
                scale_factors: &sf,
                offsets: GroupInts::U8(&sub_u),
                offset_factors: &of,
                per_factor: groups + 1,
            };
            assert!(qmatmul_with(&x, 1, &p, bad, layout, &mut y, Isa::Scalar).is_err());
        }
    }
}
