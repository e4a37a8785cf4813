"""The CPU speed routes against float64 references: bf16 activations, the tiled int8 layout,
bf16 GEMM tiles under autocast (forward and backward), the merge into an existing tensor,
and the bandwidth probe."""

from __future__ import annotations

import os

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import _core, ops
from qalora.layers import QuantLinear
from tiny_models import tiny_llama


def rng(seed):
    return np.random.default_rng(seed)


def quantized(n, k, g, seed, bits=4, scale_dtype=torch.float16):
    w = torch.from_numpy(rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05)
    p, s, m = ops.quantize(w, bits, g, scale_dtype)
    dense64 = ops.dequantize(p, s, m, bits, g, torch.float64).numpy()
    return (p, s, m), dense64


def bf16_round(x: torch.Tensor) -> np.ndarray:
    return x.bfloat16().double().numpy()


# ---------------------------------------------------------------- bf16 activations


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_bf16_route_matches_its_definition(g, m):
    """Scale term on bf16(x), offsets' term on the exact x, against float64."""
    n, k = 40, 256
    (p, s, o), _ = quantized(n, k, g, seed=g + m)
    codes = ops.unpack(p, 4, k).double().numpy()
    sd, od = s.double().numpy(), o.double().numpy()
    x = torch.from_numpy(rng(m).standard_normal((m, k)).astype(np.float32))
    x[0, 5] = 300.0  # a large activation: its bf16 rounding dominates
    y = ops.qmatmul(x, p, s, o, 4, g, activations="bf16")
    assert y.dtype == torch.float32 and y.shape == (m, n)
    scale_term = bf16_round(x) @ (codes * np.repeat(sd, g, axis=1)).T
    offset_term = ref.group_pool(x.numpy(), g) * g @ od.T
    want = scale_term + offset_term
    mag = (
        np.abs(bf16_round(x)) @ np.abs(codes * np.repeat(sd, g, axis=1)).T
        + np.abs(x.double().numpy()) @ np.abs(np.repeat(od, g, axis=1)).T
    )
    assert np.all(np.abs(y.double().numpy() - want) <= 1e-5 * (mag + 1))


def test_bf16_route_error_bound_and_fallbacks():
    n, k, g = 24, 192, 32
    (p, s, o), dense64 = quantized(n, k, g, seed=3)
    x = torch.randn(5, k)
    exact = x.double().numpy() @ dense64.T
    y = ops.qmatmul(x, p, s, o, 4, g, activations="bf16").double().numpy()
    codes = ops.unpack(p, 4, k).double().numpy()
    bound = 2.0**-8 * (np.abs(x.double().numpy()) @ np.abs(codes * np.repeat(s.double().numpy(), g, axis=1)).T)
    assert np.all(np.abs(y - exact) <= bound + 1e-5)
    assert not np.allclose(y, exact, rtol=0, atol=1e-7)  # the rounding is real
    # Larger batches, other layouts and float64 are exact.
    xl = torch.randn(17, k)
    torch.testing.assert_close(
        ops.qmatmul(xl, p, s, o, 4, g, activations="bf16"), ops.qmatmul(xl, p, s, o, 4, g), rtol=0, atol=0
    )
    (p3, s3, o3), _ = quantized(n, k, g, seed=4, bits=3)
    torch.testing.assert_close(
        ops.qmatmul(x, p3, s3, o3, 3, g, activations="bf16"), ops.qmatmul(x, p3, s3, o3, 3, g), rtol=0, atol=0
    )
    with pytest.raises(qalora.InvalidValueError, match="'exact', 'int8', 'bf16'"):
        ops.qmatmul(x, p, s, o, 4, g, activations="fp8")


# ---------------------------------------------------------------- the tiled int8 layout


def test_tiled_layout_round_trips_and_matches_the_int8_route():
    n, k, g = 48, 320, 32
    (p, s, o), _ = quantized(n, k, g, seed=7)
    t = _core.repack_tiles(p, s, o, 4, g)
    assert t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == p.numel() + 2 * (s.numel() + o.numel())
    p2, s2, o2 = _core.unrepack_tiles(t, n, k, g)
    assert torch.equal(p2, p) and torch.equal(s2, s) and torch.equal(o2, o)
    for m in (1, 5, 16):
        x = torch.from_numpy(rng(m).standard_normal((m, k)).astype(np.float32))
        want = (
            ref.int8_activations(x.numpy(), 32)
            @ (ops.unpack(p, 4, k).double().numpy() * np.repeat(s.double().numpy(), g, axis=1)).T
            + ref.group_pool(x.numpy(), g) * g @ o.double().numpy().T
        )
        y = _core.qmatmul_tiled(x, t, n, g)
        np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y, ops.qmatmul(x, p, s, o, 4, g, activations="int8"), rtol=1e-5, atol=1e-5)
    y3 = _core.qmatmul_tiled(torch.randn(2, 3, k), t, n, g)
    assert y3.shape == (2, 3, n)


def test_tiled_layout_refuses_what_it_cannot_hold():
    (p, s, o), _ = quantized(12, 64, 32, seed=1)  # 12 rows: not a multiple of 8
    with pytest.raises(qalora.InvalidValueError, match="multiple of 8"):
        _core.repack_tiles(p, s, o, 4, 32)
    (p, s, o), _ = quantized(16, 64, 32, seed=1, scale_dtype=torch.float32)
    with pytest.raises(qalora.DTypeError, match="float16"):
        _core.repack_tiles(p, s, o, 4, 32)
    (p, s, o), _ = quantized(16, 64, 32, seed=1)
    t = _core.repack_tiles(p, s, o, 4, 32)
    with pytest.raises(qalora.ShapeError, match="bytes"):
        _core.qmatmul_tiled(torch.randn(1, 64), t[:-1], 16, 32)
    with pytest.raises(qalora.ShapeError, match="at most 16"):
        _core.qmatmul_tiled(torch.randn(17, 64), t, 16, 32)
    with pytest.raises(qalora.ShapeError, match="last dimension"):
        _core.qmatmul_tiled(torch.randn(1, 32), t, 16, 32)
    with pytest.raises(qalora.GroupSizeError):
        _core.unrepack_tiles(t, 16, 64, 48)


def test_tiled_layer_replaces_its_canonical_tensors():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    layer = QuantLinear.from_weight(lin.weight, lin.bias, 4, 32)
    canonical = {k: v.clone() for k, v in layer.state_dict().items()}
    x, xl = torch.randn(3, 256), torch.randn(40, 256)
    exact_small, exact_large = layer(x), layer(xl)
    layer.activations = "int8"
    int8_small = layer(x)
    bytes_before = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert layer.tile_() and layer.is_tiled
    assert [name for name, _ in layer.named_buffers()] == ["tiled"]  # no canonical copy kept
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == bytes_before
    torch.testing.assert_close(layer(x), int8_small, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(xl), exact_large)  # large batches: the canonical tiles, exact
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # gradients: the exact route
    torch.testing.assert_close(xg.grad, layer.dequantize().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    # Files hold the canonical layout; a tiled layer loads canonical tensors.
    state = layer.state_dict()
    assert set(state) == set(canonical) and all(torch.equal(state[k], canonical[k]) for k in canonical)
    fresh = QuantLinear(256, 64, 4, 32)
    fresh.tile_()
    fresh.load_state_dict(canonical)
    assert fresh.is_tiled and torch.equal(fresh(x), layer(x))
    assert torch.equal(layer.packed, canonical["packed"])  # derived on request
    layer.untile_()
    assert not layer.is_tiled and torch.equal(layer.packed, canonical["packed"])
    layer.activations = "exact"
    assert torch.equal(layer(x), exact_small)
    odd = QuantLinear.from_weight(torch.randn(12, 64), None, 4, 32)
    assert not odd.can_tile() and not odd.tile_()


def test_set_activations_tiles_and_untiles_a_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 12))
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4))
    qalora.merge(model)
    x = torch.randn(2, 64)
    with torch.no_grad():
        exact = model(x)
        assert qalora.set_activations(model, "int8") == 2
        tiled = [m.is_tiled for m in model.modules() if isinstance(m, QuantLinear)]
        assert tiled == [True, False]  # 12 outputs cannot be tiled; that layer stays canonical
        approx = model(x)
        assert qalora.set_activations(model, "bf16") == 2
        assert not any(m.is_tiled for m in model.modules() if isinstance(m, QuantLinear))
        rounded = model(x)
        qalora.set_activations(model, "exact")
        assert torch.equal(model(x), exact)
    assert 0 < (approx - exact).norm() / exact.norm() < 3e-2
    assert 0 < (rounded - exact).norm() / exact.norm() < 1e-2


# ---------------------------------------------------------------- bf16 training tiles


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bf16_inputs_run_bf16_tiles_forward_and_backward(bits):
    n, k, g, m = 48, 128, 32, 40
    (p, s, o), dense64 = quantized(n, k, g, seed=bits, bits=bits)
    x = torch.from_numpy(rng(bits).standard_normal((m, k)).astype(np.float32)).bfloat16().requires_grad_()
    y = ops.qmatmul(x, p, s, o, bits, g)
    assert y.dtype == torch.bfloat16
    # bf16 weights (one rounding of s*q + m), f32 accumulation, one rounding of the output.
    w_bf16 = torch.from_numpy(dense64).float().bfloat16().double().numpy()
    want = x.detach().double().numpy() @ w_bf16.T
    np.testing.assert_allclose(y.detach().double().numpy(), want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
    grad = torch.from_numpy(rng(9).standard_normal((m, n)).astype(np.float32)).bfloat16()
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    gwant = grad.double().numpy() @ w_bf16
    np.testing.assert_allclose(x.grad.double().numpy(), gwant, rtol=2**-7, atol=2**-7 * np.abs(gwant).max())


def test_bf16_tiles_across_several_tiles():
    # 8192 x 1024 weights exceed one bf16 tile: partial products are added in float32.
    n, k, g = 8192, 1024, 128
    (p, s, o), dense64 = quantized(n, k, g, seed=2)
    w_bf16 = torch.from_numpy(dense64).float().bfloat16().double().numpy()
    x = torch.from_numpy(rng(3).standard_normal((20, k)).astype(np.float32)).bfloat16()
    y = ops.qmatmul(x, p, s, o, 4, g)
    want = x.double().numpy() @ w_bf16.T
    np.testing.assert_allclose(y.double().numpy(), want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
    grad = torch.from_numpy(rng(4).standard_normal((20, n)).astype(np.float32)).bfloat16()
    gx = _core.qmatmul_grad_input(grad, p, s, o, 4, g, "core")
    gwant = grad.double().numpy() @ w_bf16
    np.testing.assert_allclose(gx.double().numpy(), gwant, rtol=2**-7, atol=2**-7 * np.abs(gwant).max())


def test_autocast_training_keeps_fp32_adapters_and_tracks_fp32_training():
    def run(bf16: bool) -> tuple[list[float], list[torch.nn.Parameter]]:
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 64))
        qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-2)
        gen = torch.Generator().manual_seed(3)
        x, target = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
        losses = []
        for _ in range(30):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (model(x).float() - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, params

    fp32, _ = run(False)
    bf16, params = run(True)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert bf16[-1] < 0.97 * bf16[0] and fp32[-1] < 0.97 * fp32[0]
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)


# ---------------------------------------------------------------- merge into an existing tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["core", "torch"])
def test_merge_offsets_into_out_and_in_place(dtype, backend):
    n, l, r, g, c = 300, 45, 8, 32, 1.5
    gen = rng(5)
    m = torch.from_numpy(gen.standard_normal((n, l)).astype(np.float32)).to(dtype)
    a = torch.from_numpy(gen.standard_normal((r, l)).astype(np.float32))
    b = torch.from_numpy(gen.standard_normal((n, r)).astype(np.float32))
    fresh = ops.merge_offsets(m, a, b, c, g, backend=backend)
    out = torch.empty_like(m)
    got = ops.merge_offsets(m, a, b, c, g, backend=backend, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, fresh)
    inplace = m.clone()
    got = ops.merge_offsets(inplace, a, b, c, g, backend=backend, out=inplace)
    assert got.data_ptr() == inplace.data_ptr() and torch.equal(inplace, fresh)
    want = ref.merge(m.double().numpy(), a.numpy(), b.numpy(), c, g)
    tol = {torch.float16: 1e-3, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(inplace.double().numpy(), want, rtol=tol, atol=tol)


def test_merge_offsets_out_is_checked():
    m, a, b = torch.randn(16, 4).half(), torch.randn(2, 4), torch.randn(16, 2)
    with pytest.raises(qalora.DTypeError, match="offsets' dtype"):
        ops.merge_offsets(m, a, b, 1.0, 32, out=torch.empty(16, 4))
    with pytest.raises(qalora.ShapeError, match="out"):
        ops.merge_offsets(m, a, b, 1.0, 32, out=torch.empty(16, 5).half())
    with pytest.raises(qalora.ShapeError, match="contiguous"):
        ops.merge_offsets(m, a, b, 1.0, 32, out=torch.empty(4, 16).half().t())
    big = torch.randn(40, 4).half()
    with pytest.raises(qalora.InvalidValueError, match="overlaps offsets"):
        ops.merge_offsets(big[:16], a, b, 1.0, 32, out=big[8:24])
    with pytest.raises(qalora.DTypeError, match=r"out: expected a torch\.Tensor"):
        ops.merge_offsets(m, a, b, 1.0, 32, out=np.zeros((16, 4), np.float16))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the bandwidth probe


def test_stream_read_checksum():
    buf = torch.from_numpy(rng(1).integers(0, 256, size=(9 << 20) + 13, dtype=np.uint8))
    words = buf.numpy()[: (buf.numel() // 8) * 8].view(np.uint64)
    assert _core.stream_read(buf) == int(np.bitwise_xor.reduce(words))
    with pytest.raises(qalora.DTypeError, match="buf"):
        _core.stream_read(torch.zeros(8))


# ---------------------------------------------------------------- generation set-up


def test_prepare_for_generation_quantizes_the_head_and_generates():
    pytest.importorskip("transformers")
    model = tiny_llama(0, tie=True).eval()
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4))
    qalora.merge(model)
    head_weight = model.get_output_embeddings().weight.detach().clone()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    assert qalora.prepare_for_generation(model, activations="bf16", head_bits=4) is model
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and not model.config.tie_word_embeddings
    # The embedding keeps its dense weight; the head is its 4-bit RTN quantization.
    assert torch.equal(model.get_input_embeddings().weight, head_weight)
    w64 = ops.dequantize(head.packed, head.scales, head.offsets, 4, 32, torch.float64)
    assert (w64 - head_weight.double()).abs().max() <= (head_weight.abs().max() * 2 / 15).item()
    with torch.no_grad():
        logits = head(hidden)
    want = hidden.double() @ w64.T
    np.testing.assert_allclose(logits.double().numpy(), want.numpy(), rtol=1e-2, atol=1e-2 * want.abs().max().item())
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14) and torch.equal(out[:, :8], ids)
    with pytest.raises(qalora.ConfigError):
        qalora.quantize_head(torch.nn.Sequential(torch.nn.Linear(64, 8)))


def test_prepare_for_generation_refuses_a_bad_route_before_changing_the_head():
    pytest.importorskip("transformers")
    model = tiny_llama(0, tie=True).eval()
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4))
    qalora.merge(model)
    head = model.get_output_embeddings()
    with pytest.raises(qalora.errors.InvalidValueError, match="allowed: 'exact', 'int8', 'bf16'"):
        qalora.prepare_for_generation(model, activations="fp8", head_bits=4)
    assert model.get_output_embeddings() is head and model.config.tie_word_embeddings


# ---------------------------------------------------------------- the kernels' thread pool


@pytest.fixture
def pool_restored():
    before = _core.thread_pool()
    yield
    _core.set_thread_pool(before)


def test_openmp_is_the_default_pool_where_torch_uses_it():
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    assert _core.thread_pool() == "openmp"


def test_both_thread_pools_give_the_same_bits(pool_restored):
    """Every parallel loop (sizes above each kernel's threshold) on torch's OpenMP team and
    on rayon: identical results."""
    torch.manual_seed(0)
    w = torch.randn(1536, 1024) * 0.05
    x1, x8, x40 = torch.randn(1, 1024), torch.randn(8, 1024), torch.randn(40, 1024)
    a, b = torch.randn(8, 32), torch.randn(1536, 8)
    big = torch.randn(1024, 4096 + 32)

    def run_all():
        p, s, m = ops.quantize(w, 4, 32)
        layer = QuantLinear.from_weight(w, None, 4, 32)
        layer.tile_()
        with torch.no_grad():
            tiled = [layer(x) for x in (x1, x8)]
        out = [p, s, m, ops.unpack(p, 4, 1024), ops.pack(ops.unpack(p, 4, 1024), 4)]
        out += [ops.dequantize(p, s, m, 4, 32), ops.merge_offsets(m, a, b, 2.0, 32)]
        for x in (x1, x8, x40):
            out += [ops.qmatmul(x, p, s, m, 4, 32), ops.qmatmul(x, p, s, m, 4, 32, activations="int8")]
            out += [ops.qmatmul(x.bfloat16(), p, s, m, 4, 32)]
        out += [
            _core.qmatmul_grad_input(
                torch.randn(40, 1536, generator=torch.Generator().manual_seed(2)), p, s, m, 4, 32, "auto"
            )
        ]
        out += [ops.group_pool(big, 32), *tiled]
        return out

    results = {}
    for pool in ("rayon", "openmp"):
        if pool == "openmp" and "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
            continue
        _core.set_thread_pool(pool)
        assert _core.thread_pool() == pool
        results[pool] = run_all()
    if len(results) == 2:
        for got, want in zip(results["openmp"], results["rayon"]):
            assert torch.equal(got, want)


def test_set_thread_pool_refuses_other_names():
    with pytest.raises(qalora.InvalidValueError, match="allowed: 'openmp', 'rayon'"):
        _core.set_thread_pool("tbb")


def test_an_unknown_thread_pool_setting_is_said():
    import subprocess
    import sys

    code = "import warnings; warnings.simplefilter('always'); import qalora.ops"
    env = dict(os.environ, QALORA_THREAD_POOL="tbb")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "QALORA_THREAD_POOL: got 'tbb', allowed: 'openmp', 'rayon'" in r.stderr
