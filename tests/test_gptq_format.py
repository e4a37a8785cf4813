"""GPTQ checkpoints: layers packed by an independent implementation (AutoGPTQ, see
``fixtures/make_gptq_fixtures.py``) and by hand from the published packing rules are read
exactly and written back byte for byte; act-order groups are refused; whole checkpoints
load into Hugging Face models, export, and reload bit-exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import QALoRAConfig, ops
from qalora.formats import gptq as fmt_gptq
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama as _tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def autogptq_cases():
    with open(os.path.join(FIXTURES, "autogptq_layers.json")) as f:
        cases = json.load(f)["cases"]
    tensors = load_file(os.path.join(FIXTURES, "autogptq_layers.safetensors"))
    out = []
    for name, meta in cases.items():
        own = {key[len(name) + 1 :]: t for key, t in tensors.items() if key.startswith(name + ".")}
        out.append(pytest.param(name, meta, own, id=name))
    return out


@pytest.mark.parametrize("name,meta,t", autogptq_cases())
def test_autogptq_layers_read_and_write_exactly(name, meta, t):
    """Against AutoGPTQ's packing (v1: zero − 1 stored): our reader recovers the drawn codes
    and gives exactly s·(q − z); its output matches AutoGPTQ's forward; our writer packs the
    same codes and zero points into the same int32 words. Act-order layers are refused."""
    fmt = fmt_gptq.GPTQFormat(meta["bits"], meta["group_size"], meta["sym"], meta["act_order"], "gptq")
    gptq_tensors = {k: t[k] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    if meta["act_order"]:
        with pytest.raises(qalora.CheckpointError, match="act-order"):
            fmt_gptq.layer_from_gptq(gptq_tensors, fmt, name)
        return
    layer = fmt_gptq.layer_from_gptq(gptq_tensors, fmt, name)
    bits, k, g = meta["bits"], meta["in_features"], meta["group_size"]
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (k, meta["out_features"], bits, g)
    assert torch.equal(ops.unpack(layer.packed, bits, k), t["codes"])
    q, z, s = t["codes"].double(), t["zeros"].double(), t["drawn_scales"].double()
    dense = s.repeat_interleave(g, 1) * (q - z.repeat_interleave(g, 1))
    assert torch.equal(layer.dequantize(torch.float64), dense)
    with torch.no_grad():
        y = layer(t["x"])
    torch.testing.assert_close(y, t["y_autogptq"], rtol=1e-5, atol=1e-5)
    written, exported, stats = fmt_gptq.layer_to_gptq(layer, "gptq")
    assert torch.equal(written["qweight"], t["qweight"])
    assert torch.equal(written["qzeros"], t["qzeros"])
    assert torch.equal(written["g_idx"], t["g_idx"])
    assert torch.equal(written["scales"], t["scales"].half())
    assert stats.weight_error == 0.0 and stats.clamped_groups == 0
    assert torch.equal(exported.dequantize(torch.float64), dense)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_hand_packed_layers_from_the_published_rules(bits, checkpoint_format):
    """Layers packed bit by bit by the reference (tests/reference.py, written from the
    rules in the module docstring, including 3-bit codes straddling words) read exactly,
    and write back to the same words."""
    rng = np.random.default_rng(bits)
    n, k, g = 64, 96 if bits != 3 else 128, 32
    shift = 1 if checkpoint_format == "gptq" else 0
    qmax = 2**bits - 1
    q = rng.integers(0, qmax + 1, size=(n, k))
    z = rng.integers(shift, qmax + 1, size=(n, k // g))
    s = (rng.uniform(1e-3, 2e-2, size=(n, k // g))).astype(np.float16)
    tensors = {
        "qweight": torch.from_numpy(ref.gptq_pack(q.T, bits)),
        "qzeros": torch.from_numpy(ref.gptq_pack((z - shift), bits).T.copy()),
        "scales": torch.from_numpy(s.T.copy()),
        "g_idx": torch.arange(k, dtype=torch.int32) // g,
    }
    np.testing.assert_array_equal(ref.gptq_unpack(tensors["qweight"].numpy(), bits, k), q.T)
    fmt = fmt_gptq.GPTQFormat(bits, g, False, False, checkpoint_format)
    layer = fmt_gptq.layer_from_gptq(tensors, fmt, "hand")
    assert torch.equal(ops.unpack(layer.packed, bits, k).long(), torch.from_numpy(q))
    dense = np.repeat(s.astype(np.float64), g, 1) * (q - np.repeat(z, g, 1))
    np.testing.assert_array_equal(layer.dequantize(torch.float64).numpy(), dense)
    written, _, _ = fmt_gptq.layer_to_gptq(layer, checkpoint_format)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(written[key], tensors[key]), key


def test_three_bit_words_straddle_codes():
    """At 3 bits code 10 has its low 2 bits at the top of word 0 and its high bit at the
    bottom of word 1 (and code 21 likewise across words 1 and 2)."""
    q = np.zeros((32, 1), dtype=np.int64)
    q[10, 0] = 0b101
    q[21, 0] = 0b110
    words = ref.gptq_pack(q, 3).view(np.uint32)[:, 0]
    # code 10 = 0b101: bits 30, 31 of word 0 get 1, 0; bit 0 of word 1 gets 1.
    # code 21 = 0b110: bit 31 of word 1 gets 0; bits 0, 1 of word 2 get 1, 1.
    assert (words[0], words[1], words[2]) == (1 << 30, 1, 0b11)
    streams = fmt_gptq.words_to_streams(torch.from_numpy(ref.gptq_pack(q, 3)))
    assert ops.unpack(streams, 3, 32)[0].tolist() == q[:, 0].tolist()


def test_config_parsing():
    ok = fmt_gptq.parse_config({"quant_method": "gptq", "bits": 3, "group_size": 32, "desc_act": False, "sym": False})
    assert (ok.bits, ok.group_size, ok.zero_shift) == (3, 32, 1)
    assert fmt_gptq.parse_config({"bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}).zero_shift == 0
    for bad, fragment in [
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"bits": 5, "group_size": 32}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bits": 4, "is_marlin_format": True}, "marlin"),
        ({"bits": 4, "checkpoint_format": "gptq_v9"}, "gptq_v9"),
    ]:
        with pytest.raises(qalora.CheckpointError, match=fragment):
            fmt_gptq.parse_config(bad)


def test_malformed_layers_are_refused():
    fmt = fmt_gptq.GPTQFormat(4, 32)
    good = {
        "qweight": torch.zeros(8, 32, dtype=torch.int32),
        "qzeros": torch.zeros(2, 4, dtype=torch.int32),
        "scales": torch.ones(2, 32, dtype=torch.float16),
    }
    fmt_gptq.layer_from_gptq(good, fmt, "ok")
    for key, value, fragment in [
        ("qweight", None, "missing"),
        ("qzeros", torch.zeros(2, 5, dtype=torch.int32), "qzeros"),
        ("scales", torch.ones(3, 32, dtype=torch.float16), "scales"),
        ("qweight", torch.zeros(8, 32, dtype=torch.int64), "int32"),
        ("g_idx", torch.zeros(64, dtype=torch.int32), "act-order"),
    ]:
        bad = dict(good)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(qalora.CheckpointError, match=fragment):
            fmt_gptq.layer_from_gptq(bad, fmt, "bad")


# --------------------------------------------------------------------------- whole checkpoints


def tiny_llama(seed=0):
    return _tiny_llama(seed, tie=True)


def write_hand_checkpoint(directory, bits=4, g=32, seed=0, act_order_layer=None):
    """A GPTQ checkpoint of a tiny Llama written by hand with the reference packer, and the
    dense model whose weights are exactly its dequantized weights."""
    model = tiny_llama(seed)
    rng = np.random.default_rng(seed)
    tensors = {}
    qmax = 2**bits - 1
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = module.weight.shape
        q = rng.integers(0, qmax + 1, size=(n, k))
        z = rng.integers(1, qmax + 1, size=(n, k // g))
        s = rng.uniform(1e-3, 2e-2, size=(n, k // g)).astype(np.float16)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.repeat(s.astype(np.float64), g, 1) * (q - np.repeat(z, g, 1))))
        g_idx = np.arange(k) // g
        if name == act_order_layer:
            g_idx = rng.permutation(g_idx)
        tensors[f"{name}.qweight"] = torch.from_numpy(ref.gptq_pack(q.T, bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(ref.gptq_pack(z - 1, bits).T.copy())
        tensors[f"{name}.scales"] = torch.from_numpy(s.T.copy())
        tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    for key, t in model.state_dict().items():
        if key.endswith("weight") and key.rpartition(".")[0] + ".qweight" in tensors:
            continue
        if key == "lm_head.weight":
            continue  # tied to the embeddings
        tensors[key] = t.half() if t.is_floating_point() else t
        if t.is_floating_point():
            with torch.no_grad():
                t.copy_(t.half().float())
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    cfg = json.loads(model.config.to_json_string())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": g,
        "desc_act": act_order_layer is not None,
        "sym": False,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    return model.eval()


def test_gptq_checkpoint_loads_wraps_trains_merges_and_exports_back(tmp_path):
    dense = write_hand_checkpoint(tmp_path / "in")
    model = fmt_gptq.load_gptq_model(tmp_path / "in")
    assert qalora.state_of(model).source["format"] == "gptq"
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, qalora.QuantLinear) and layer.offsets.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)

    # Unchanged model out and in again: the same bytes.
    fmt_gptq.export_gptq(model, tmp_path / "same")
    a, b = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "same" / "model.safetensors")
    for key, t in a.items():
        if key.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(t, b[key]), key

    # QA-LoRA on the GPTQ base: its own groups, merged, exported with rounded zero points.
    qalora.wrap(model, QALoRAConfig(rank=4, alpha=8))
    assert model.model.layers[0].mlp.down_proj.base_layer is layer
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    with pytest.raises(qalora.MergeError, match="merge"):
        fmt_gptq.export_gptq(model, tmp_path / "refused")
    qalora.merge(model, offset_dtype=torch.float32)
    heldout = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    report = fmt_gptq.export_gptq(model, tmp_path / "out", heldout=heldout, force=True)
    assert all(r.output_error is not None and r.output_error > 0 for r in report.layers)
    assert report.perplexity_before is not None and report.perplexity_after is not None
    with open(tmp_path / "out" / "gptq_export_report.json") as f:
        saved = json.load(f)
    assert saved["perplexity_change"] == pytest.approx(report.perplexity_change)

    # What was written loads back bit-exactly as the rounded model, and writes the same bytes again.
    back = fmt_gptq.load_gptq_model(tmp_path / "out")
    _, exported, _ = fmt_gptq.layer_to_gptq(model.model.layers[1].self_attn.q_proj, "gptq")
    reloaded = back.model.layers[1].self_attn.q_proj
    assert torch.equal(reloaded.packed, exported.packed)
    assert torch.equal(reloaded.scales, exported.scales) and torch.equal(reloaded.offsets, exported.offsets)
    fmt_gptq.export_gptq(back, tmp_path / "again")
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_export_refuses_large_rounding_error_and_writes_nothing(tmp_path):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(bits=4, group_size=32, rank=2))
    qalora.merge(model)
    heldout = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(qalora.InvalidValueError, match="integer zero points"):
        fmt_gptq.export_gptq(model, tmp_path / "x", heldout=heldout, max_layer_error=1e-6)
    assert not os.path.exists(tmp_path / "x")
    report = fmt_gptq.export_gptq(model, tmp_path / "x", heldout=heldout, max_layer_error=1e-6, force=True)
    assert report.worst_layer.output_error > 1e-6 and os.path.isfile(tmp_path / "x" / "model.safetensors")


def test_act_order_checkpoint_is_refused(tmp_path):
    write_hand_checkpoint(tmp_path / "ao", act_order_layer="model.layers.1.mlp.up_proj")
    with pytest.raises(qalora.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*act-order"):
        fmt_gptq.load_gptq_model(tmp_path / "ao")


@pytest.mark.parametrize("bits", [3, 2])
def test_load_other_bit_widths(tmp_path, bits):
    dense = write_hand_checkpoint(tmp_path / "c", bits=bits, g=32)
    model = fmt_gptq.load_gptq_model(tmp_path / "c")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
