"""GGUF in and out on synthetic files (every supported type, llama and qwen2): the import is
exact against gguf.quants.dequantize and against transformers' own GGUF loader, adapters
follow each layer's groups, and the export writes what the model computes with."""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest
import qalora
import torch
from qalora import train
from qalora.formats import gguf_arch, gguf_blocks, gguf_export
from qalora.formats.gguf_file import TensorReader, read_header
from qalora.targets import quantized_layers
from torch import nn

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
import gguf_synthetic as syn  # noqa: E402
from gguf_checks import random_update  # noqa: E402

ALL_TYPES = syn.EVERY_TYPE
#: A small llama: 2 layers, hidden 256, MLP 512, untied head.
SMALL = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=300, tied=False)
LEGACY_TYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_0",
    "attn_v": "Q5_1",
    "attn_output": "F16",
    "ffn_gate": "Q4_1",
    "ffn_up": "BF16",
    "ffn_down": "Q4_1",
    "token_embd": "Q8_0",
    "output": "Q6_K",
}


def write(tmp_path_factory, name, **kw):
    path = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
    spec = syn.SyntheticSpec(**kw)
    syn.write_synthetic_gguf(path, spec, seed=len(name))
    return str(path), spec


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write(tmp_path_factory, "mixed", **SMALL, types=ALL_TYPES)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    return write(tmp_path_factory, "legacy", **{**SMALL, "heads": 8, "vocab": 320}, types=LEGACY_TYPES)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    types = {"default": "Q4_1", "ffn_down": "Q6_K", "token_embd": "Q8_0"}
    return write(tmp_path_factory, "qwen", arch="qwen2", **{**SMALL, "tied": True}, types=types)


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


gguf_reference = syn.gguf_reference


def test_import_is_exact_for_every_type(mixed):
    path, spec = mixed
    lm = qalora.load_gguf(path)
    model = lm.model
    header = read_header(path)
    expect = {
        "Q2_K": (2, 16),
        "Q3_K": (3, 16),
        "Q4_K": (4, 32),
        "Q5_K": (5, 32),
        "Q6_K": (6, 16),
        "Q8_0": (8, 32),
        "Q5_0": (5, 32),
        "Q5_1": (5, 32),
    }
    n_quant = 0
    for name, entry in header.tensors.items():
        hf = gguf_arch.hf_name(name)
        module = model.get_submodule(hf.rpartition(".")[0])
        ref = gguf_reference(path, name, spec)
        if isinstance(module, qalora.QuantLinear):
            n_quant += 1
            ours = module.dequantize(torch.float32).numpy()
            assert np.array_equal(ours, ref), name  # equal as floats (signed zeros aside)
            type_name = gguf_blocks.type_name(entry.ggml_type)
            if type_name in expect:
                assert (module.bits, module.group_size) == expect[type_name], name
            k_quant = type_name.endswith("_K")
            assert module.scales.dtype == (torch.float32 if k_quant else torch.float16), name
            assert module.is_factored == k_quant, name
        else:
            value = model.get_parameter(hf).detach().numpy()
            assert np.array_equal(value.reshape(ref.shape), ref), name
    assert n_quant == 2 * 7 + 1  # every linear layer and the untied output head
    # no dense copy of a quantized layer: the model is its buffers plus embeddings and norms
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    quant = sum(b.numel() * b.element_size() for _, m in quantized_layers(model) for b in m.buffers())
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary_emb" in n)
    assert qalora.memory_bytes(model) == dense + quant + rotary
    assert dense < 0.5 * qalora.memory_bytes(model) + model.model.embed_tokens.weight.numel() * 4
    source = qalora.state_of(model).source
    assert source["format"] == "gguf" and source["path"] == os.path.abspath(path)
    assert source["layers"]["model.layers.0.self_attn.v_proj"]["type"] == "Q6_K"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


#: Bytes a factored layer holds over its tensor's bytes in the file: 8-bit sub-block
#: integers where the file packs 6 (Q4_K/Q5_K/Q3_K) or 4 (Q2_K) bits; Q6_K stores int8.
KQUANT_SIZE = {"Q2_K": 1.20, "Q3_K": 1.06, "Q4_K": 1.03, "Q5_K": 1.03, "Q6_K": 1.01}


def test_kquant_layers_are_held_at_file_size_and_compute_as_decoded(mixed):
    """Every K-quant layer holds its group parameters factored, at about the tensor's bytes
    in the file, and computes (small and large batches, forward and backward) exactly what
    the same layer with the decoded float32 parameters computes."""
    path, _ = mixed
    model = qalora.load_gguf(path).model
    header = read_header(path)
    seen = set()
    torch.manual_seed(0)
    for name, entry in header.tensors.items():
        type_name = gguf_blocks.type_name(entry.ggml_type)
        if type_name not in KQUANT_SIZE:
            continue
        module = model.get_submodule(gguf_arch.hf_name(name).rpartition(".")[0])
        assert isinstance(module, qalora.QuantLinear) and module.is_factored, name
        held = sum(b.numel() * b.element_size() for b in module.buffers())
        assert held <= KQUANT_SIZE[type_name] * entry.nbytes, (name, held / entry.nbytes)
        plain = copy.deepcopy(module)
        plain.unfactor_()
        assert not plain.is_factored and plain.scales.dtype == torch.float32
        assert held < 0.85 * sum(b.numel() * b.element_size() for b in plain.buffers()), name
        assert torch.equal(plain.dequantize(), module.dequantize()), name
        for rows in (1, 5, 40):  # the fused kernels, and the tiled GEMM path
            x = torch.randn(rows, module.in_features, requires_grad=True)
            xp = x.detach().clone().requires_grad_(True)
            y, yp = module(x), plain(xp)
            assert torch.equal(y, yp), (name, rows)
            g = torch.randn_like(y)
            y.backward(g)
            yp.backward(g)
            assert torch.equal(x.grad, xp.grad), (name, rows)
        seen.add(type_name)
    assert seen == set(KQUANT_SIZE)


def test_a_tensor_that_cannot_be_factored_is_imported_with_float32_parameters(mixed, monkeypatch):
    """Where a K-quant's implied minimum overflows float16 as a factor (decode_rows gives no
    factored form), the import reads that tensor again into float32 parameters: still exact."""
    path, spec = mixed
    header = read_header(path)
    name = next(n for n, e in header.tensors.items() if gguf_blocks.type_name(e.ggml_type) == "Q6_K")
    decode = gguf_blocks.decode_rows

    def without_factors(ggml_type, raw, k, what="tensor"):
        dec = decode(ggml_type, raw, k, what)
        if what == name:
            dec.factored = None
        return dec

    monkeypatch.setattr(gguf_blocks, "decode_rows", without_factors)
    model = qalora.load_gguf(path).model
    layer = model.get_submodule(gguf_arch.hf_name(name).rpartition(".")[0])
    assert not layer.is_factored and layer.scales.dtype == torch.float32
    assert np.array_equal(layer.dequantize().numpy(), gguf_reference(path, name, spec))
    others = [m for m in model.modules() if isinstance(m, qalora.QuantLinear) and m is not layer]
    assert sum(m.is_factored for m in others) == 9  # every other K-quant layer still factored


def test_factored_layers_trace_without_graph_breaks(mixed):
    """A model with factored K-quant layers goes through torch.compile whole (the ops' fake
    implementations take the factors), with the eager result."""
    model = qalora.load_gguf(mixed[0]).model
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_factored_layers_keep_their_factors_through_dtype_moves_and_state_dicts(mixed):
    path, _ = mixed
    model = qalora.load_gguf(path).model
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.is_factored
    want = layer.dequantize()
    model.to(torch.bfloat16)  # floating tensors convert; the factors are part of the layout
    assert layer.super_scales.dtype == torch.float16 and torch.equal(layer.dequantize(), want)
    model.float()
    state = layer.state_dict()  # the factored buffers, as held
    assert {"sub_scales", "super_scales", "super_offsets"} <= set(state) and "scales" not in state
    plain = qalora.QuantLinear(
        layer.in_features, layer.out_features, layer.bits, layer.group_size, False, torch.float32
    )
    plain.load_state_dict(state)  # a plain layer takes the factored form
    assert plain.is_factored and torch.equal(plain.dequantize(), want)
    plain.unfactor_()
    layer.load_state_dict(plain.state_dict())  # float parameters make a factored layer plain
    assert not layer.is_factored and torch.equal(layer.dequantize(), want)
    with pytest.raises(qalora.ShapeError, match="super_scales"):
        layer.factor_(  # 3 factors a row cannot divide its 16 groups
            torch.zeros(layer.out_features, layer.in_features // layer.group_size, dtype=torch.uint8),
            torch.zeros(layer.out_features, 3, dtype=torch.float16),
            None,
            torch.zeros(layer.out_features, 3, dtype=torch.float16),
        )
    with pytest.raises(qalora.ShapeError, match="sub_scales"):
        layer.factor_(
            torch.zeros(layer.out_features, 3, dtype=torch.uint8),
            torch.zeros(layer.out_features, 2, dtype=torch.float16),
            None,
            torch.zeros(layer.out_features, 2, dtype=torch.float16),
        )
    assert not layer.is_factored and torch.equal(layer.dequantize(), want)  # a refusal changes nothing


_INTS = torch.zeros(8, 8, dtype=torch.uint8)
_FACTORS = torch.zeros(8, 1, dtype=torch.float16)


@pytest.mark.parametrize(
    "args,error,fragment",
    [
        ((np.zeros((8, 8), np.uint8), _FACTORS, None, _FACTORS), qalora.DTypeError, "sub_scales: got ndarray"),
        ((_INTS, None, None, _FACTORS), qalora.DTypeError, "super_scales: got NoneType"),
        ((_INTS.float(), _FACTORS, None, _FACTORS), qalora.DTypeError, "allowed: torch.uint8, torch.int8"),
        ((_INTS, _FACTORS.bfloat16(), None, _FACTORS), qalora.DTypeError, "allowed: torch.float16"),
        ((_INTS, _FACTORS, _INTS[:, :3], _FACTORS), qalora.ShapeError, "sub_offsets: got shape (8, 3)"),
        ((_INTS, _FACTORS, None, _FACTORS.expand(8, 2)), qalora.ShapeError, "super_offsets"),
        ((_INTS, _FACTORS[:4], None, _FACTORS[:4]), qalora.ShapeError, "out_features = 8"),
        ((_INTS.to("meta"), _FACTORS, None, _FACTORS), qalora.DeviceError, "sub_scales: on meta"),
    ],
)
def test_factor_refuses_bad_arguments_and_leaves_the_layer_as_it_was(args, error, fragment):
    layer = qalora.QuantLinear.from_weight(torch.randn(8, 256), None, 4, 32)
    want = layer.dequantize()
    with pytest.raises(error, match=re.escape(fragment)):
        layer.factor_(*args)
    assert not layer.is_factored and torch.equal(layer.dequantize(), want)
    layer.factor_(_INTS, _FACTORS, None, _FACTORS)  # the same layer takes good arguments
    assert layer.is_factored


def test_checkpoints_keep_kquant_layers_factored(mixed, tmp_path):
    """save_pretrained / from_pretrained of a wrapped and of a merged K-quant model: the
    layers come back factored (the file holds the integers and factors) and compute the same."""
    model = qalora.load_gguf(mixed[0]).model
    with pytest.warns(qalora.QALoRAWarning, match="no adapter"):
        qalora.wrap(model, qalora.QALoRAConfig())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "delta" in name):
                p.normal_(std=1e-3)
    ids = torch.randint(0, 300, (1, 9))

    def factored(m):
        return sum(isinstance(x, qalora.QuantLinear) and x.is_factored for x in m.modules())

    for step in ("wrapped", "merged"):
        if step == "merged":
            qalora.merge(model)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        qalora.save_pretrained(model, tmp_path / step)
        back = qalora.from_pretrained(tmp_path / step)
        assert factored(back) == factored(model) == 10, step  # Q2_K..Q6_K layers of two blocks
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids).logits, want), step


@pytest.mark.parametrize("which", ["mixed", "legacy", "qwen"])
def test_import_matches_transformers_gguf_loader(which, request):
    path, spec = request.getfixturevalue(which)
    ours = qalora.load_gguf(path).model
    directory, name = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.randint(3, spec.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 summation order only
    if which == "qwen":
        q = ours.model.layers[0].self_attn.q_proj
        assert isinstance(q, qalora.QuantLinear) and q.bias is not None
        assert torch.equal(q.bias, theirs.model.layers[0].self_attn.q_proj.bias)


def test_load_model_routes_gguf_through_the_importer(legacy):
    path, _ = legacy
    lm = qalora.load_model(path)
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, qalora.QuantLinear)
    assert isinstance(lm.model.model.layers[0].self_attn.o_proj, nn.Linear)  # stored F16 in the file
    dense = qalora.load_model(path, dense=True)
    layer = dense.model.model.layers[0].mlp.down_proj
    assert type(layer) is nn.Linear
    assert torch.equal(layer.weight, lm.model.model.layers[0].mlp.down_proj.dequantize())


def test_refuses_unsupported_architecture_and_types(tmp_path_factory, tmp_path):
    path, _ = write(
        tmp_path_factory,
        "iq",
        hidden=64,
        heads=2,
        kv_heads=1,
        ffn=128,
        layers=1,
        vocab=270,
        types={"default": "IQ4_NL"},
    )
    with pytest.raises(qalora.FormatError, match=r"IQ4_NL.*supported: Q4_0"):
        qalora.load_gguf(path)
    bad = tmp_path / "gemma.gguf"
    bad.write_bytes(open_bytes(path).replace(b"llama", b"gemm2"))  # the architecture name, same length
    with pytest.raises(qalora.FormatError, match=r"'gemm2' is not supported.*llama \(.*qwen2 \("):
        qalora.load_gguf(bad)
    with pytest.raises(qalora.ModelLoadError, match="does not exist"):
        qalora.load_gguf(tmp_path / "none.gguf")


def test_rope_freqs_divide_the_rotary_frequencies(tmp_path_factory, tmp_path):
    path, spec = write(
        tmp_path_factory, "rope", hidden=128, heads=2, kv_heads=1, ffn=256, layers=1, vocab=270, rope_freqs=True
    )
    model = qalora.load_gguf(path).model
    header = read_header(path)
    with TensorReader(path) as r:
        factors = gguf_blocks.decode_dense(0, r.raw(header.tensors["rope_freqs.weight"]))
    dim = spec.head_dim
    base = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    assert torch.allclose(model.model.rotary_emb.inv_freq, base / torch.from_numpy(factors), rtol=1e-6)
    # a checkpoint of the model gets them back on load, and the export carries the tensor on
    lm = qalora.load_gguf(path)
    qalora.wrap(lm.model, qalora.QALoRAConfig(rank=2))
    qalora.merge(lm.model)
    from qalora.loaders import save_for_reload

    save_for_reload(lm.model, lm.tokenizer, str(tmp_path / "ckpt"))
    again = qalora.load_model(str(tmp_path / "ckpt")).model
    assert torch.equal(again.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    report = qalora.export_gguf(again, tmp_path / "rope.gguf")
    assert {t.name: t.how for t in report.tensors}["rope_freqs.weight"] == "copied"


# --------------------------------------------------------------------------- adapters on imported layers


def test_wrap_adapts_imported_layers_in_their_own_groups(mixed, legacy):
    path, _ = mixed
    model = qalora.load_gguf(path).model
    before = {n: (m.packed.clone(), m.bits, m.group_size) for n, m in quantized_layers(model)}
    # By default, layers of a type whose offset is fixed by its scale (Q3_K, Q6_K, Q8_0) get
    # no adapter (an exact export could not hold their merged offsets), with a warning.
    default = qalora.load_gguf(path).model
    with pytest.warns(qalora.QALoRAWarning, match="Q3_K/Q6_K/Q8_0.*fixed_offset_layers"):
        qalora.wrap(default, qalora.QALoRAConfig(rank=4))
    layers = default.model.layers[0]
    assert isinstance(layers.self_attn.q_proj, qalora.QuantLinear)  # Q3_K
    assert isinstance(layers.self_attn.v_proj, qalora.QuantLinear)  # Q6_K
    assert isinstance(layers.mlp.up_proj, qalora.QuantLinear)  # Q8_0
    for adapted in (layers.self_attn.k_proj, layers.mlp.gate_proj, layers.mlp.down_proj):  # Q2_K, Q4_K, Q5_0
        assert isinstance(adapted, qalora.QALoRALinear)
    only_fixed = qalora.load_gguf(path).model
    with pytest.raises(qalora.NoTargetModulesError, match="fixed_offset_layers"):
        qalora.wrap(only_fixed, qalora.QALoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    # refused before anything changed: no adapter, no config, the same layers
    assert not any(isinstance(m, qalora.QALoRALinear) for m in only_fixed.modules())
    assert qalora.state_of(only_fixed).config is None
    with pytest.warns(qalora.QALoRAWarning, match="fixed_offset_layers"):
        qalora.wrap(only_fixed, qalora.QALoRAConfig(rank=4))  # and it can still be wrapped
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=64, rank=4, fixed_offset_layers="adapt"))
    for name, layer in quantized_layers(model, qalora.QALoRALinear):
        packed, bits, g = before[name]
        assert layer.base_layer.bits == bits and layer.base_layer.group_size == g  # not re-quantized
        assert torch.equal(layer.base_layer.packed, packed)
        assert layer.lora_A.in_features == layer.in_features // g  # pools over the layer's groups
    assert isinstance(model.lm_head, qalora.QuantLinear)  # the output head is not adapted
    assert qalora.state_of(model).source["format"] == "gguf"  # wrap keeps where the model came from
    # F16 / BF16 layers of the file are dense: the config quantizes them
    model = qalora.load_gguf(legacy[0]).model
    qalora.wrap(model, qalora.QALoRAConfig(bits=3, group_size=64, rank=4))
    o = model.model.layers[0].self_attn.o_proj.base_layer
    assert (o.bits, o.group_size) == (3, 64)
    x = torch.randn(2, 5, 256)
    q = model.model.layers[0].self_attn.q_proj
    random_update(model)
    with torch.no_grad():
        unmerged = q(x)
        merged = q.merged(torch.float32)(x)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < 1e-5  # exact merge in each layer's groups


# --------------------------------------------------------------------------- export


def export_then_import(model, path, **kw):
    report = qalora.export_gguf(model, path, **kw)
    return report, qalora.load_gguf(path).model


def assert_same_layers(a, b, names=None):
    la, lb = dict(quantized_layers(a)), dict(quantized_layers(b))
    for name in names or la:
        for key in ("packed", "scales", "offsets"):
            x, y = getattr(la[name], key), getattr(lb[name], key)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, key)


def test_export_untouched_copies_every_tensor(legacy, tmp_path):
    path, _ = legacy
    model = qalora.load_gguf(path).model
    out = tmp_path / "copy.gguf"
    report = qalora.export_gguf(model, out)
    assert report.count("copied") == len(report.tensors) == len(read_header(path).tensors)
    a, b = read_header(path), read_header(out)
    assert list(a.tensors) == list(b.tensors) and a.metadata == b.metadata
    with TensorReader(path) as ra, TensorReader(out) as rb:
        for name in a.tensors:
            assert np.array_equal(ra.raw(a.tensors[name]), rb.raw(b.tensors[name])), name
    assert open_bytes(out) == open_bytes(path)  # the whole file, metadata layout included


def test_export_merged_model_legacy_types(legacy, tmp_path):
    path, spec = legacy
    model = qalora.load_gguf(path).model
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4))
    random_update(model)
    qalora.merge(model)
    report, back = export_then_import(model, tmp_path / "merged.gguf")
    by_name = {t.name: t for t in report.tensors}
    assert by_name["blk.0.attn_q.weight"].how == "exact" and by_name["blk.0.attn_q.weight"].type == "Q4_1"
    assert by_name["blk.0.attn_k.weight"].type == "Q4_1"  # Q4_0 base + merged offsets: now Q4_1
    assert by_name["blk.0.attn_output.weight"].type == "Q4_1"  # F16 in the file, quantized by wrap
    assert by_name["output.weight"].how == "copied"  # the head did not change
    assert by_name["token_embd.weight"].how == "copied"
    assert by_name["blk.0.attn_norm.weight"].how == "copied"
    assert by_name["blk.0.attn_q.weight"].max_abs_error == 0.0
    # Q4_1-exported layers come back bit for bit (float16 scales and offsets, same codes)
    exact = [n for n, m in quantized_layers(model) if by_name[gguf_arch.gguf_name(n + ".weight")].how == "exact"]
    assert len(exact) >= 2 * 5
    assert_same_layers(model, back, exact)
    ids = torch.randint(3, spec.vocab, (1, 10), generator=torch.Generator().manual_seed(1))
    directory, name = os.path.split(tmp_path / "merged.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # every layer written exactly: float32 rounding only
    v = by_name["blk.0.attn_v.weight"]  # 5-bit codes (a Q5_1 base): written back as Q5_1
    assert (v.type, v.how) == ("Q5_1", "exact")


def test_export_kquant_model_reports_rounding_and_conversions(mixed, tmp_path):
    path, _ = mixed
    model = qalora.load_gguf(path).model
    torch.manual_seed(0)  # lora_A's initialization
    qalora.wrap(model, qalora.QALoRAConfig(rank=4, fixed_offset_layers="adapt"))
    random_update(model, std=0.002)
    unmerged = copy.deepcopy(model)
    qalora.merge(model)
    # Written from the unmerged model (as it would be merged): the fit happens in the export.
    report, back = export_then_import(unmerged, tmp_path / "k.gguf", other_type="f16")
    by_name = {t.name: t for t in report.tensors}
    # Q2_K / Q4_K / Q5_K layers go back to their own type: codes as they are, the merged
    # offsets fitted onto the grid of float16 dmin times 6-bit (Q2_K: 4-bit) integers.
    for name, kind, module in (
        ("blk.0.attn_k.weight", "Q2_K", "self_attn.k_proj"),
        ("blk.0.attn_output.weight", "Q5_K", "self_attn.o_proj"),
        ("blk.0.ffn_gate.weight", "Q4_K", "mlp.gate_proj"),
    ):
        t = by_name[name]
        assert (t.type, t.how) == (kind, "fitted"), name
        assert 0 < t.rel_error < (0.05 if kind == "Q2_K" else 5e-3), (name, t.rel_error)
        assert 0 < t.offset_change_steps < 100, (name, t.offset_change_steps)  # bounded: test_gguf_blocks
        # what was written is what the report describes, and the codes did not change
        la = unmerged.get_submodule(f"model.layers.0.{module}").merged()
        lb = back.get_submodule(f"model.layers.0.{module}")
        assert torch.equal(lb.packed, la.packed)
        wa, wb = la.dequantize().double(), lb.dequantize().double()
        assert abs(((wb - wa).norm() / wa.norm()).item() - t.rel_error) < 1e-6
        assert abs((wb - wa).abs().max().item() - t.max_abs_error) < 1e-9
        # qalora.merge stores the same fit: the merged model is the file
        lm = model.get_submodule(f"model.layers.0.{module}")
        assert torch.equal(lm.scales, lb.scales) and torch.equal(lm.offsets, lb.offsets)
    q6 = by_name["blk.0.attn_v.weight"]  # Q6_K: 6-bit codes in groups of 16, offset fixed by the scale
    assert q6.type == "F16" and q6.how == "converted" and 0 < q6.rel_error < 1e-3
    down = by_name["blk.0.ffn_down.weight"]  # Q5_0 + merged offsets: Q5_1 holds them exactly
    assert (down.type, down.how) == ("Q5_1", "exact")
    assert "fitted to their grid" in report.summary()
    assert qalora.state_of(model).merge_rounding["grid_layers"] == 6  # Q2_K, Q5_K, Q4_K in 2 blocks
    report2 = qalora.export_gguf(model, tmp_path / "k2.gguf", other_type="f16")
    assert {t.name: t.how for t in report2.tensors}["blk.0.ffn_gate.weight"] == "exact"
    assert (tmp_path / "k2.gguf").read_bytes() == (tmp_path / "k.gguf").read_bytes()


def test_kquant_export_of_an_unchanged_layer_is_exact(mixed, tmp_path):
    """A K-quant layer whose values did not change, re-encoded, lands on its own grid again:
    zero error, and the decoded scales and offsets of the source. (Its bytes equal the
    source's where the sub-block integers reach the top of their range, as ggml's quantizer
    makes them; this file's random blocks do not always; see test_gguf_smollm2 for a file
    llama.cpp quantized.)"""
    path, _ = mixed
    model = qalora.load_gguf(path).model
    layer = model.model.layers[1].mlp.gate_proj  # Q4_K
    entry = gguf_export._Item("blk.1.ffn_gate.weight", (layer.in_features, layer.out_features), layer=layer)
    errors = gguf_export._Errors()
    raw = np.concatenate([c.reshape(-1) for c in gguf_export._encode(entry, gguf_blocks.Q4_K, errors)])
    with TensorReader(path) as reader:
        source = reader.raw(read_header(path).tensors["blk.1.ffn_gate.weight"])
    assert errors.diff2 == 0.0 and errors.offset_steps == 0.0 and errors.param == 0.0
    k = layer.in_features
    mine = gguf_blocks.decode_rows(gguf_blocks.Q4_K, raw.reshape(layer.out_features, -1), k)
    theirs = gguf_blocks.decode_rows(gguf_blocks.Q4_K, source.reshape(layer.out_features, -1), k)
    for key in ("codes", "scales", "offsets"):
        assert np.array_equal(getattr(mine, key), getattr(theirs, key)), key


def test_export_options_and_refusals(legacy, tmp_path):
    path, _ = legacy
    model = qalora.load_gguf(path).model
    with pytest.raises(qalora.FormatError, match="other_type"):
        qalora.export_gguf(model, tmp_path / "x.gguf", other_type="q4_k")
    lora = qalora.load_gguf(path).model
    qalora.wrap(lora, qalora.QALoRAConfig(adapter="lora", rank=2))
    with pytest.raises(qalora.MergeError, match="merge_requantize"):
        qalora.export_gguf(lora, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    # an unmerged QA-LoRA model is written as it would be merged, and is not changed itself
    wrapped = qalora.load_gguf(path).model
    qalora.wrap(wrapped, qalora.QALoRAConfig(rank=2))
    random_update(wrapped)
    report = qalora.export_gguf(wrapped, tmp_path / "unmerged.gguf")
    assert report.count("exact") > 0 and any(isinstance(m, qalora.QALoRALinear) for m in wrapped.modules())
    merged = qalora.merge(wrapped)
    report2 = qalora.export_gguf(merged, tmp_path / "merged.gguf")
    assert (tmp_path / "unmerged.gguf").read_bytes() == (tmp_path / "merged.gguf").read_bytes()
    assert [t.how for t in report.tensors] == [t.how for t in report2.tensors]


def test_export_refuses_a_changed_source_and_failure_leaves_no_file(legacy, tmp_path, monkeypatch):
    src = tmp_path / "src.gguf"
    src.write_bytes(open_bytes(legacy[0]))
    model = qalora.load_gguf(src).model
    os.utime(src, (1, 1))
    with pytest.raises(qalora.FormatError, match="has changed since"):
        qalora.export_gguf(model, tmp_path / "a.gguf")
    report = qalora.export_gguf(model, tmp_path / "a.gguf", source=src)
    assert report.count("copied") == len(report.tensors)
    from qalora.formats import gguf_export

    def boom(*a, **k):
        raise RuntimeError("disk full")

    qalora.wrap(model, qalora.QALoRAConfig(rank=2))
    random_update(model)
    monkeypatch.setattr(gguf_export.gguf_blocks, "encode_q4_1", boom)
    with pytest.raises(RuntimeError):
        qalora.export_gguf(model, tmp_path / "b.gguf", source=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "src.gguf"]  # no partial or temp file


def test_export_from_a_hugging_face_model(legacy, tmp_path):
    """A model that did not come from a GGUF file: metadata and tokenizer from its config."""
    path, spec = legacy
    directory, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    with pytest.raises(qalora.FormatError, match="tokenizer must be given"):
        qalora.export_gguf(hf, tmp_path / "x.gguf")
    qalora.wrap(hf, qalora.QALoRAConfig(rank=4))
    random_update(hf)
    qalora.merge(hf)
    out = tmp_path / "hf.gguf"
    report = qalora.export_gguf(hf, out, tokenizer=tok)
    assert report.source == "config" and report.count("copied") == 0
    a, b = read_header(path), read_header(out)
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "llama.block_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
    ):
        assert a.get(key) == b.get(key), key
    back = qalora.load_gguf(out).model
    layers = [n for n, _ in quantized_layers(hf)]
    assert_same_layers(hf, back, layers)
    ids = torch.randint(3, spec.vocab, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a_, b_ = hf(input_ids=ids).logits, back(input_ids=ids).logits
    assert ((a_ - b_).norm() / a_.norm()).item() < 1e-2  # embeddings and head went to Q8_0
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(qalora.FormatError, match="type 'gpt2'"):
        qalora.export_gguf(gpt2, tmp_path / "g.gguf", tokenizer=tok)


def test_export_command_and_check_exportable(mixed, legacy, tmp_path, capsys):
    from qalora.cli import main
    from qalora.formats.gguf_export import check_exportable

    # Untouched, every type comes back as the same file (the mixed file holds every K-quant).
    for source in (mixed[0], legacy[0]):
        same = tmp_path / "same" / os.path.basename(source)
        same.parent.mkdir(exist_ok=True)
        assert main(["export", "--model", source, "--out", str(same)]) == 0
        assert open_bytes(same) == open_bytes(source), source
    path, _ = legacy
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", path, "--out", str(out), "--other-type", "f16"]) == 0
    printed = capsys.readouterr().out
    assert f"llama-cli -m {out}" in printed and "Modelfile" in printed
    assert open_bytes(out) == open_bytes(path)  # an untouched model is written back as the same file
    assert (tmp_path / "Modelfile").read_text() == "FROM ./cli.gguf\n"
    assert '"copied"' in (tmp_path / "cli.gguf.report.json").read_text()
    # A second export into the same folder: the Modelfile names the new file, never the old.
    out2 = tmp_path / "second.gguf"
    assert main(["export", "--model", path, "--out", str(out2)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "Modelfile").read_text() == "FROM ./second.gguf\n"
    assert "Modelfile beside it says FROM ./second.gguf" in printed and "ollama create" in printed
    # A Modelfile the user wrote is kept; the export writes its own beside it and says which.
    (tmp_path / "Modelfile").write_text("FROM ./second.gguf\nPARAMETER temperature 0.2\n")
    out3 = tmp_path / "third.gguf"
    assert main(["export", "--model", path, "--out", str(out3)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "Modelfile").read_text().endswith("temperature 0.2\n")
    assert (tmp_path / "third.Modelfile").read_text() == "FROM ./third.gguf\n"
    assert "-f third.Modelfile" in printed and "llama_cpp import Llama" in printed
    assert main(["export", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "y.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(qalora.FormatError, match="type 'gpt2'"):
        check_exportable(gpt2, None)
    check_exportable(qalora.load_gguf(path).model)  # a GGUF model needs no tokenizer


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantized_embedding_keeps_the_table_as_the_file_holds_it(tmp_path, tied):
    """load_gguf(quantized_embedding=True): a quantized token_embd becomes a QuantEmbedding
    holding the file's codes (a tied head shares them), looks rows up exactly as the dense
    import does, trains, and exports back byte for byte."""
    path = tmp_path / "emb.gguf"
    types = {"default": "Q4_K", "token_embd": "Q4_K", "output": "Q6_K"}
    syn.write_synthetic_gguf(path, syn.SyntheticSpec(**{**SMALL, "tied": tied}, types=types), seed=7)
    dense = qalora.load_gguf(path).model
    lm = qalora.load_gguf(path, quantized_embedding=True)
    model = lm.model
    table = model.get_input_embeddings()
    assert isinstance(table, qalora.layers.QuantEmbedding) and (table.bits, table.group_size) == (4, 32)
    assert not any(p.numel() == SMALL["vocab"] * SMALL["hidden"] for p in model.parameters())  # no dense table
    if tied:
        assert isinstance(model.lm_head, qalora.QuantLinear) and model.lm_head.packed is table.packed
    ids = torch.randint(0, SMALL["vocab"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(table(ids), dense.get_input_embeddings()(ids))  # the same float32 rows
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    qalora.wrap(model, qalora.QALoRAConfig(rank=4))
    train.finetune(model, torch.randint(0, SMALL["vocab"], (4, 16)), 1, batch_size=2, show_progress=False)
    out = tmp_path / "same.gguf"
    report = qalora.export_gguf(model, out)
    assert {t.name: t.how for t in report.tensors}["token_embd.weight"] == "copied"
    untouched = qalora.load_gguf(path, quantized_embedding=True).model
    qalora.export_gguf(untouched, tmp_path / "untouched.gguf")
    assert open_bytes(tmp_path / "untouched.gguf") == open_bytes(path)


def test_merge_rounding_measures_a_zero_scale_group_in_its_rows_step(mixed):
    """A K-quant sub-block can have scale 0; the grid fit still moves its offset, which the
    merge report measures in the row's largest code step (not as an overflow of 0)."""
    path, _ = mixed
    model = qalora.load_gguf(path).model
    layer = model.model.layers[0].self_attn.k_proj  # Q2_K: 4-bit sub-scales, zeros among them
    assert bool((layer.scales == 0).any())
    torch.manual_seed(0)
    with pytest.warns(qalora.QALoRAWarning):
        qalora.wrap(model, qalora.QALoRAConfig(rank=4))
    random_update(model, std=0.002)
    qalora.merge(model)
    rounding = qalora.state_of(model).merge_rounding
    assert rounding["grid_layers"] > 0 and 0 < rounding["offset"] < 100


def test_load_gguf_refuses_non_bool_flags(legacy):
    for flag in ("quantized_embedding", "allow_nonfinite"):
        with pytest.raises(qalora.ConfigError, match=f"{flag}: got 'yes', it must be True or False"):
            qalora.load_gguf(legacy[0], **{flag: "yes"})
    with pytest.raises(qalora.ConfigError, match="fixed_offset_layers: got 'always', allowed: 'skip', 'adapt'"):
        qalora.QALoRAConfig(fixed_offset_layers="always")
