"""Trained group parameters (QALoRAConfig.train_scales / train_offsets / train_norms): the
gradients of the scales and offsets against float64 autograd references on random inputs
(every bit width, odd shapes, the fused and the composed routes, CPU core and torch
backends), the merge against the unmerged layer within the storage rounding, and what a
training run and a saved model do with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import QALoRALinear, ops
from qalora.errors import ConfigError, ShapeError
from qalora.layers import QuantLinear
from torch.overrides import TorchFunctionMode


class _Dispatcher(TorchFunctionMode):
    """While active, the ops take the custom-op route (as under tracing)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def tensor(shape, seed, scale=1.0):
    return torch.from_numpy((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32))


# (N, K, g): odd row counts, several groups, group sizes that are multiples of 8 (every
# bit width's byte rule), and one layer wide enough for several GEMM tiles of rows.
SHAPES = [(13, 48, 16), (7, 72, 24), (33, 64, 32)]


def trained_layer(n, k, g, bits, seed, *, scales=True, offsets=True, dropout=0.0, bias=True):
    base = QuantLinear.from_weight(tensor((n, k), seed, 0.05), tensor((n,), seed + 1) if bias else None, bits, g)
    lyr = QALoRALinear(base, rank=3, alpha=6, dropout=dropout, train_scales=scales, train_offsets=offsets)
    with torch.no_grad():
        lyr.lora_A.weight.copy_(tensor(lyr.lora_A.weight.shape, seed + 2, 0.3))
        lyr.lora_B.weight.copy_(tensor(lyr.lora_B.weight.shape, seed + 3, 0.3))
        if scales:
            lyr.delta_scales.copy_(tensor(lyr.delta_scales.shape, seed + 4, 0.1))
        if offsets:
            lyr.delta_offsets.copy_(tensor(lyr.delta_offsets.shape, seed + 5, 0.7))
    return lyr


def float64_reference(lyr: QALoRALinear, x: torch.Tensor, grad_y: torch.Tensor):
    """y and every gradient, from the unpacked codes in float64 with torch autograd: an
    independent formula (s·(1+ds)·q + m + s·dm, pooled adapter), not the kernels."""
    base = lyr.base_layer
    g = base.group_size
    codes = torch.from_numpy(ref.unpack(base.packed.numpy(), base.bits, base.in_features)).double()
    s0, m0 = base.scales.double(), base.offsets.double()
    ds = (lyr.delta_scales if lyr.delta_scales is not None else torch.zeros_like(s0)).detach().double()
    dm = (lyr.delta_offsets if lyr.delta_offsets is not None else torch.zeros_like(s0)).detach().double()
    a = lyr.lora_A.weight.detach().double()
    b = lyr.lora_B.weight.detach().double()
    xd = x.detach().double()
    for t in (ds, dm, a, b, xd):
        t.requires_grad_(True)
    s = s0 * (1 + ds)
    m = m0 + s0 * dm
    w = codes * s.repeat_interleave(g, 1) + m.repeat_interleave(g, 1)
    pooled = xd.reshape(*xd.shape[:-1], -1, g).mean(-1)
    y = xd @ w.t() + lyr.scaling * (pooled @ a.t()) @ b.t()
    if base.bias is not None:
        y = y + base.bias.double()
    y.backward(grad_y.double())
    return y.detach(), {"x": xd.grad, "A": a.grad, "B": b.grad, "ds": ds.grad, "dm": dm.grad}


def grads_of(lyr, x, grad_y):
    lyr.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = lyr(x)
    y.backward(grad_y)
    out = {"x": x.grad, "A": lyr.lora_A.weight.grad, "B": lyr.lora_B.weight.grad}
    out["ds"] = lyr.delta_scales.grad if lyr.delta_scales is not None else None
    out["dm"] = lyr.delta_offsets.grad if lyr.delta_offsets is not None else None
    return y.detach(), out


def close(got, want, what, rtol=2e-4):
    scale = want.abs().max().item() + 1e-12
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs max magnitude {scale:.3g}"


@pytest.mark.parametrize("bits", ops.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [5, 37])  # the fused small-batch kernel, and GEMM tiles
@pytest.mark.parametrize("route", ["fused", "custom-op"])
def test_gradients_match_a_float64_reference(bits, shape, rows, route):
    n, k, g = shape
    lyr = trained_layer(n, k, g, bits, seed=bits * 100 + n)
    x = tensor((rows, k), 7 + bits)
    grad_y = tensor((rows, n), 11 + bits)
    want_y, want = float64_reference(lyr, x, grad_y)
    if route == "fused":
        got_y, got = grads_of(lyr, x, grad_y)
    else:
        with _Dispatcher():
            got_y, got = grads_of(lyr, x, grad_y)
    close(got_y, want_y, "y")
    for name in ("x", "A", "B", "ds", "dm"):
        close(got[name], want[name], name)


@pytest.mark.parametrize("scales,offsets", [(True, False), (False, True)])
def test_each_kind_alone_and_with_dropout_and_leading_dims(scales, offsets):
    lyr = trained_layer(13, 48, 16, 4, seed=3, scales=scales, offsets=offsets, dropout=0.3)
    lyr.eval()  # dropout off for the reference comparison
    x = tensor((2, 9, 48), 5)
    grad_y = tensor((2, 9, 13), 6)
    want_y, want = float64_reference(lyr, x, grad_y)
    got_y, got = grads_of(lyr, x, grad_y)
    close(got_y, want_y, "y")
    close(got["ds" if scales else "dm"], want["ds" if scales else "dm"], "group parameter")
    assert (got["dm"] if scales else got["ds"]) is None
    # In training mode the dropout reaches the adapter only: the group parameters'
    # gradients read x itself, so they equal the eval-mode ones for the same grad_y.
    lyr.train()
    torch.manual_seed(0)
    _, got_train = grads_of(lyr, x, grad_y)
    name = "ds" if scales else "dm"
    close(got_train[name], want[name], f"{name} under dropout")


@pytest.mark.parametrize("bits", ops.SUPPORTED_BITS)
def test_scale_gradient_kernel_backends_agree_and_check_shapes(bits):
    n, k, g = 19, 64, 16
    packed, s, o = ops.quantize(tensor((n, k), bits, 0.1), bits, g, torch.float32)
    x = tensor((3, 4, k), 2)
    gy = tensor((3, 4, n), 3)
    codes = torch.from_numpy(ref.unpack(packed.numpy(), bits, k)).double()
    want = ((gy.reshape(-1, n).double().t() @ x.reshape(-1, k).double()) * codes).view(n, k // g, g).sum(-1)
    for backend in ("core", "torch"):
        got = qalora._core.qmatmul_grad_scales(gy, x, packed, s, o, bits, g, backend)
        assert got.shape == (n, k // g) and got.dtype == torch.float32
        close(got, want, f"{backend} backend")
    with pytest.raises(ShapeError, match="leading dimensions"):
        qalora._core.qmatmul_grad_scales(gy[:2], x, packed, s, o, bits, g)
    with pytest.raises(ShapeError, match="last dimension K = 32"):
        qalora._core.qmatmul_grad_scales(gy, x[..., :32], packed, s, o, bits, g)
    with pytest.raises(ShapeError, match="out_features"):
        qalora._core.qmatmul_grad_scales(gy[..., :5], x, packed, s, o, bits, g)


@pytest.mark.parametrize("bits", ops.SUPPORTED_BITS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_merged_equals_unmerged_within_the_storage_rounding(bits, scale_dtype):
    n, k, g = 13, 48, 16
    base = QuantLinear.from_weight(tensor((n, k), bits, 0.05), tensor((n,), 2), bits, g, scale_dtype)
    lyr = trained_layer(n, k, g, bits, seed=bits)
    lyr.base_layer = base
    x = tensor((37, k), 9)
    with torch.no_grad():
        unmerged = lyr(x).double()
        merged_layer = lyr.merged()
        merged = merged_layer(x).double()
    rounding = lyr.storage_rounding(merged_layer)
    # Every stored parameter moved by at most half an ulp of its storage dtype.
    eps = torch.finfo(scale_dtype).eps
    assert rounding["scale"] <= eps
    # The output moves by at most what the rounding of each parameter can move it.
    s, m = (t.detach().double() for t in lyr.group_params())
    m = torch.from_numpy(
        ref.merge(m.numpy(), lyr.lora_A.weight.detach().numpy(), lyr.lora_B.weight.detach().numpy(), lyr.scaling, g)
    )
    ds = (merged_layer.scales.double() - s).abs()
    dm = (merged_layer.offsets.double() - m).abs()
    codes = torch.from_numpy(ref.unpack(base.packed.numpy(), bits, k)).double()
    bound = x.abs().double() @ (codes * ds.repeat_interleave(g, 1) + dm.repeat_interleave(g, 1)).t()
    slack = 1e-5 * (unmerged.abs() + 1)
    assert bool(((merged - unmerged).abs() <= bound + slack).all())
    if scale_dtype == torch.float32:
        close(merged, unmerged, "float32 storage", rtol=1e-5)
    # Codes unchanged: the merge moves group parameters only.
    assert torch.equal(merged_layer.packed, base.packed)


def test_config_fields_validate_and_round_trip():
    cfg = qalora.QALoRAConfig(
        train_scales=True, train_offsets=True, train_norms=True, offset_lr_scale=4.0, scale_lr_scale=0.5
    )
    assert qalora.QALoRAConfig.from_json(cfg.to_json()) == cfg
    assert "train_scales" not in qalora.QALoRAConfig().to_dict()  # older readers keep working
    for bad in ({"train_scales": 1}, {"train_norms": "yes"}, {"offset_lr_scale": 0}, {"scale_lr_scale": math.inf}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            qalora.QALoRAConfig(**bad)


# ---------------------------------------------------------------- whole models


ALL = dict(train_scales=True, train_offsets=True, train_norms=True)


def _trained_tiny(seed=0, steps=3, **cfg):
    from qalora.train import finetune
    from tiny_models import tiny_llama

    model = tiny_llama(seed)
    qalora.wrap(
        model,
        qalora.QALoRAConfig(bits=4, group_size=16, rank=4, alpha=8, offset_lr_scale=20.0, scale_lr_scale=20.0, **cfg),
    )
    blocks = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(seed))
    finetune(model, blocks, steps, batch_size=2, lr=1e-2, show_progress=False)
    return model, blocks


def test_wrap_trains_what_the_config_names_and_the_step_moves_it():
    model, _ = _trained_tiny(**ALL)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".delta_scales") for n in names)
    assert any(n.endswith(".delta_offsets") for n in names)
    assert any("norm" in n for n in names)
    assert not any(n.endswith(("packed", "embed_tokens.weight")) for n in names)
    for n, p in model.named_parameters():
        if n.endswith((".delta_scales", ".delta_offsets")) or "norm" in n:
            init = 1.0 if "norm" in n else 0.0
            assert float((p.detach() - init).abs().max()) > 0, f"{n} did not train"
    # Nothing of this kind trains by default unless the defaults say so.
    plain = qalora.wrap(__import__("tiny_models").tiny_llama(0), qalora.QALoRAConfig(bits=4, group_size=16))
    default = qalora.QALoRAConfig()
    trained = {n.rsplit(".", 1)[-1] for n, p in plain.named_parameters() if p.requires_grad}
    assert ("delta_scales" in trained) == default.train_scales
    assert ("delta_offsets" in trained) == default.train_offsets


def test_merged_model_equals_the_trained_one_within_the_storage_rounding():
    model, blocks = _trained_tiny(**ALL)
    model.eval()
    with torch.no_grad():
        before = model(blocks).logits
        qalora.merge(model, offset_dtype=torch.float32)
        after = model(blocks).logits
    rounding = qalora.state_of(model).merge_rounding
    assert rounding["scale"] <= torch.finfo(torch.float16).eps and rounding["scale_layer"]
    assert rounding["offset"] == 0.0  # float32 offsets hold the trained values exactly
    # Scales rounded to float16 only: the logits move by far less than training moved them.
    assert float((after - before).abs().max()) <= 1e-2 * float(before.abs().max())


def test_adapter_and_model_checkpoints_carry_every_trained_tensor(tmp_path):
    from tiny_models import tiny_llama

    model, blocks = _trained_tiny(**ALL)
    model.eval()
    with torch.no_grad():
        want = model(blocks).logits
    qalora.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama(0)
    qalora.wrap(fresh, qalora.QALoRAConfig(bits=4, group_size=16, rank=4, alpha=8, **ALL))
    qalora.load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(blocks).logits, want)
    # A model wrapped without trained group parameters refuses the file, unchanged.
    other = qalora.wrap(tiny_llama(0), qalora.QALoRAConfig(bits=4, group_size=16, rank=4, alpha=8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(qalora.errors.AdapterMismatchError, match="train_scales"):
        qalora.load_adapter(other, tmp_path / "adapter")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    # The whole unmerged model, saved and loaded: the same logits, the same trainables.
    qalora.save_pretrained(model, tmp_path / "model")
    loaded = qalora.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(loaded(blocks).logits, want)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_config_file_without_the_new_fields_means_what_it_meant_when_written():
    # Files written before trained group parameters existed hold none of these fields; they
    # read as those releases behaved, whatever today's defaults are.
    old = {"bits": 4, "group_size": 32, "rank": 16, "alpha": 16.0, "version": 1}
    cfg = qalora.QALoRAConfig.from_dict(old)
    assert (cfg.train_scales, cfg.train_offsets, cfg.train_norms) == (False, False, False)
    assert (cfg.offset_lr_scale, cfg.scale_lr_scale) == (1.0, 1.0)
    # and a config that uses none of them writes none of them
    assert set(cfg.to_dict()) == set(old) | {
        "dropout",
        "target_modules",
        "exclude_modules",
        "scale_dtype",
        "on_indivisible",
        "adapter",
        "quantizer",
        "damp_percent",
        "act_order",
    }
