"""GPTQ: one layer against an independent float64 reference, its error against RTN's, the
awkward Hessians, and whole models quantized layer by layer through ``qalora.wrap``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import QALoRAConfig, gptq, ops
from tiny_models import tiny_llama
from torch import nn

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BITS = (2, 3, 4, 8)


def correlated_inputs(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a shared component plus random
    mixing) and of unequal size, as real activations are: the case where GPTQ's error
    compensation has something to work with."""
    g = np.random.default_rng(seed)
    mix = np.eye(k) + 0.5 * g.standard_normal((k, k)) / np.sqrt(k)
    x = g.standard_normal((rows, k)) @ mix + 0.5 * g.standard_normal((rows, 1))
    return x * g.uniform(0.2, 2.0, size=k)


def layer_case(n: int, k: int, seed: int, rows: int = 256):
    g = np.random.default_rng(seed)
    w = 0.1 * g.standard_normal((n, k))
    x = correlated_inputs(rows, k, seed + 1)
    return w, x, ref.hessian(x)


def run_gptq(w, h, bits, g, *, dtype=torch.float64, **kw):
    """qalora's GPTQ on numpy inputs (float64 Hessian: the torch path in float64)."""
    packed, scales, offsets, damp = gptq.quantize_weight(
        torch.tensor(w, dtype=dtype), torch.tensor(h, dtype=dtype), bits, g, torch.float16, **kw
    )
    codes = ops.unpack(packed, bits, w.shape[1]).numpy().astype(np.int64)
    return codes, scales.double().numpy(), offsets.double().numpy(), damp


def output_error(w, codes, scales, offsets, g, x):
    """Squared output error of the quantized layer on the calibration inputs (float64)."""
    approx = ref.dequantize(codes, scales, offsets, g)
    return float(np.sum((x @ (w - approx).T) ** 2))


SHAPES = [(7, 48, 16, 32), (16, 64, 32, 128), (5, 96, 8, 24), (3, 40, 40, 128)]  # (N, K, g, block)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_codes_match_float64_reference(bits, act_order):
    """In float64 the Cholesky/lazy-block algorithm and the reference (explicit inverse
    updates, one column at a time) are the same computation up to rounding near 1e-12;
    a code may differ only where the reference's value sits that close to a rounding
    boundary (x.5), which random data does not produce. So here every code and parameter
    must equal the free-running reference's."""
    for n, k, g, block in SHAPES:
        w, _, h = layer_case(n, k, seed=bits * 31 + k)
        codes, scales, offsets, damp = run_gptq(w, h, bits, g, act_order=act_order, block_size=block)
        assert damp == 0.01
        r = ref.gptq(w, h, bits, g, act_order=act_order)
        np.testing.assert_array_equal(codes, r.codes)
        np.testing.assert_array_equal(scales, r.scales)
        np.testing.assert_array_equal(offsets, r.offsets)


@pytest.mark.parametrize("bits", BITS)
def test_float32_decisions_agree_except_near_ties(bits):
    """The default float32 run on a larger, strongly correlated layer (K = 256, condition
    number of the dampened Hessian ~4e3). Its rounding (Cholesky of the inverse, the
    accumulated lazy updates) moves a scaled value (w - m) / s by about 1e-5 of a step at
    2-4 bits and 3e-4 at 8 bits (measured against the float64 reference on the same
    decisions). So, decision by decision (the reference replayed with the float32 codes and
    parameters), a code may differ from the reference's rounding only within 1e-3 steps of
    a boundary, and a parameter only where its unrounded value is within 1e-3 steps of a
    float16 rounding boundary. Without the replay one such flip would move everything
    after it and the comparison would say nothing."""
    n, k, g = 24, 256, 32
    for seed in range(3):
        w, _, h = layer_case(n, k, seed=bits + 10 * seed)
        codes, scales, offsets, _ = run_gptq(w, h, bits, g, dtype=torch.float32)
        r = ref.gptq(w, h, bits, g, forced=(codes, scales, offsets))
        differ = codes != r.rounded
        assert np.all(r.tie[differ] < 1e-3), r.tie[differ].max()
        assert differ.mean() < 0.002
        for raw, stored in ((r.lo, offsets), (r.step, scales)):
            nearest = raw.astype(np.float32).astype(np.float16).astype(np.float64)
            off = stored != nearest
            assert off.mean() < 0.05
            # one float16 step apart, and the unrounded value within 1e-3 steps of the midpoint
            assert np.all(
                np.abs(stored[off] - nearest[off])
                <= np.spacing(np.abs(nearest[off]).astype(np.float16)).astype(np.float64)
            )
            assert np.all(np.abs(raw[off] - (stored[off] + nearest[off]) / 2) < 1e-3 * r.step[off])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_core_and_torch_column_loops_agree_bit_for_bit(bits, act_order):
    """The float32 column loop in the Rust core and the same loop as libtorch operations do
    the same arithmetic in the same order: identical codes and parameters."""
    for n, k, g, block in SHAPES:
        w, _, h = layer_case(n, k, seed=bits + k)
        w, h = torch.tensor(w, dtype=torch.float32), torch.tensor(h, dtype=torch.float32)
        kw = dict(act_order=act_order, block_size=block)
        core = gptq.quantize_weight(w, h, bits, g, backend="core", **kw)
        via_torch = gptq.quantize_weight(w, h, bits, g, backend="torch", **kw)
        for a, b in zip(core[:3], via_torch[:3]):
            assert torch.equal(a, b)
        assert core[0].dtype == torch.uint8 and core[1].dtype == torch.float16


@pytest.mark.parametrize("bits", BITS)
def test_gptq_output_error_below_rtn(bits):
    """On the calibration activations GPTQ's output error is below RTN's, for every bit
    width, with and without act-order, on several random layers."""
    for seed in range(3):
        n, k, g = 32, 128, 32
        w, x, h = layer_case(n, k, seed=100 + seed + bits)
        packed, scales, offsets = ops.quantize(torch.tensor(w, dtype=torch.float32), bits, g)
        rtn = output_error(
            w, ops.unpack(packed, bits, k).numpy(), scales.double().numpy(), offsets.double().numpy(), g, x
        )
        for act_order in (False, True):
            codes, s, o, _ = run_gptq(w, h, bits, g, dtype=torch.float32, act_order=act_order)
            err = output_error(w, codes, s, o, g, x)
            assert err < 0.9 * rtn, (bits, seed, act_order, err / rtn)


def test_dead_columns_keep_their_weight_and_round_to_nearest():
    """Inputs that are always zero give zero Hessian rows: no NaN, the dead columns take
    no update and give none, so their codes are the nearest ones under their group's
    parameters, and the live columns still beat RTN."""
    n, k, g, bits = 12, 64, 16, 3
    w, x, _ = layer_case(n, k, seed=7)
    dead = [0, 5, 17, 18, 63]
    x[:, dead] = 0.0
    h = ref.hessian(x)
    codes, scales, offsets, _ = run_gptq(w, h, bits, g)
    assert np.isfinite(scales).all() and np.isfinite(offsets).all()
    np.testing.assert_array_equal(codes, ref.gptq(w, h, bits, g).codes)
    nearest, _ = ref.codes_for(w, scales, offsets, bits, g)
    np.testing.assert_array_equal(codes[:, dead], nearest[:, dead])
    packed, s_rtn, o_rtn = ops.quantize(torch.tensor(w, dtype=torch.float32), bits, g)
    rtn = output_error(w, ops.unpack(packed, bits, k).numpy(), s_rtn.double().numpy(), o_rtn.double().numpy(), g, x)
    assert output_error(w, codes, scales, offsets, g, x) < rtn


def test_all_dead_hessian_is_round_to_nearest():
    """A zero Hessian (a layer the calibration never drives) moves nothing: exactly RTN."""
    n, k, g = 9, 48, 16
    w = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32)
    for bits in BITS:
        packed, scales, offsets, _ = gptq.quantize_weight(torch.tensor(w), torch.zeros(k, k), bits, g)
        p_rtn, s_rtn, o_rtn = ops.quantize(torch.tensor(w), bits, g)
        assert torch.equal(packed, p_rtn) and torch.equal(scales, s_rtn) and torch.equal(offsets, o_rtn)


@pytest.mark.parametrize("rows", [1, 3])
def test_tiny_calibration_sets(rows):
    """One or three calibration rows give a Hessian of rank 1 or 3: dampening makes it
    invertible, the result matches the reference and still beats RTN on those rows."""
    n, k, g, bits = 8, 64, 16, 4
    w, x, h = layer_case(n, k, seed=rows, rows=rows)
    codes, scales, offsets, damp = run_gptq(w, h, bits, g)
    assert damp == 0.01
    np.testing.assert_array_equal(codes, ref.gptq(w, h, bits, g).codes)
    packed, s_rtn, o_rtn = ops.quantize(torch.tensor(w, dtype=torch.float32), bits, g)
    rtn = output_error(w, ops.unpack(packed, bits, k).numpy(), s_rtn.double().numpy(), o_rtn.double().numpy(), g, x)
    assert output_error(w, codes, scales, offsets, g, x) < rtn


def test_dampening_is_raised_when_the_factorization_fails():
    """A Hessian that the asked-for dampening leaves indefinite (a diagonal entry of
    -0.005; dampening 0.001 x mean diagonal is not enough, ten times that is) gets ten times
    the dampening; one that stays indefinite after three raises is refused."""
    k = 64
    w = torch.randn(4, k, generator=torch.Generator().manual_seed(0))
    h = torch.eye(k)
    h[0, 0] = -0.005
    packed, _, _, damp = gptq.quantize_weight(w, h, 4, 16, damp_percent=0.001)
    assert damp == pytest.approx(0.01) and packed.shape == (4, 32)
    h[0, 0] = -1.0
    with pytest.raises(qalora.InvalidValueError, match="not positive definite"):
        gptq.quantize_weight(w, h, 4, 16, damp_percent=0.001)


def test_hessian_update_is_the_running_mean():
    g = np.random.default_rng(0)
    x1, x2 = g.standard_normal((5, 3, 16)), g.standard_normal((7, 16))
    h = torch.zeros(16, 16, dtype=torch.float64)
    seen = gptq.hessian_update(h, torch.tensor(x1), 0)
    seen = gptq.hessian_update(h, torch.tensor(x2), seen)
    assert seen == 22
    np.testing.assert_allclose(h.numpy(), ref.hessian(np.concatenate([x1.reshape(-1, 16), x2])), rtol=1e-12)


def test_bad_layer_inputs():
    w = torch.randn(4, 32)
    h = torch.eye(32)
    with pytest.raises(qalora.InvalidValueError, match="not finite"):
        gptq.quantize_weight(w.clone().index_fill_(1, torch.tensor([3]), float("nan")), h, 4, 16)
    with pytest.raises(qalora.InvalidValueError, match="hessian"):
        gptq.quantize_weight(w, h * float("inf"), 4, 16)
    with pytest.raises(qalora.ShapeError, match="hessian"):
        gptq.quantize_weight(w, torch.eye(16), 4, 16)
    with pytest.raises(qalora.GroupSizeError):
        gptq.quantize_weight(w, h, 4, 12)
    with pytest.raises(qalora.UnsupportedBitsError):
        gptq.quantize_weight(w, h, 7, 16)
    with pytest.raises(qalora.DTypeError, match="weight"):
        gptq.quantize_weight(w.int(), h, 4, 16)
    with pytest.raises(qalora.InvalidValueError, match="damp_percent"):
        gptq.quantize_weight(w, h, 4, 16, damp_percent=0.0)
    with pytest.raises(qalora.InvalidValueError, match="block_size"):
        gptq.quantize_weight(w, h, 4, 16, block_size=0)
    with pytest.raises(qalora.DTypeError, match="backend='core'"):
        gptq.quantize_weight(w.double(), h.double(), 4, 16, backend="core")
    with pytest.raises(qalora.InvalidValueError, match="backend"):
        gptq.quantize_weight(w, h, 4, 16, backend="fast")
    with pytest.raises(qalora.DTypeError, match="hessian"):
        gptq.hessian_update(torch.zeros(4, 4, dtype=torch.float16), torch.randn(2, 4), 0)
    with pytest.raises(qalora.ShapeError, match="x"):
        gptq.hessian_update(torch.zeros(4, 4), torch.randn(2, 5), 0)
    with pytest.raises(qalora.InvalidValueError, match="seen"):
        gptq.hessian_update(torch.zeros(4, 4), torch.randn(2, 4), -1)


# --------------------------------------------------------------------------- models


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def token_ids(rows=12, seq=24, seed=1):
    return torch.randint(0, 96, (rows, seq), generator=torch.Generator().manual_seed(seed))


def logits_error(model, reference, ids):
    model.eval()
    reference.eval()
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_wrap_with_gptq_beats_rtn_on_held_out_tokens(build):
    model = build()
    calib, heldout = token_ids(16, 32, seed=1), token_ids(8, 32, seed=2)
    errors = {}
    for quantizer in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        kw = {"calibration": calib} if quantizer == "gptq" else {}
        qalora.wrap(m, QALoRAConfig(bits=3, group_size=32, rank=4, quantizer=quantizer), **kw)
        errors[quantizer] = logits_error(m, model, heldout)
        state = qalora.state_of(m)
        assert state.quantization["quantizer"] == quantizer
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    layers = state.quantization["layers"]
    assert state.quantization["mode"] == "block by block"
    assert len(layers) == qalora.summary(m).quantized_layers
    assert all(r["error"] < r["rtn_error"] for r in layers.values())


def test_layers_see_inputs_of_quantized_layers_before_them():
    """The second layer's Hessian comes from the first layer's quantized output, not its
    dense one: rebuilt here by hand, the codes agree exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32))
    x = torch.from_numpy(correlated_inputs(200, 64, seed=5)).float()
    wrapped = qalora.wrap(
        copy.deepcopy(model),
        QALoRAConfig(bits=3, group_size=32, rank=2, quantizer="gptq"),
        calibration=x,
        filter_fn=lambda m, n: True,
    )
    first = wrapped[0].base_layer
    h1 = torch.zeros(64, 64)
    gptq.hessian_update(h1, x, 0)
    packed, _, _, _ = gptq.quantize_weight(model[0].weight, h1, 3, 32)
    assert torch.equal(first.packed, packed)
    h2 = torch.zeros(96, 96)
    with torch.no_grad():
        gptq.hessian_update(h2, torch.tanh(first(x)), 0)
    packed2, _, _, _ = gptq.quantize_weight(model[2].weight, h2, 3, 32)
    assert torch.equal(wrapped[2].base_layer.packed, packed2)
    h_dense = torch.zeros(96, 96)
    with torch.no_grad():
        gptq.hessian_update(h_dense, torch.tanh(model[0](x)), 0)
    assert not torch.equal(gptq.quantize_weight(model[2].weight, h_dense, 3, 32)[0], packed2)
    assert qalora.state_of(wrapped).quantization["mode"] == "whole model per stage"


def test_block_runner_equals_whole_model_runner(monkeypatch):
    """Running a decoder one block at a time gives exactly what running the whole model
    for every stage gives (the slow, obviously sequential route)."""
    model = tiny_llama()
    calib = token_ids(6, 16)
    cfg = QALoRAConfig(bits=4, group_size=32, rank=2, quantizer="gptq")
    by_block = qalora.wrap(copy.deepcopy(model), cfg, calibration=calib, calibration_batch_size=4)
    monkeypatch.setattr(gptq, "_block_list", lambda model, names: None)
    whole = qalora.wrap(copy.deepcopy(model), cfg, calibration=calib, calibration_batch_size=4)
    assert qalora.state_of(whole).quantization["mode"] == "whole model per stage"
    a, b = by_block.state_dict(), whole.state_dict()
    for key in a:
        if key.endswith(("packed", "scales", "offsets")):
            assert torch.equal(a[key], b[key]), key


def test_shared_input_layers_share_one_pass():
    """q/k/v read one tensor, gate/up another: 4 Hessians per Llama block, not 7."""
    model = tiny_llama()
    calls = []
    original = gptq.hessian_update

    def counting(h, x, seen):
        calls.append(h.shape[0])
        return original(h, x, seen)

    gptq.hessian_update = counting
    try:
        qalora.wrap(
            model, QALoRAConfig(rank=2, quantizer="gptq"), calibration=token_ids(4, 16), calibration_batch_size=4
        )
    finally:
        gptq.hessian_update = original
    assert calls == [64, 64, 64, 128] * 2  # per block: qkv, o, gate/up, down; one batch each


def test_gptq_wrap_trains_merges_and_saves(tmp_path):
    model = qalora.wrap(
        tiny_llama(), QALoRAConfig(bits=4, group_size=32, rank=4, quantizer="gptq"), calibration=token_ids()
    )
    ids = token_ids(4, 24, seed=9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        before = model(ids).logits
    qalora.merge(model, offset_dtype=torch.float32)
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    qalora.save_pretrained(model, tmp_path / "m")
    loaded = qalora.from_pretrained(tmp_path / "m", tiny_llama(seed=4))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after)
    assert qalora.state_of(loaded).config.quantizer == "gptq"


def test_refused_gptq_wraps_leave_model_unchanged():
    model = tiny_llama()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]

    def unchanged():
        assert [type(m) for m in model.modules()] == types
        now = model.state_dict()
        for k in snap:
            torch.testing.assert_close(now[k], snap[k], rtol=0, atol=0, equal_nan=True)
        assert qalora.state_of(model) is None
        assert all(p.requires_grad for p in model.parameters())

    cfg = QALoRAConfig(rank=2, quantizer="gptq")
    with pytest.raises(qalora.ConfigError, match="calibration"):
        qalora.wrap(model, cfg)
    with pytest.raises(qalora.ConfigError, match="only used by quantizer='gptq'"):
        qalora.wrap(model, QALoRAConfig(rank=2), calibration=token_ids())
    with pytest.raises(qalora.InvalidValueError, match="vocabulary"):
        qalora.wrap(model, cfg, calibration=token_ids() + 90)
    with pytest.raises(qalora.ShapeError, match="calibration"):
        qalora.wrap(model, cfg, calibration=torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(qalora.DTypeError, match="calibration"):
        qalora.wrap(model, cfg, calibration=[[1, 2, 3]])
    unchanged()
    # A layer late in the model with a non-finite weight fails after earlier layers were
    # quantized and swapped in for the calibration passes: all of them are swapped back.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qalora.InvalidValueError, match="not finite"):
        qalora.wrap(model, cfg, calibration=token_ids())
    unchanged()
    assert model.training


def test_uncalled_layer_is_rounded_to_nearest_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(32, 32)
            self.unused = nn.Linear(32, 32)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(16, 32)
    unused = model.unused.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qalora.wrap(
            model,
            QALoRAConfig(bits=4, group_size=16, rank=2, quantizer="gptq"),
            calibration=x,
            filter_fn=lambda m, n: True,
        )
    assert any("not called" in str(w.message) for w in caught)
    packed, _, _ = ops.quantize(unused, 4, 16)
    assert torch.equal(model.unused.base_layer.packed, packed)


@cuda
def test_gptq_on_cuda_matches_cpu():
    w, _, h = layer_case(32, 128, seed=3)
    cpu = run_gptq(w, h, 4, 32)
    packed, scales, offsets, _ = gptq.quantize_weight(
        torch.tensor(w).cuda(), torch.tensor(h).cuda(), 4, 32, torch.float16
    )
    assert packed.is_cuda
    np.testing.assert_array_equal(ops.unpack(packed.cpu(), 4, 128).numpy(), cpu[0])
    np.testing.assert_array_equal(scales.cpu().double().numpy(), cpu[1])
    np.testing.assert_array_equal(offsets.cpu().double().numpy(), cpu[2])


def test_command_line_quantizer_options(capsys):
    from qalora.cli import build_parser, main

    args = build_parser().parse_args(["finetune", "--out", "x", "--quantizer", "gptq", "--calibration-blocks", "16"])
    assert (args.quantizer, args.calibration_blocks, args.damp_percent, args.act_order) == ("gptq", 16, 0.01, False)
    args = build_parser().parse_args(["compare", "--quantizers", "rtn,gptq", "--act-order"])
    assert args.quantizers == ["rtn", "gptq"] and args.act_order
    with pytest.raises(SystemExit) as info:
        main(["compare", "--quantizers", "rtn,awq"])
    assert info.value.code == 2
    assert "--quantizers" in capsys.readouterr().err


def test_gptq_refuses_layers_that_are_already_quantized():
    """A model whose targeted layers are all QuantLinear (a GGUF import) has no dense weights
    for GPTQ: refused with the way out, and the model is left as it was."""
    from qalora.layers import QuantLinear

    dense = [nn.Linear(32, 16), nn.Linear(16, 8)]
    model = nn.Sequential(
        *(QuantLinear.from_weight(d.weight.detach(), d.bias.detach(), 4, 16, torch.float16, "") for d in dense)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = qalora.QALoRAConfig(bits=4, group_size=16, rank=2, quantizer="gptq")
    with pytest.raises(qalora.ConfigError, match="dense=True"):
        qalora.wrap(model, cfg, calibration=torch.randn(4, 32))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
