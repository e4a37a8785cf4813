//! Fused dequantize-and-multiply for small M (generation): y = x W~^T straight from the
//! packed codes, never materialising W~.
//!
//! Per (weight row n, group l) the kernels form Σ_k q[n,k]·x[i,k] from codes converted to
//! f32 in registers, then add s[n,l]·Σ + m[n,l]·xsum[i,l], where xsum (the group sums of x)
//! is computed once per call. Accumulation is exact f32 (no activation quantization).
//! The AVX2/FMA kernels live in `x86.rs`, chosen at run time (`isa.rs`); [`row_scalar`] is
//! their twin.
//!
//! The factored form is not a dense matmul for every input: an infinite x[k] meets code 0
//! (0·Inf = NaN) and the offsets' term Σx, so a whole output row would turn NaN where a dense
//! matmul gives ±Inf. Activation rows with a value that is not finite, or large enough for
//! the partial sums to overflow, are recomputed the dense way ([`dense_rows_where_needed`]),
//! on every route (int8 too), so results agree with `x @ W~ᵀ` in IEEE arithmetic.

use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::layout::{max_code, size_product, QuantLayout};
use crate::pack::unpack_row;
use crate::pool::group_sum;

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
/// default storage dtype: converting per row inside the kernel saves a pass over them).
#[derive(Debug, Clone, Copy)]
pub enum GroupParams<'a> {
    F32 { scales: &'a [f32], offsets: &'a [f32] },
    F16 { scales: &'a [u16], offsets: &'a [u16] },
}

impl GroupParams<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            GroupParams::F32 { scales, offsets } => (scales.len(), offsets.len()),
            GroupParams::F16 { scales, offsets } => (scales.len(), offsets.len()),
        }
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
        }
    }
}

/// Scalar twin of the SIMD row kernels: for each of the `out.len()` activation rows i,
/// out[i] = Σ_l (s_l · Σ_{k in l} q[k]·x[i,k] + m_l · xsum[i,l]). `codes` in natural order.
#[allow(clippy::too_many_arguments)]
pub fn row_scalar(codes: &[u8], x: &[f32], ks: usize, xsum: &[f32], s: &[f32], m: &[f32], g: usize, out: &mut [f32]) {
    let groups = s.len();
    for (i, o) in out.iter_mut().enumerate() {
        let xi = &x[i * ks..i * ks + groups * g];
        let mut y = 0f32;
        for l in 0..groups {
            let mut acc = 0f32;
            for (&q, &v) in codes[l * g..(l + 1) * g].iter().zip(&xi[l * g..(l + 1) * g]) {
                acc += q as f32 * v;
            }
            y += s[l] * acc + m[l] * xsum[i * groups + l];
        }
        *o = y;
    }
}

/// Per-worker buffers: one row's f32 scales/offsets and unpacked codes, twice (row pairs).
struct Scratch {
    s: Vec<f32>,
    m: Vec<f32>,
    codes: Vec<u8>,
    s2: Vec<f32>,
    m2: Vec<f32>,
    codes2: Vec<u8>,
}

/// How a call feeds weight rows to the kernels (the SIMD routes carry their CPU proof).
#[derive(Clone, Copy)]
enum Route {
    /// AVX2 straight on the canonical 4-bit row, x permuted to match.
    #[cfg(target_arch = "x86_64")]
    Nib(crate::isa::HasAvx2),
    /// AVX2 on one byte per code (8-bit rows as they are, 2/3-bit rows unpacked).
    #[cfg(target_arch = "x86_64")]
    Bytes(crate::isa::HasAvx2),
    /// Scalar twin on unpacked codes.
    Scalar,
}

impl Route {
    fn choose(isa: Isa, layout: &QuantLayout) -> Route {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = isa.avx2() {
            if layout.group_size.is_multiple_of(16) {
                return if layout.bits == 4 { Route::Nib(cpu) } else { Route::Bytes(cpu) };
            }
        }
        let _ = (isa, layout);
        Route::Scalar
    }

    /// Whether the route reads the canonical 4-bit row as it is.
    fn reads_nibbles(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Route::Nib(_) = self {
            return true;
        }
        false
    }
}

/// Row `row`'s codes for groups [l0, l1) in the encoding `route` reads, indexed by absolute
/// column: the packed row itself for 4-bit rows on the nibble route and for 8-bit rows,
/// else `codes` with the block's 2/3/4-bit codes unpacked into it.
fn row_codes<'a>(
    packed: &'a [u8],
    layout: &QuantLayout,
    nibbles: bool,
    row: usize,
    (l0, l1): (usize, usize),
    codes: &'a mut [u8],
) -> &'a [u8] {
    let rb = layout.row_bytes();
    let prow = &packed[row * rb..(row + 1) * rb];
    if nibbles || layout.bits == 8 {
        prow
    } else {
        let (k0, k1, b) = (l0 * layout.group_size, l1 * layout.group_size, layout.bits as usize);
        unpack_row(&prow[k0 * b / 8..k1 * b / 8], layout.bits, &mut codes[k0..k1]);
        codes
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
    let (sl, ol) = params.lens();
    layout.check_buffers(packed.len(), sl, ol)?;
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

/// x: (M, K) row-major; out: (M, N) row-major; scales/offsets as f32.
pub fn qmatmul(
    x: &[f32],
    m: usize,
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
    layout: QuantLayout,
    out: &mut [f32],
) -> Result<()> {
    qmatmul_with(x, m, packed, GroupParams::F32 { scales, offsets }, layout, out, Isa::detect_best())
}

/// [`qmatmul`] with scales/offsets in either storage dtype and an explicit instruction set
/// (an unavailable one falls back to scalar).
pub fn qmatmul_with(
    x: &[f32],
    m: usize,
    packed: &[u8],
    params: GroupParams<'_>,
    layout: QuantLayout,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    check_call(x, m, packed, &params, &layout, out)?;
    let QuantLayout { n, k, group_size: g, .. } = layout;
    if m == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = crate::wide::route(isa, &layout) {
        crate::wide::qmatmul_wide(cpu, x, &group_sums(x, m, k, g), m, packed, params, layout, out, isa);
        dense_rows_where_needed(x, m, packed, params, layout, isa, out);
        return Ok(());
    }
    let isa = isa.exact();
    let route = Route::choose(isa, &layout);
    let nibbles = route.reads_nibbles();
    let groups = layout.groups();
    // Once per call: the group sums of x (offset term) and, for Nib, x in nibble order.
    let xsum = group_sums(x, m, k, g);
    let x_nib;
    let xk: &[f32] = if nibbles {
        let mut p = vec![0f32; m * k];
        for (o, r) in p.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
            #[cfg(target_arch = "x86_64")]
            crate::x86::permute_x_nib(r, o);
            #[cfg(not(target_arch = "x86_64"))]
            o.copy_from_slice(r);
        }
        x_nib = p;
        &x_nib
    } else {
        x
    };
    // One weight row against all M activation rows: outputs land transposed, (N, M).
    // The whole row is one block of groups. Cutting K into L1-sized blocks of x (so M > 1
    // does not re-read x from L2 for every weight row) was measured slower, with or without
    // software prefetch of the strided weight blocks; the kernels still take a group range.
    let block_groups = groups;
    // Weight rows against all M activation rows: outputs land transposed, (N, M).
    let run_rows = |row0: usize, o: &mut [f32], scratch: &mut Scratch| {
        let Scratch { s, m: mm, codes, s2, m2, codes2 } = scratch;
        let nrows = o.len() / m;
        o.fill(0.0);
        let mut l0 = 0;
        while l0 < groups {
            let lr = (l0, (l0 + block_groups).min(groups));
            let mut r = 0;
            // M = 1 on AVX2: rows in pairs (see `x86::gemv2`).
            #[cfg(target_arch = "x86_64")]
            if let (1, Route::Nib(cpu) | Route::Bytes(cpu)) = (m, route) {
                use crate::x86::{dot, gemv2, RowCodes};
                while r + 2 <= nrows {
                    let row = row0 + r;
                    params.row_into(row, lr, isa, s, mm);
                    params.row_into(row + 1, lr, isa, s2, m2);
                    let rows = [
                        RowCodes::new(nibbles, row_codes(packed, &layout, nibbles, row, lr, codes)),
                        RowCodes::new(nibbles, row_codes(packed, &layout, nibbles, row + 1, lr, codes2)),
                    ];
                    let (y0, y1) = gemv2(cpu, rows, xk, s, s2, g, lr);
                    let xs = &xsum[lr.0..lr.1];
                    o[r] += y0 + dot(cpu, &mm[lr.0..lr.1], xs);
                    o[r + 1] += y1 + dot(cpu, &m2[lr.0..lr.1], xs);
                    r += 2;
                }
            }
            while r < nrows {
                let row = row0 + r;
                params.row_into(row, lr, isa, s, mm);
                let src = row_codes(packed, &layout, nibbles, row, lr, codes);
                let orow = &mut o[r * m..(r + 1) * m];
                match route {
                    Route::Scalar => row_scalar(src, xk, k, &xsum, s, mm, g, orow),
                    #[cfg(target_arch = "x86_64")]
                    Route::Nib(cpu) | Route::Bytes(cpu) => {
                        let row = crate::x86::RowCodes::new(nibbles, src);
                        crate::x86::rows_exact(cpu, row, xk, k, &xsum, groups, s, mm, g, lr, orow)
                    }
                }
                r += 1;
            }
            l0 = lr.1;
        }
    };
    let init = || Scratch {
        s: vec![0f32; groups],
        m: vec![0f32; groups],
        codes: vec![0u8; k],
        s2: vec![0f32; groups],
        m2: vec![0f32; groups],
        codes2: vec![0u8; k],
    };
    for_weight_rows(n, m, k, out, init, run_rows);
    dense_rows_where_needed(x, m, packed, params, layout, isa, out);
    Ok(())
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
    use super::*;
    use crate::quant::{dequantize, quantize, ParamDtype};
    use crate::testutil::{random_f32, SplitMix};

    #[test]
    fn matches_f64_reference() {
        for bits in crate::SUPPORTED_BITS {
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

    /// Every instruction set and both parameter dtypes against a float64 reference built from
    /// unpacked codes, on odd shapes: M = 1..=16 (all block splits), N not a multiple of the
    /// chunking, K in several chunks, group sizes with and without a SIMD path, and a layer
    /// large enough to run in parallel.
    #[test]
    fn simd_and_scalar_twins_match_f64_reference() {
        let mut rng = SplitMix::new(99);
        let cases: &[(usize, usize, usize)] = &[
            (7, 64, 16),
            (13, 96, 32),
            (5, 48, 48),
            (11, 40, 8),
            (9, 24, 24),
            (3, 256, 128),
            (600, 512, 64), // parallel path (N*K above the threshold)
            // The 512-bit route's K chunks for M > 1 (16 KiB of x: 512 columns at M = 8,
            // 256 at M = 16) with a short last chunk, and row blocks of 16 with a remainder.
            (37, 1120, 32),
            (21, 640, 128),
        ];
        for bits in crate::SUPPORTED_BITS {
            for &(n, k, g) in cases {
                if !g.is_multiple_of(crate::layout::group_multiple(bits)) {
                    continue;
                }
                let layout = QuantLayout::new(n, k, bits, g).unwrap();
                let groups = k / g;
                let codes = crate::testutil::random_codes(n * k, bits, rng.next_u64());
                let mut p = vec![0u8; layout.packed_len()];
                crate::pack::pack(&codes, n, k, bits, &mut p).unwrap();
                // Scales and offsets exactly representable in f16, so both dtypes agree.
                let s16: Vec<u16> = random_f32(n * groups, rng.next_u64())
                    .iter()
                    .map(|v| half::f16::from_f32(0.01 + 0.1 * v.abs()).to_bits())
                    .collect();
                let m16: Vec<u16> =
                    random_f32(n * groups, rng.next_u64()).iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
                let s32: Vec<f32> = s16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
                let m32: Vec<f32> = m16.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
                let ms: Vec<usize> = if n * k > 100_000 { vec![1, 3, 8, 13] } else { (1..=16).collect() };
                for m in ms {
                    let x = random_f32(m * k, rng.next_u64());
                    let mut want = vec![0f64; m * n];
                    let mut scale = vec![0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let (mut acc, mut mag) = (0f64, 0f64);
                            for t in 0..k {
                                let l = j * groups + t / g;
                                let w = s32[l] as f64 * codes[j * k + t] as f64 + m32[l] as f64;
                                acc += w * x[i * k + t] as f64;
                                mag += (w * x[i * k + t] as f64).abs();
                            }
                            want[i * n + j] = acc;
                            scale[i * n + j] = mag;
                        }
                    }
                    for isa in Isa::available() {
                        for params in [
                            GroupParams::F32 { scales: &s32, offsets: &m32 },
                            GroupParams::F16 { scales: &s16, offsets: &m16 },
                        ] {
                            let mut y = vec![0f32; m * n];
                            qmatmul_with(&x, m, &p, params, layout, &mut y, isa).unwrap();
                            for t in 0..m * n {
                                let err = (y[t] as f64 - want[t]).abs();
                                // f32 accumulation: error bounded by ~K·eps times Σ|w·x|.
                                assert!(
                                    err <= 1e-5 * (scale[t] + 1.0),
                                    "bits={bits} n={n} k={k} g={g} m={m} {isa:?} {params:?}: got {} want {}",
                                    y[t],
                                    want[t]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

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
                            "int8" => crate::q8::qmatmul_int8_with(&x, m, &p, params, layout, &mut y, isa).unwrap(),
                            "bf16" => crate::bf16::qmatmul_bf16_with(&x, m, &p, params, layout, &mut y, isa).unwrap(),
                            _ => {
                                let mut t = vec![0u8; crate::tiles::tiled_len(&layout)];
                                crate::tiles::repack(&p, &s16, &o16, layout, &mut t).unwrap();
                                crate::tiles::qmatmul_tiled_with(&x, m, &t, layout, &mut y, isa).unwrap();
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

    #[test]
    fn rejects_bad_lengths() {
        let layout = QuantLayout::new(4, 32, 4, 16).unwrap();
        let (p, s) = (vec![0u8; 64], vec![0f32; 8]);
        let mut y = vec![0f32; 4];
        assert!(qmatmul(&[0f32; 31], 1, &p, &s, &s, layout, &mut y).is_err());
        assert!(qmatmul(&[0f32; 32], 1, &p[1..], &s, &s, layout, &mut y).is_err());
    }
}
