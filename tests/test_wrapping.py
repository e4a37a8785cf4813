"""Target selection (names, regexes, filter_fn), the per-model state, and calls that are
refused leaving the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import qalora
import torch
from ckpt_tools import resign
from qalora import QALoRAConfig
from qalora.targets import select_targets
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


def test_state_object_replaces_loose_attributes():
    model = tiny_llama()
    assert qalora.state_of(model) is None
    qalora.wrap(model, QALoRAConfig(rank=2))
    state = qalora.state_of(model)
    assert isinstance(state, qalora.QALoRAState) and state.config.rank == 2 and not state.merged
    assert state.memory_before_wrap > 0 and state.skipped == []
    assert not any(k.startswith("qalora_") and k != "qalora_state" for k in vars(model))
    assert "qalora_state" not in dict(model.named_modules()) and "qalora_state" not in model.state_dict()
    copied = copy.deepcopy(model)
    assert qalora.state_of(copied).config == state.config and qalora.state_of(copied) is not state
    qalora.merge(model)
    assert state.merged


def test_filter_fn_selects_layers_and_combines_with_names():
    model = tiny_llama()
    picked = select_targets(model, filter_fn=lambda m, name: name.endswith("down_proj"))
    assert [n for n, _ in picked] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # filter_fn alone may pick the output head; the default rule never does.
    assert [n for n, _ in select_targets(model, filter_fn=lambda m, n: n == "lm_head")] == ["lm_head"]
    both = select_targets(model, ["self_attn"], filter_fn=lambda m, n: m.out_features == 64)
    assert {n.rsplit(".", 1)[1] for n, _ in both} == {"q_proj", "o_proj"}
    qalora.wrap(model, QALoRAConfig(rank=2), filter_fn=lambda m, n: ".layers.1." in n)
    assert qalora.summary(model).adapter_layers == 7
    with pytest.raises(qalora.NoTargetModulesError, match="filter_fn"):
        qalora.wrap(tiny_llama(), QALoRAConfig(), filter_fn=lambda m, n: False)
    with pytest.raises(qalora.ConfigError, match="filter_fn"):
        qalora.wrap(tiny_llama(), QALoRAConfig(), filter_fn="q_proj")


def test_wrap_adapts_existing_quant_layers_without_requantizing():
    model = tiny_llama()
    layer = qalora.QuantLinear.from_weight(model.model.layers[0].mlp.down_proj.weight, None, 8, 16)
    model.model.layers[0].mlp.down_proj = layer
    packed = layer.packed.clone()
    qalora.wrap(model, QALoRAConfig(bits=4, group_size=32, rank=2))
    wrapped = model.model.layers[0].mlp.down_proj
    assert isinstance(wrapped, qalora.QALoRALinear) and wrapped.base_layer is layer
    assert (layer.bits, layer.group_size) == (8, 16) and torch.equal(layer.packed, packed)
    assert wrapped.lora_A.weight.shape == (2, 128 // 16)  # pooling follows the layer's own groups
    assert model.model.layers[0].mlp.up_proj.base_layer.bits == 4


def test_refused_wrap_leaves_model_unchanged():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")  # a late layer fails
    snap = snapshot(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    with pytest.raises(qalora.InvalidValueError, match="not finite"):
        qalora.wrap(model, QALoRAConfig(rank=2))
    assert_unchanged(model, snap)
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert qalora.state_of(model) is None


def test_refused_loads_leave_model_unchanged(tmp_path):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    qalora.save_adapter(model, tmp_path / "adapter")
    # An adapter file whose last tensor has the wrong shape: nothing is copied.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    last = sorted(tensors)[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, tensors[last].shape[1])
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    resign(tmp_path / "adapter", "adapter_config.json")
    target = qalora.wrap(tiny_llama(seed=3), QALoRAConfig(rank=2))
    snap = snapshot(target)
    # The file contradicts its own config: refused as damaged, before anything is copied.
    with pytest.raises(qalora.CheckpointError, match="shape"):
        qalora.load_adapter(target, tmp_path / "adapter")
    assert_unchanged(target, snap)

    # A checkpoint with a tensor of the wrong shape: from_pretrained keeps the model as it was.
    qalora.save_pretrained(model, tmp_path / "full")
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, tmp_path / "full" / "model.safetensors", metadata={"format": "qalora"})
    resign(tmp_path / "full")
    fresh = tiny_llama(seed=5)
    snap = snapshot(fresh)
    with pytest.raises(qalora.AdapterMismatchError, match=r"model\.norm\.weight"):
        qalora.from_pretrained(tmp_path / "full", fresh)
    assert_unchanged(fresh, snap)
    assert qalora.state_of(fresh) is None
