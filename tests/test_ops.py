"""qalora.ops against independent float64 references, on random inputs, every bit width."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import ops

BITS = [2, 3, 4, 5, 6, 8]
BACKENDS = ["core", "torch"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rng(seed):
    return np.random.default_rng(seed)


def random_weight(n, k, seed, device="cpu"):
    w = rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return torch.from_numpy(w).to(device)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(1, 8), (7, 24), (33, 136), (5, 256)])
def test_pack_is_byte_exact(bits, backend, n, k):
    codes = rng(n * k + bits).integers(0, 2**bits, size=(n, k), dtype=np.int64)
    packed = (
        ops.pack(
            torch.from_numpy(codes),
            bits,
        )
        if backend == "core"
        else qalora._core.pack(torch.from_numpy(codes), bits, "torch")
    )
    assert packed.dtype == torch.uint8 and packed.shape == (n, k * bits // 8)
    np.testing.assert_array_equal(packed.numpy(), ref.pack(codes, bits))
    back = qalora._core.unpack(packed, bits, k, backend)
    np.testing.assert_array_equal(back.numpy(), codes.astype(np.uint8))
    np.testing.assert_array_equal(ref.unpack(packed.numpy(), bits, k), codes)


def test_pack_documented_4bit_layout():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert ops.pack(codes, 4).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("bits", BITS)
def test_pack_numpy_arrays(bits):
    codes = rng(bits).integers(0, 2**bits, size=(9, 48), dtype=np.int32)
    packed = ops.pack(codes, bits)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, ref.pack(codes.astype(np.int64), bits))
    np.testing.assert_array_equal(ops.unpack(packed, bits, 48), codes)


def test_pack_accepts_every_integer_dtype():
    codes = torch.randint(0, 16, (3, 32))
    want = ops.pack(codes, 4)
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(ops.pack(codes.to(dt), 4), want)
    # A non-contiguous view packs like its contiguous copy.
    wide = torch.randint(0, 16, (32, 6))
    assert torch.equal(ops.pack(wide.t(), 4), ops.pack(wide.t().contiguous(), 4))


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g", [(7, 64, 32), (33, 96, 16), (5, 576, 64), (3, 48, 48)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_quantize_matches_reference(bits, n, k, g, scale_dtype):
    if g % {3: 8, 5: 8, 6: 4}.get(bits, 1):
        pytest.skip("groups start on a byte boundary (multiples of 8 at 3 and 5 bits)")
    w = random_weight(n, k, seed=bits * 1000 + k + g)
    store = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}[scale_dtype]
    results = {}
    for backend in BACKENDS:
        packed, scales, offsets = ops.quantize(w, bits, g, scale_dtype, backend=backend)
        assert packed.shape == (n, k * bits // 8) and scales.shape == (n, k // g) == offsets.shape
        assert scales.dtype == scale_dtype == offsets.dtype
        results[backend] = (packed, scales, offsets)
        s64, m64 = scales.double().numpy(), offsets.double().numpy()
        if store is not None:
            rs, rm = ref.params(w.numpy(), bits, g, store)
            np.testing.assert_allclose(s64, rs, rtol=1e-6, atol=0)
            np.testing.assert_array_equal(m64, rm)
        codes = ref.unpack(packed.numpy(), bits, k)
        want, tie = ref.codes_for(w.numpy(), s64, m64, bits, g)
        # Codes are the nearest ones under the stored parameters (ties are ambiguous only
        # within float32 rounding of (w - m) / s).
        assert np.all((codes == want) | (tie < 1e-4))
        err = np.abs(ref.dequantize(codes, s64, m64, g) - w.double().numpy())
        # Half a step, plus what rounding the parameters to their dtype can add at the
        # ends of the range (qmax steps of scale error, one offset error).
        rel = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[scale_dtype]
        s_full, m_full = np.repeat(s64, g, axis=1), np.repeat(m64, g, axis=1)
        bound = s_full / 2 * (1 + 1e-5) + (2**bits - 1) * s_full * rel + np.abs(m_full) * rel + 1e-7
        assert np.all(err <= bound)
    for a, b in zip(results["core"], results["torch"]):
        assert torch.equal(a, b)


def test_quantize_constant_and_tiny_groups():
    w = torch.tensor([[0.5] * 8 + [-2.0] * 8, [1e-9] * 4 + [2e-9] * 4 + [3.0] * 8])
    for backend in BACKENDS:
        p, s, m = ops.quantize(w, 4, 8, backend=backend)
        dense = ops.dequantize(p, s, m, 4, 8)
        assert torch.isfinite(dense).all() and torch.isfinite(s).all()
        assert dense[0].tolist() == [0.5] * 8 + [-2.0] * 8
        assert torch.allclose(dense[1], w[1], atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dequantize_matches_reference(bits, dtype):
    n, k, g = 13, 128, 32
    w = random_weight(n, k, seed=bits)
    p, s, m = ops.quantize(w, bits, g)
    want = ref.dequantize(ref.unpack(p.numpy(), bits, k), s.double().numpy(), m.double().numpy(), g)
    for backend in BACKENDS:
        dense = ops.dequantize(p, s, m, bits, g, dtype, backend=backend)
        assert dense.dtype == dtype and dense.shape == (n, k)
        tol = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        np.testing.assert_allclose(dense.double().numpy(), want, rtol=tol, atol=tol * 0.1)


# ---------------------------------------------------------------- qmatmul


def _quantized(n, k, g, bits, seed=0, device="cpu"):
    w = random_weight(n, k, seed, device)
    p, s, m = ops.quantize(w, bits, g)
    dense64 = ops.dequantize(p, s, m, bits, g, torch.float64).cpu().numpy()
    return (p, s, m), dense64


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 64), (40, 64), (2, 33, 64)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qmatmul_matches_float64(bits, shape, backend):
    n, k, g = 37, shape[-1], 16
    q, dense64 = _quantized(n, k, g, bits, seed=bits)
    x = torch.from_numpy(rng(len(shape)).standard_normal(shape).astype(np.float32))
    y = ops.qmatmul(x, *q, bits, g, backend=backend)
    assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
    want = x.double().numpy() @ dense64.T
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3), (torch.float64, 1e-10)])
@pytest.mark.parametrize("m", [1, 4, 64])
def test_qmatmul_low_and_high_precision(dtype, tol, m):
    n, k, g, bits = 24, 96, 32, 4
    q, dense64 = _quantized(n, k, g, bits, seed=5)
    x = torch.from_numpy(rng(m).standard_normal((m, k))).to(dtype)
    want = x.double().numpy() @ dense64.T
    for backend in BACKENDS:
        y = ops.qmatmul(x, *q, bits, g, backend=backend)
        assert y.dtype == dtype
        np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


def test_qmatmul_large_layer_crosses_tiles():
    # 4096 x 1024 rows exceed one 2M-element tile, so the tiled path runs several tiles.
    n, k, g, bits = 2304, 1024, 128, 4
    q, dense64 = _quantized(n, k, g, bits, seed=9)
    x = torch.from_numpy(rng(1).standard_normal((20, k)).astype(np.float32))
    y = ops.qmatmul(x, *q, bits, g)
    np.testing.assert_allclose(y.double().numpy(), x.double().numpy() @ dense64.T, rtol=1e-4, atol=1e-4)
    grad = torch.from_numpy(rng(2).standard_normal((20, n)).astype(np.float32))
    gx = qalora._core.qmatmul_grad_input(grad, *q, bits, g, "core")
    np.testing.assert_allclose(gx.double().numpy(), grad.double().numpy() @ dense64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_qmatmul_gradcheck(bits, backend):
    n, k, g = 6, 16, 8
    q, _ = _quantized(n, k, g, bits, seed=3)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.qmatmul(t, *q, bits, g, backend=backend), (x,))


@pytest.mark.parametrize("m", [1, 5, 30])
def test_qmatmul_backward_float32_matches_dense(m):
    n, k, g, bits = 20, 64, 32, 3
    q, dense64 = _quantized(n, k, g, bits, seed=4)
    x = torch.randn(m, k, requires_grad=True)
    y = ops.qmatmul(x, *q, bits, g)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    np.testing.assert_allclose(x.grad.double().numpy(), upstream.double().numpy() @ dense64, rtol=1e-4, atol=1e-5)


def test_qmatmul_accepts_non_contiguous_x():
    q, dense64 = _quantized(8, 32, 16, 4)
    x = torch.randn(32, 3).t()
    np.testing.assert_allclose(
        ops.qmatmul(x, *q, 4, 16).double().numpy(), x.double().numpy() @ dense64.T, rtol=1e-4, atol=1e-5
    )


def _int8_case(n, k, g, shape, seed):
    q, dense64 = _quantized(n, k, g, 4, seed=seed)
    x = rng(seed).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::53] *= 15.0  # outliers, as real activations have
    return q, dense64, torch.from_numpy(x)


@pytest.mark.parametrize("g", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("shape", [(1, 768), (5, 768), (2, 8, 768), (16, 768)])
def test_qmatmul_int8_activations_match_float64(g, shape):
    n, k = 45, 768
    (p, s, m), dense64, x = _int8_case(n, k, g, shape, seed=g)
    y = ops.qmatmul(x, p, s, m, 4, g, activations="int8").double().numpy().reshape(-1, n)
    codes = ref.unpack(p.numpy(), 4, k).astype(np.float64)
    sq = codes * np.repeat(s.double().numpy(), g, axis=1)  # scale term of W, (N, K)
    offs = np.repeat(m.double().numpy(), g, axis=1)  # offset term of W
    x2 = x.double().numpy().reshape(-1, k)
    block = next(b for b in (128, 64, 32) if g % b == 0)  # one scale per group, up to 128
    xh = ref.int8_activations(x2, block)
    # The scale term sees the int8 activations, the offset term the exact ones.
    want = xh @ sq.T + x2 @ offs.T
    mag = np.abs(xh) @ np.abs(sq).T + np.abs(x2) @ np.abs(offs).T
    assert np.all(np.abs(y - want) <= 1e-5 * (mag + 1)), np.abs(y - want).max()
    # The documented bound against the exact product: sum_k |s q| * d_block / 2.
    d = np.repeat(np.abs(x2).reshape(-1, k // block, block).max(-1) / 127, block, axis=1)
    bound = (d / 2) @ np.abs(sq).T
    exact = x2 @ dense64.T
    assert np.all(np.abs(y - exact) <= bound * (1 + 1e-5) + 1e-4)
    assert np.abs(y - exact).max() > 0  # it really took the int8 route


@pytest.mark.parametrize("bits,g,m", [(2, 32, 1), (3, 32, 4), (8, 32, 2), (4, 16, 3), (4, 32, 17), (4, 32, 40)])
def test_qmatmul_int8_activations_exact_where_not_covered(bits, g, m):
    # Other bit widths, group sizes that are not multiples of 32 and batches above 16 rows
    # are computed exactly.
    q, _ = _quantized(20, 64, g, bits, seed=m)
    x = torch.randn(m, 64)
    y8 = ops.qmatmul(x, *q, bits, g, activations="int8")
    assert torch.equal(y8, ops.qmatmul(x, *q, bits, g))


def test_qmatmul_int8_activations_backward_is_exact():
    (p, s, m), dense64, x = _int8_case(24, 128, 32, (3, 128), seed=1)
    x.requires_grad_(True)
    y = ops.qmatmul(x, p, s, m, 4, 32, activations="int8")
    up = torch.randn_like(y)
    y.backward(up)
    np.testing.assert_allclose(x.grad.double().numpy(), up.double().numpy() @ dense64, rtol=1e-4, atol=1e-5)


def _specials_case(bits, m, dtype):
    """A weight with an exactly-zero group (row 5) and an all-positive one (row 9), and
    activations whose first rows hold +Inf (meeting the zero group: NaN), -Inf and +Inf
    together (NaN wherever the weights differ in sign), NaN, a finite value too large for
    the factored form's partial sums, and +Inf meeting only positive weights on row 9; the
    remaining rows are finite."""
    torch.manual_seed(bits + m)
    w = torch.randn(24, 128)
    w[5, :32] = 0.0
    w[9, 32:64] = w[9, 32:64].abs() + 0.5
    q = ops.quantize(w, bits, 32)
    dense = ops.dequantize(*q, bits, 32)
    x = torch.randn(m, 128)
    specials = [(0, 3, float("inf")), (1, 40, float("-inf")), (1, 100, float("inf")), (2, 7, float("nan"))]
    specials += [(3, 10, -1e37), (4, 50, float("inf"))]
    for row, col, v in specials:
        if row < m:
            x[row, col] = v
    return q, dense, x.to(dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_non_finite_inputs_follow_dense_semantics(bits, m, dtype):
    # A dense matmul gives +-Inf where an infinite input meets weights of one sign and NaN
    # where it meets a zero weight or both signs; every route agrees with it (the fused
    # small-M kernels used to give NaN for the whole row).
    q, dense, x = _specials_case(bits, m, dtype)
    want = (x.float() @ dense.T).to(dtype)
    assert want[0, 5].isnan() and not want[0].isnan().all()
    if m > 1:
        assert want[1].isnan().any() and want[4, 9] == float("inf") and want[5:].isfinite().all()
    special = slice(0, min(m, 5))
    # bf16 inputs above 16 rows on the core run bf16 GEMMs on the weight dequantized to bf16
    # (as nn.Linear does on bf16 weights): their reference rounds the weight the same way.
    want_bf16_gemm = (x.float() @ dense.to(dtype).float().T).to(dtype)
    for backend, activations in [("core", "exact"), ("core", "int8"), ("core", "bf16"), ("torch", "exact")]:
        y = ops.qmatmul(x, *q, bits, 32, backend=backend, activations=activations)
        case = f"{backend}/{activations}"
        ref = want_bf16_gemm if (backend, dtype, m > 16) == ("core", torch.bfloat16, True) else want
        torch.testing.assert_close(y[special], ref[special], rtol=1e-4, atol=1e-3, equal_nan=True, msg=case)
        # The finite rows of the same call keep their route (int8: its own error bound).
        torch.testing.assert_close(y[5:], want[5:], rtol=0.05, atol=0.5, msg=case)


@pytest.mark.parametrize("m", [1, 7, 40])
def test_qmatmul_backward_with_non_finite_gradients_follows_dense_semantics(m):
    q, dense, _ = _specials_case(4, m, torch.float32)
    grad_y = torch.randn(m, 24)
    grad_y[0, 5] = float("inf")
    if m > 1:
        grad_y[1, 2], grad_y[1, 9] = float("-inf"), float("inf")
    want = grad_y @ dense
    for backend in BACKENDS:
        x = torch.randn(m, 128, requires_grad=True)
        ops.qmatmul(x, *q, 4, 32, backend=backend).backward(grad_y)
        torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-3, equal_nan=True, msg=backend)


def test_qmatmul_rejects_unknown_activation_mode():
    q, _ = _quantized(8, 64, 32, 4)
    with pytest.raises(qalora.InvalidValueError, match="activations: got 'fp8', allowed: 'exact', 'int8'"):
        ops.qmatmul(torch.randn(2, 64), *q, 4, 32, activations="fp8")
    with pytest.raises(qalora.DTypeError, match="activations: expected a str, got NoneType"):
        ops.qmatmul(torch.randn(2, 64), *q, 4, 32, activations=None)


@cuda
def test_qmatmul_int8_activations_on_cuda_are_exact():
    q, _ = _quantized(16, 64, 32, 4, device="cuda")
    x = torch.randn(2, 64, device="cuda")
    assert torch.equal(ops.qmatmul(x, *q, 4, 32, activations="int8"), ops.qmatmul(x, *q, 4, 32))


# ---------------------------------------------------------------- group_pool / merge


@pytest.mark.parametrize("g", [1, 3, 8, 32, 96])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_pool_matches_reference(g, backend):
    x = torch.from_numpy(rng(g).standard_normal((2, 5, 96)).astype(np.float32))
    y = ops.group_pool(x, g, backend=backend)
    assert y.shape == (2, 5, 96 // g)
    np.testing.assert_allclose(y.double().numpy(), ref.group_pool(x.numpy(), g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_pool_gradcheck(backend):
    x = torch.randn(3, 4, 24, dtype=torch.float64, requires_grad=True)
    # float64 runs on the torch path (the core kernel is float32; forcing it is refused).
    assert torch.autograd.gradcheck(lambda t: ops.group_pool(t, 6), (x,))
    if backend == "core":
        with pytest.raises(qalora.DTypeError, match="float32"):
            ops.group_pool(x, 6, backend="core")
    x32 = torch.randn(7, 24, requires_grad=True)
    ops.group_pool(x32, 8, backend=backend).pow(2).sum().backward()
    x64 = x32.detach().double().requires_grad_()
    x64.reshape(7, 3, 8).mean(-1).pow(2).sum().backward()
    np.testing.assert_allclose(x32.grad.numpy(), x64.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_offsets_matches_reference(offset_dtype, backend):
    n, l, r, g, c = 19, 7, 4, 32, 16 / 4
    gen = rng(11)
    m = torch.from_numpy(gen.standard_normal((n, l)).astype(np.float32)).to(offset_dtype)
    a = torch.from_numpy(gen.standard_normal((r, l)).astype(np.float32))
    b = torch.from_numpy(gen.standard_normal((n, r)).astype(np.float32))
    out = ops.merge_offsets(m, a, b, c, g, backend=backend)
    assert out.dtype == offset_dtype and out.shape == (n, l)
    want = ref.merge(m.double().numpy(), a.numpy(), b.numpy(), c, g)
    tol = {torch.float16: 1e-3, torch.float32: 1e-6, torch.bfloat16: 8e-3}[offset_dtype]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [-1, 256, 300])
def test_pack_rejects_codes_a_uint8_cast_would_wrap(dt, bad):
    codes = torch.randint(0, 16, (300, 256)).to(dt)  # above the parallel threshold
    if torch.iinfo(dt).max < bad:
        return
    codes[123, 45] = bad
    codes[200, 0] = bad
    with pytest.raises(qalora.CodeRangeError, match=f"value {bad} at row 123, column 45"):
        ops.pack(codes, 4)


@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32, torch.bfloat16, torch.float64])
def test_merge_offsets_large_parallel_path(offset_dtype):
    n, l, r, g, c = 1100, 45, 16, 32, 0.75  # above the parallel threshold, L not a multiple of 32
    gen = rng(12)
    m = torch.from_numpy(gen.standard_normal((n, l)).astype(np.float32)).to(offset_dtype)
    a = torch.from_numpy(gen.standard_normal((r, l)).astype(np.float32))
    b = torch.from_numpy(gen.standard_normal((n, r)).astype(np.float32))
    out = ops.merge_offsets(m, a, b, c, g, backend="core")
    assert out.dtype == offset_dtype and out.shape == (n, l)
    want = ref.merge(m.double().numpy(), a.numpy(), b.numpy(), c, g)
    tol = {torch.float16: 1e-3, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float64: 1e-5}[offset_dtype]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ops.merge_offsets(m, a, b, c, g, backend="torch"), rtol=tol, atol=tol)


def test_merged_offsets_reproduce_the_adapter_output():
    """The merge identity end to end: x W'^T == x W^T + c * B A pool(x)."""
    n, k, g, bits, r, c = 16, 128, 32, 4, 4, 2.0
    w = random_weight(n, k, 1)
    p, s, m = ops.quantize(w, bits, g, torch.float32)
    a, b = torch.randn(r, k // g), torch.randn(n, r)
    x = torch.randn(5, k)
    unmerged = ops.qmatmul(x, p, s, m, bits, g) + c * ops.group_pool(x, g) @ a.t() @ b.t()
    merged = ops.qmatmul(x, p, s, ops.merge_offsets(m, a, b, c, g), bits, g)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def _q():
    return ops.quantize(random_weight(4, 64, 0), 4, 32)


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (lambda: ops.pack(torch.full((2, 8), 16), 4), qalora.CodeRangeError, "value 16 at row 0, column 0"),
        (lambda: ops.pack(torch.full((2, 8), -1), 4), qalora.CodeRangeError, "outside [0, 15]"),
        (lambda: ops.pack(np.full((2, 8), 9), 3), qalora.CodeRangeError, "outside [0, 7]"),
        (lambda: ops.pack(torch.zeros(2, 8, dtype=torch.int32), 7), qalora.UnsupportedBitsError, "2, 3, 4, 5, 6 and 8"),
        (lambda: ops.pack(torch.zeros(2, 8), 4), qalora.DTypeError, "torch.float32"),
        (lambda: ops.pack(torch.zeros(2, 6, dtype=torch.uint8), 3), qalora.ShapeError, "multiple of 8"),
        (lambda: ops.pack(torch.zeros(0, 8, dtype=torch.uint8), 4), qalora.ShapeError, "empty"),
        (lambda: ops.pack([[1, 2]], 4), qalora.DTypeError, "expected a torch.Tensor, got list"),
        (lambda: ops.unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 8), qalora.ShapeError, "need 4"),
        (lambda: ops.unpack(torch.zeros(2, 4, dtype=torch.uint8), 4.0, 8), qalora.DTypeError, "expected an int"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 4, 48), qalora.GroupSizeError, "must divide in_features K = 64"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 4, 0), qalora.GroupSizeError, "got 0"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 3, 4), qalora.GroupSizeError, "multiple of 8"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 1, 32), qalora.UnsupportedBitsError, "got 1"),
        (
            lambda: ops.quantize(random_weight(4, 64, 0).int(), 4, 32),
            qalora.DTypeError,
            "weight: got dtype torch.int32",
        ),
        (lambda: ops.quantize(torch.randn(64), 4, 32), qalora.ShapeError, "2-D"),
        (lambda: ops.quantize(torch.tensor([[1.0, float("nan")] * 16]), 4, 32), qalora.InvalidValueError, "column 1"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 4, 32, torch.int8), qalora.DTypeError, "scale_dtype"),
        (lambda: ops.quantize(random_weight(4, 64, 0), 4, 32, "float16"), qalora.DTypeError, "torch.dtype"),
        (lambda: ops.quantize(torch.tensor([[1e6, -1e6] * 16]), 4, 32), qalora.InvalidValueError, "float32"),
        (lambda: ops.qmatmul(torch.randn(3, 63), *_q(), 4, 32), qalora.ShapeError, "K = 63 does not match"),
        (lambda: ops.qmatmul(torch.randn(3, 64).int(), *_q(), 4, 32), qalora.DTypeError, "x: got dtype torch.int32"),
        (lambda: ops.qmatmul(torch.randn(3, 64), *_q(), 4, 16), qalora.ShapeError, "scales: got shape [4, 2]"),
        (
            lambda: ops.qmatmul(torch.randn(3, 64), _q()[0][:, :31], *_q()[1:], 4, 32),
            qalora.ShapeError,
            "not contiguous",
        ),
        (lambda: ops.qmatmul(torch.randn(3, 64), _q()[0].float(), *_q()[1:], 4, 32), qalora.DTypeError, "torch.uint8"),
        (lambda: ops.qmatmul(torch.randn(3, 64), *_q(), 8, 32), qalora.ShapeError, "hold 32 codes of 8 bits"),
        (
            lambda: ops.qmatmul(torch.randn(3, 64), *_q(), 4, 32, backend="gpu"),
            qalora.InvalidValueError,
            "'auto', 'core', 'torch'",
        ),
        (lambda: ops.dequantize(*_q()[:2], _q()[2][:3], 4, 32), qalora.ShapeError, "offsets: got shape [3, 2]"),
        (lambda: ops.dequantize(*_q(), 4, 32, torch.int32), qalora.DTypeError, "dtype"),
        (lambda: ops.group_pool(torch.randn(2, 30), 8), qalora.GroupSizeError, "positive divisor"),
        (lambda: ops.group_pool(torch.randn(2, 30), 0), qalora.GroupSizeError, "got 0"),
        (
            lambda: ops.merge_offsets(torch.randn(4, 2), torch.randn(3, 2), torch.randn(4, 2), 1.0, 32),
            qalora.ShapeError,
            "lora_B",
        ),
        (
            lambda: ops.merge_offsets(torch.randn(4, 2), torch.randn(3, 3), torch.randn(4, 3), 1.0, 32),
            qalora.ShapeError,
            "lora_A",
        ),
        (
            lambda: ops.merge_offsets(torch.randn(4, 2), torch.randn(3, 2), torch.randn(4, 3), float("nan"), 32),
            qalora.InvalidValueError,
            "finite",
        ),
        (
            lambda: ops.merge_offsets(torch.randn(4, 2), torch.randn(3, 2), torch.randn(4, 3), 1.0, 0),
            qalora.GroupSizeError,
            "positive",
        ),
    ],
)
def test_bad_inputs_raise_typed_errors(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)
    assert isinstance(info.value, qalora.QALoRAError)


# ---------------------------------------------------------------- factored group parameters


def _factored(n, k, g, bits, per, seed, signed=False, device="cpu"):
    """Random codes and factored parameters (K-quant style), and the float64 dense weight
    computed independently from them."""
    r = rng(seed)
    groups = k // g
    codes = r.integers(0, 2**bits, size=(n, k))
    ints = (
        r.integers(-32, 32, size=(n, groups)).astype(np.int8)
        if signed
        else r.integers(1, 64, (n, groups)).astype(np.uint8)
    )
    mins = r.integers(0, 64, size=(n, groups)).astype(np.uint8)
    sf = (r.uniform(0.5, 2.0, size=(n, groups // per)) * 1e-3).astype(np.float16)
    of = (-r.uniform(0.5, 2.0, size=(n, groups // per)) * 1e-3).astype(np.float16)
    s64 = np.repeat(sf.astype(np.float64), per, axis=1) * ints
    m64 = np.repeat(of.astype(np.float64), per, axis=1) * mins
    dense64 = ref.dequantize(codes, s64, m64, g)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    packed = t(ref.pack(codes.astype(np.uint8), bits))
    return (packed, t(ints), t(mins), t(sf), t(of)), dense64


def _close_to_float64(got, a, b):
    """got ≈ a @ b in float64, within float32 summation error: 1e-5 of Σ|a·b| per output."""
    a64 = a.double().cpu().numpy()
    want, scale = a64 @ b, np.abs(a64) @ np.abs(b)
    err = np.abs(got.detach().double().cpu().numpy() - want)
    assert (err <= 1e-5 * scale + 1e-9).all(), float((err / (scale + 1e-9)).max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,per", [(13, 256, 16, 16), (7, 512, 32, 8), (33, 96, 16, 3)])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_factored_params_match_float64(bits, n, k, g, per, signed, backend):
    (p, si, mi, sf, of), dense64 = _factored(n, k, g, bits, per, seed=bits + n, signed=signed)
    kw = dict(backend=backend, scale_factors=sf, offset_factors=of)
    got = ops.dequantize(p, si, mi, bits, g, torch.float64, **kw).numpy()
    np.testing.assert_allclose(got, dense64, rtol=1e-6, atol=1e-9)  # exact products, one f32 rounding
    for m in (1, 5, 40):  # fused kernels and the tiled GEMM path
        x = torch.from_numpy(rng(m).standard_normal((m, k)).astype(np.float32)).requires_grad_(True)
        y = ops.qmatmul(x, p, si, mi, bits, g, **kw)
        _close_to_float64(y, x.detach(), dense64.T)
        gy = torch.randn_like(y)
        y.backward(gy)
        _close_to_float64(x.grad, gy, dense64)


def test_factored_params_equal_their_expansion_on_every_activation_route():
    (p, si, mi, sf, of), _ = _factored(24, 512, 32, 4, 8, seed=3)
    s32 = sf.float().repeat_interleave(8, dim=1) * si.float()
    m32 = of.float().repeat_interleave(8, dim=1) * mi.float()
    x = torch.randn(3, 512)
    for activations in ("exact", "int8", "bf16"):
        got = ops.qmatmul(x, p, si, mi, 4, 32, activations=activations, scale_factors=sf, offset_factors=of)
        assert torch.equal(got, ops.qmatmul(x, p, s32, m32, 4, 32, activations=activations)), activations


def test_factored_params_refuse_bad_inputs():
    (p, si, mi, sf, of), _ = _factored(8, 256, 32, 4, 2, seed=4)  # 8 groups, 4 factors a row
    x = torch.randn(2, 256)
    with pytest.raises(qalora.ShapeError, match="both"):
        ops.qmatmul(x, p, si, mi, 4, 32, scale_factors=sf)
    with pytest.raises(qalora.DTypeError, match=r"scale_factors.*float16"):
        ops.qmatmul(x, p, si, mi, 4, 32, scale_factors=sf.float(), offset_factors=of)
    with pytest.raises(qalora.DTypeError, match=r"scales \(factored"):
        ops.qmatmul(x, p, si.float(), mi, 4, 32, scale_factors=sf, offset_factors=of)
    with pytest.raises(qalora.ShapeError, match="divide"):
        ops.qmatmul(x, p, si, mi, 4, 32, scale_factors=sf[:, :3], offset_factors=of[:, :3])
    with pytest.raises(qalora.ShapeError, match="offset_factors"):
        ops.qmatmul(x, p, si, mi, 4, 32, scale_factors=sf, offset_factors=of[:4])
    with pytest.raises(qalora.DTypeError, match="scales"):  # integers without factors
        ops.dequantize(p, si, mi, 4, 32)


@cuda
def test_factored_params_on_cuda_match_cpu():
    q, dense64 = _factored(40, 512, 32, 4, 8, seed=5, device="cuda")
    p, si, mi, sf, of = q
    x = torch.randn(6, 512, device="cuda")
    y = ops.qmatmul(x, p, si, mi, 4, 32, scale_factors=sf, offset_factors=of)
    _close_to_float64(y, x, dense64.T)


def test_error_hierarchy_fits_builtin_types():
    assert issubclass(qalora.ShapeError, ValueError) and issubclass(qalora.DTypeError, TypeError)
    assert issubclass(qalora.NoTargetModulesError, qalora.ConfigError)
    assert issubclass(qalora.InternalError, RuntimeError)


@cuda
def test_core_backend_refuses_cuda_tensors():
    p, s, m = (t.cuda() for t in _q())
    with pytest.raises(qalora.DeviceError, match="CPU tensors only"):
        ops.dequantize(p, s, m, 4, 32, backend="core")


@cuda
def test_device_mix_is_refused():
    p, s, m = _q()
    with pytest.raises(qalora.DeviceError, match="cuda"):
        ops.qmatmul(torch.randn(2, 64, device="cuda"), p, s, m, 4, 32)


# ---------------------------------------------------------------- threads


def test_two_threads_run_kernels_concurrently():
    q, dense64 = _quantized(512, 1024, 64, 4, seed=21)
    xs = [torch.randn(3, 1024) for _ in range(2)]
    wants = [x.double().numpy() @ dense64.T for x in xs]
    results, errors = [[], []], []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(20):
                results[i].append(ops.qmatmul(xs[i], *q, 4, 64))
                ops.group_pool(xs[i], 64)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert len(results[i]) == 20
        for y in results[i]:
            np.testing.assert_allclose(y.double().numpy(), wants[i], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("bits", BITS)
def test_cuda_ops_match_cpu(bits):
    n, k, g = 40, 256, 32
    w = random_weight(n, k, seed=bits)
    cpu_q = ops.quantize(w, bits, g)
    gpu_q = ops.quantize(w.cuda(), bits, g)
    for a, b in zip(cpu_q, gpu_q):
        assert b.is_cuda
        assert torch.equal(a, b.cpu())
    codes = ops.unpack(gpu_q[0], bits, k)
    assert torch.equal(ops.pack(codes, bits).cpu(), cpu_q[0])
    dense64 = ops.dequantize(*cpu_q, bits, g, torch.float64).numpy()
    for dtype, tol in [(torch.float32, 1e-3), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]:
        x = torch.randn(6, k, device="cuda").to(dtype).requires_grad_()
        y = ops.qmatmul(x, *gpu_q, bits, g)
        want = x.detach().double().cpu().numpy() @ dense64.T
        np.testing.assert_allclose(y.detach().double().cpu().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())
        y.sum().backward()
        assert x.grad.shape == x.shape and x.grad.is_cuda
    xg = torch.randn(2, 7, k, device="cuda")
    np.testing.assert_allclose(
        ops.group_pool(xg, g).cpu().numpy(), ref.group_pool(xg.cpu().numpy(), g), rtol=1e-5, atol=1e-6
    )
    a, b = torch.randn(4, k // g, device="cuda"), torch.randn(n, 4, device="cuda")
    merged = ops.merge_offsets(gpu_q[2], a, b, 2.0, g)
    want = ref.merge(gpu_q[2].double().cpu().numpy(), a.cpu().numpy(), b.cpu().numpy(), 2.0, g)
    np.testing.assert_allclose(merged.double().cpu().numpy(), want, rtol=1e-3, atol=1e-3)
