"""Calls that change a model either succeed or leave it exactly as it was (merge,
merge_requantize, set_activations, save_pretrained), and merge never stores Inf offsets."""

from __future__ import annotations

import pytest
import qalora
import torch
from qalora import QALoRAConfig
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

LATE = "model.layers.1.mlp.down_proj"


def trained(adapter="qalora"):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=2, adapter=adapter))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model.eval()


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        [getattr(m, "activations", None) for m in model.modules()],
        qalora.state_of(model).merged,
    )


def assert_unchanged(model, snap):
    state, types, activations, merged = snap
    assert [type(m) for m in model.modules()] == types
    assert [getattr(m, "activations", None) for m in model.modules()] == activations
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(now[k].dtype == state[k].dtype and torch.equal(now[k].isnan(), state[k].isnan()) for k in state)
    assert all(torch.equal(now[k].nan_to_num(), state[k].nan_to_num()) for k in state)
    assert qalora.state_of(model).merged == merged


def test_merge_with_a_non_finite_adapter_changes_nothing():
    model = trained()
    with torch.no_grad():
        model.get_submodule(LATE).lora_B.weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(qalora.MergeError, match=LATE):
        qalora.merge(model)
    assert_unchanged(model, snap)


def test_merge_refusals_change_nothing():
    model = trained(adapter="lora")
    snap = snapshot(model)
    with pytest.raises(qalora.MergeError, match="merge_requantize"):
        qalora.merge(model)
    assert_unchanged(model, snap)
    model = trained()
    snap = snapshot(model)
    with pytest.raises(qalora.DTypeError, match="offset_dtype"):
        qalora.merge(model, offset_dtype=torch.int8)
    assert_unchanged(model, snap)


def test_merge_switches_an_overflowing_layer_to_float32_offsets():
    model = trained()
    layer = model.get_submodule(LATE)
    with torch.no_grad():
        layer.lora_B.weight.fill_(1e7)  # scaling * B·A / g far above float16's 65504
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with pytest.warns(qalora.QALoRAWarning, match=f"overflows.*{LATE}.*float32"):
        qalora.merge(model)
    merged = model.get_submodule(LATE)
    assert merged.offsets.dtype == torch.float32 and bool(torch.isfinite(merged.offsets).all())
    assert model.get_submodule("model.layers.0.mlp.down_proj").offsets.dtype == torch.float16
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert bool(torch.isfinite(got).all())
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_merge_requantize_refusal_changes_nothing():
    model = trained(adapter="lora")
    with torch.no_grad():
        model.get_submodule(LATE).lora_B.weight.fill_(1e7)  # the re-quantized range overflows float16 scales
    snap = snapshot(model)
    with pytest.raises(qalora.InvalidValueError):
        qalora.merge_requantize(model)
    assert_unchanged(model, snap)


def test_set_activations_refusal_changes_nothing():
    model = trained()
    qalora.merge(model)
    qalora.set_activations(model, "int8")
    snap = snapshot(model)
    for bad in ("int4", 8, None):
        with pytest.raises(qalora.QALoRAError):
            qalora.set_activations(model, bad)
        assert_unchanged(model, snap)


def test_refused_save_changes_nothing(tmp_path):
    model = trained()
    snap = snapshot(model)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(qalora.CheckpointError, match="not a directory"):
        qalora.save_pretrained(model, tmp_path / "file")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with pytest.raises(qalora.CheckpointError, match="sub"):
        qalora.save_pretrained(model, tmp_path / "d")
    assert_unchanged(model, snap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["sub"]
