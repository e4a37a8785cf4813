"""GGUF in and out for every supported model family, on tiny synthetic files written the way
llama.cpp's converter writes each family: the import is exact against gguf.quants.dequantize,
its logits match transformers' own GGUF loader, an untouched export is the source file byte
for byte, a merged export re-imports bit for bit, and llama.cpp runs the export as qalora
runs the merged model (those tests skip where llama-cpp-python is not installed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import qalora
import torch
from qalora.formats import gguf_arch
from qalora.formats.gguf_file import read_header
from qalora.targets import quantized_layers

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
import gguf_synthetic as syn  # noqa: E402
from gguf_checks import agreement, llama_cpp_logits, random_update  # noqa: E402

#: Legacy types whose merged layers export exactly (float16 scales and offsets): Q4_1 and
#: Q5_1 stay, Q4_0 gains its offset as Q4_1.
TYPES = {"default": "Q4_1", "attn_v": "Q5_1", "ffn_down": "Q4_0", "token_embd": "Q8_0", "output": "Q8_0"}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
#: Each family as its converter writes it, shrunk: head dimensions other than hidden / heads
#: where the family has them (Qwen3, Gemma: 128 and 256, the configs' defaults).
FAMILIES = {
    "llama3": dict(arch="llama", hidden=256, heads=4, kv_heads=2, rope_freqs="llama3", rope_theta=5e5, tied=False),
    "llama3_tied": dict(arch="llama", hidden=256, heads=4, kv_heads=2, rope_freqs="llama3", rope_theta=5e5),
    "mistral": dict(arch="llama", name="Mistral-7B-Instruct-v0.3", hidden=256, heads=4, kv_heads=1, tied=False),
    "qwen2": dict(arch="qwen2", hidden=256, heads=4, kv_heads=2, rope_theta=1e6),  # Qwen2.5: q/k/v biases
    "qwen3": dict(arch="qwen3", hidden=128, heads=2, kv_heads=1, key_length=128, rope_theta=1e6),
    "phi3": dict(arch="phi3", hidden=256, heads=4, kv_heads=4, tied=False),
    "phi3_longrope": dict(
        arch="phi3", hidden=256, heads=4, kv_heads=4, tied=False, context=131072, longrope_original=4096
    ),
    "phi4_mini": dict(  # GQA, a tied head, LongRoPE over 3/4 of each head
        arch="phi3", hidden=256, heads=4, kv_heads=2, rope_dim=48, context=131072, longrope_original=4096
    ),
    "gemma2": dict(arch="gemma2", hidden=256, heads=2, kv_heads=1, key_length=256),
    "gemma3": dict(arch="gemma3", hidden=256, heads=2, kv_heads=1, key_length=256, rope_theta=1e6),
}


def spec_of(family: str, **kw) -> syn.SyntheticSpec:
    # attn_scale: attention peaked enough that a wrong query scale or rope shows in llama.cpp's
    # logits (measured: a 1.5x query scale moves them 0.2 relative, against 0.01-0.02 noise)
    base = {"layers": 2, "ffn": 512, "vocab": 300, "types": TYPES, "attn_scale": 4.0}
    return syn.SyntheticSpec(**{**base, **FAMILIES[family], **kw})


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, path, spec) of a synthetic file of each family."""
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    spec = syn.write_synthetic_gguf(path, spec_of(name), seed=len(name))
    return name, str(path), spec


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def transformers_model(path, family):
    """transformers' own reading of the file, with the rope scaling of the original model
    (transformers' GGUF reader ignores rope_freqs; Llama 3.1's config names llama3 scaling)."""
    directory, name = os.path.split(path)
    kw = {}
    if family.startswith("llama3"):
        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        config.rope_parameters = {**LLAMA3_ROPE, "rope_theta": 5e5}
        kw["config"] = config
    if family in ("phi3_longrope", "phi4_mini"):  # Phi-3.5's config: LongRoPE from the file's factors, by gguf-py
        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        reader = gguf.GGUFReader(path)
        factors = {t.name: [float(v) for v in t.data] for t in reader.tensors if t.name.startswith("rope_factors")}
        field = reader.fields["phi3.rope.scaling.attn_factor"]
        config.rope_parameters = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": factors["rope_factors_short.weight"],
            "long_factor": factors["rope_factors_long.weight"],
            "original_max_position_embeddings": 4096,
            "attention_factor": float(field.parts[field.data[0]][0]),
            "partial_rotary_factor": 0.75 if family == "phi4_mini" else 1.0,
        }
        kw["config"] = config
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, **kw
    ).eval()


def test_import_is_exact(family):
    _, path, spec = family
    model = qalora.load_gguf(path).model
    arch = gguf_arch.ARCHITECTURES[spec.arch]
    header = read_header(path)
    quantized = 0
    for tensor in header.tensors:
        hf = arch.hf_name(tensor)
        if hf is None:
            assert tensor in arch.auxiliary
            continue
        module = model.get_submodule(hf.rpartition(".")[0])
        ref = syn.gguf_reference(path, tensor, spec)
        if isinstance(module, qalora.QuantLinear) and tensor.endswith(".weight"):
            quantized += 1
            assert np.array_equal(module.dequantize(torch.float32).numpy(), ref), tensor
        else:
            value = model.get_parameter(hf).detach().numpy()
            assert np.array_equal(value.reshape(ref.shape), ref), tensor
    per_block = 4 if spec.arch == "phi3" else 7
    assert quantized == spec.layers * per_block + (not spec.tied)
    if spec.arch == "phi3":  # fused in the file and in the model: one tensor, one module
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.out_features == (spec.heads + 2 * spec.kv_heads) * spec.head_dim
        assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * spec.ffn
    if spec.arch in ("qwen3", "gemma2", "gemma3"):
        assert model.config.head_dim == spec.head_dim != spec.hidden // spec.heads
    if spec.arch.startswith("gemma"):  # stored +1: the model holds what its RMSNorm adds 1 to
        norm = model.model.layers[0].input_layernorm.weight
        assert norm.abs().mean() < 0.5


def test_logits_match_transformers(family):
    name, path, spec = family
    ours = qalora.load_gguf(path).model
    theirs = transformers_model(path, name)
    assert type(ours) is type(theirs)
    ids = torch.randint(3, spec.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 summation order only
    if spec.rope_freqs == "llama3":  # and the divisors mattered: transformers without them differs
        plain = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            c = plain(input_ids=ids).logits
        assert ((a - c).norm() / c.norm()).item() > 1e-5


def test_untouched_export_is_the_source_file(family, tmp_path):
    _, path, _ = family
    model = qalora.load_gguf(path).model
    out = tmp_path / "same.gguf"
    report = qalora.export_gguf(model, out)
    assert report.count("copied") == len(report.tensors) == len(read_header(path).tensors)
    assert open_bytes(out) == open_bytes(path)  # norms, fused tensors and rope_freqs included


def merged(path, seed=0):
    model = qalora.load_gguf(path).model
    torch.manual_seed(seed)  # lora_A's initialisation: the same merged model whatever ran before
    qalora.wrap(model, qalora.QALoRAConfig(rank=4))
    random_update(model, seed)
    return qalora.merge(model)


def test_merged_export_reimports_bit_identical(family, tmp_path):
    _, path, spec = family
    model = merged(path)
    norm = model.model.layers[1].input_layernorm.weight
    with torch.no_grad():
        norm.add_(0.25)  # a changed norm: written back in llama.cpp's convention
    out = tmp_path / "merged.gguf"
    report = qalora.export_gguf(model, out)
    how = {t.name: t.how for t in report.tensors}
    layers = list(quantized_layers(model))
    adapted = [n for n, _ in layers if n != "lm_head"]
    assert all(how[gguf_arch.ARCHITECTURES[spec.arch].gguf_name_of(n + ".weight")] == "exact" for n in adapted)
    assert how["blk.1.attn_norm.weight"] == "dense" and how["blk.0.attn_norm.weight"] == "copied"
    back = qalora.load_gguf(out).model
    for (n, a), (_, b) in zip(layers, quantized_layers(back)):
        for key in ("packed", "scales", "offsets"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (n, key)
    # float32 (w + 1) - 1 may round in the last place, nothing more
    assert torch.allclose(back.model.layers[1].input_layernorm.weight, norm, rtol=0, atol=1e-7)
    ids = torch.randint(3, spec.vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, back(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-6


def test_llama_cpp_runs_the_export_as_qalora_does(family, tmp_path):
    """llama.cpp rounds activations to 8 bits, so it differs from any float32 reader; the
    original file calibrates by how much (against qalora's import, which is exact). Over
    8 x 32 random-token positions the export must agree with the merged model about as often,
    within 4 points: the count hinges on near-ties (six seeds of the update, measured on
    4 x 24 positions, moved it by -6 to +4 positions of 96 across the families), and its
    logits differ no more (up to 50%)."""
    _, path, spec = family
    blocks = torch.randint(3, spec.vocab, (8, 32), generator=torch.Generator().manual_seed(2))
    original = qalora.load_gguf(path).model
    with torch.no_grad():
        base_ref = original(input_ids=blocks).logits.numpy()
    base = agreement(llama_cpp_logits(path, blocks, n_ctx=64, n_threads=1), base_ref)
    model = merged(path)
    out = tmp_path / "merged.gguf"
    qalora.export_gguf(model, out)
    with torch.no_grad():
        ref = model(input_ids=blocks).logits.numpy()
    export = agreement(llama_cpp_logits(out, blocks, n_ctx=64, n_threads=1), ref)
    print(f"llama.cpp vs qalora: original {base}, export {export}")
    assert base[0] > 0.8 and base[1] < 0.05
    assert export[0] >= base[0] - 0.04
    assert export[1] <= 1.5 * base[1]
    assert (ref.argmax(-1) != base_ref.argmax(-1)).any()  # the update changed the model


# --------------------------------------------------------------------------- refusals and checks


def test_mistral_named_file_is_read_as_mistral(tmp_path):
    """transformers' config calls a file named "mistral" a Mistral model (its weight loader
    cannot read such a file); qalora imports it as one, computing what the llama reading does."""
    a, b = tmp_path / "mistral.gguf", tmp_path / "llama.gguf"
    syn.write_synthetic_gguf(a, spec_of("mistral", name="mistral"), seed=3)
    syn.write_synthetic_gguf(b, spec_of("mistral"), seed=3)
    ma, mb = qalora.load_gguf(a).model, qalora.load_gguf(b).model
    assert type(ma).__name__ == "MistralForCausalLM" and type(mb).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ma(input_ids=ids).logits, mb(input_ids=ids).logits, rtol=0, atol=1e-6)
    out = tmp_path / "out.gguf"
    qalora.export_gguf(ma, out)
    assert open_bytes(out) == open_bytes(a)


def test_qwen3_head_dim_comes_from_the_file(tmp_path):
    """transformers' Qwen3 reader ignores attention.key_length (its config keeps 128); qalora
    takes the file's head dimension, as llama.cpp does."""
    path = tmp_path / "qwen3.gguf"
    spec = syn.write_synthetic_gguf(path, spec_of("qwen3", heads=4, key_length=64))
    model = qalora.load_gguf(path).model
    assert model.config.head_dim == 64 and model.model.layers[0].self_attn.q_proj.out_features == 256
    config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="qwen3.gguf")
    assert config.head_dim == 128  # what transformers alone would build
    config.head_dim = 64
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="qwen3.gguf", config=config, dtype=torch.float32
    ).eval()
    ids = torch.randint(3, spec.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "family, edit, fragment",
    [
        ("gemma3", dict(omit=("blk.1.attn_k_norm.weight",)), "'blk.1.attn_k_norm.weight' is missing"),
        ("qwen3", dict(omit=("blk.0.attn_q_norm.weight",)), "'blk.0.attn_q_norm.weight' is missing"),
        ("gemma2", dict(omit=("blk.0.post_ffw_norm.weight",)), "'blk.0.post_ffw_norm.weight' is missing"),
        ("phi3", dict(extra_tensors=(("blk.0.ffn_gate.weight", (256, 512), "Q4_1"),)), "has no place in a phi3"),
        ("phi3", dict(extra_tensors=(("rope_factors_long.weight", (32,), "F32"),)), "LongRoPE"),
        ("gemma2", dict(extra_tensors=(("rope_freqs.weight", (128,), "F32"),)), "has no place in a gemma2"),
        ("llama3", dict(extra_tensors=(("blk.0.attn_q_norm.weight", (64,), "F32"),)), "has no place in a llama"),
    ],
)
def test_each_family_is_checked_for_its_own_tensors(family, edit, fragment, tmp_path):
    path = tmp_path / "bad.gguf"
    syn.write_synthetic_gguf(path, spec_of(family, **edit))
    with pytest.raises(qalora.FormatError, match=fragment):
        qalora.load_gguf(path)


def test_phi3_fused_up_must_hold_gate_and_up(tmp_path):
    path = tmp_path / "phi3.gguf"
    spec = spec_of("phi3", omit=tuple(f"blk.{i}.ffn_up.weight" for i in range(2)))
    spec.extra_tensors = tuple((f"blk.{i}.ffn_up.weight", (256, 512), "Q4_1") for i in range(2))
    syn.write_synthetic_gguf(path, spec)
    with pytest.raises(qalora.FormatError, match=r"'blk.0.ffn_up.weight' has shape \(256, 512\).*\(256, 1024\)"):
        qalora.load_gguf(path)


@pytest.mark.parametrize("name", ["gemma", "falcon", "phi2", "qwen2moe", "command-r"])
def test_other_families_are_refused_by_name(name, tmp_path):
    src = tmp_path / "llama.gguf"
    syn.write_synthetic_gguf(src, spec_of("mistral", name="x"))
    from gguf_mutants import parse, serialize

    parsed = parse(src)
    for m in parsed.metadata:  # the architecture and its keys renamed
        if m[0] == "general.architecture":
            m[2] = name
        elif m[0].startswith("llama."):
            m[0] = name + m[0][len("llama") :]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(serialize(parsed))
    with pytest.raises(qalora.FormatError, match=rf"'{name}' is not supported.*gemma3 \(Gemma 3.*phi3 \(Phi-3"):
        qalora.load_gguf(path)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "phi3"])
def test_export_from_a_hugging_face_model(name, tmp_path):
    """No GGUF source: the metadata from the config (Qwen3's head dimension as key_length,
    Llama 3.1's rope scaling as rope_freqs), and llama.cpp computes what the model does."""
    path = tmp_path / f"{name}.gguf"
    spec = syn.write_synthetic_gguf(path, spec_of(name))
    hf = transformers_model(str(path), name)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    qalora.wrap(hf, qalora.QALoRAConfig(rank=4))
    random_update(hf)
    qalora.merge(hf)
    out = tmp_path / "from_hf.gguf"
    report = qalora.export_gguf(hf, out, tokenizer=tok)
    assert report.source == "config" and report.count("exact") == len(list(quantized_layers(hf))) > 0
    header = read_header(out)
    assert header.get(f"{spec.arch}.attention.key_length") == (spec.key_length if name == "qwen3" else None)
    if name == "llama3":  # the divisors the converter computes, first in the file
        assert next(iter(header.tensors)) == "rope_freqs.weight"
        written = syn.gguf_reference(out, "rope_freqs.weight", spec)
        assert np.allclose(written, syn.llama3_rope_freqs(spec), rtol=1e-6)
        back = qalora.load_gguf(out).model
        assert torch.allclose(back.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6)
    blocks = torch.randint(3, spec.vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=blocks).logits.numpy()
    agree, rel = agreement(llama_cpp_logits(out, blocks, n_ctx=64, n_threads=1), ref)
    assert agree > 0.8 and rel < 0.05


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_from_a_hugging_face_model_is_refused_by_name(name, tmp_path):
    path = tmp_path / f"{name}.gguf"
    syn.write_synthetic_gguf(path, spec_of(name))
    hf = transformers_model(str(path), name)
    with pytest.raises(qalora.FormatError, match=r"type 'gemma.*' cannot be written.*supported model types: llama"):
        qalora.export_gguf(hf, tmp_path / "x.gguf", tokenizer=object())


@pytest.mark.parametrize("name, blocks", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_attention_scale_and_soft_capping_as_llama_cpp_reads_them(name, blocks, tmp_path):
    """llama.cpp scales Gemma's queries by hidden / heads for its 27B block counts (46, 62),
    by the head dimension otherwise, and takes Gemma 2's soft-capping from the file;
    transformers' GGUF reader keeps its config class's defaults (256, 50, 30). (On random
    weights the attention scale barely moves the logits, so this checks the config.)"""
    path = tmp_path / f"{name}.gguf"
    extra = {"gemma2.attn_logit_softcapping": ("float32", 20.0)} if name == "gemma2" else {}
    spec = spec_of(name, hidden=64, heads=2, key_length=64, ffn=128, layers=blocks, extra_metadata=extra)
    syn.write_synthetic_gguf(path, spec)
    config = qalora.load_gguf(path).model.config
    assert config.query_pre_attn_scalar == 32  # hidden / heads, not the head dimension 64
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert theirs.query_pre_attn_scalar == 256
    if name == "gemma2":
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (20.0, 30.0)
        assert theirs.attn_logit_softcapping == 50.0
    small = tmp_path / "small.gguf"
    syn.write_synthetic_gguf(small, spec_of(name, hidden=64, heads=2, key_length=64, ffn=128, layers=4))
    assert qalora.load_gguf(small).model.config.query_pre_attn_scalar == 64


def test_gemma3_linear_rope_scaling_on_global_layers(tmp_path):
    """Gemma 3 4B and up: llama.cpp divides the global layers' rotary frequencies by the
    file's linear factor and leaves the sliding-window layers' alone; transformers' GGUF
    reader drops the scaling."""
    path = tmp_path / "gemma3.gguf"
    linear = {"gemma3.rope.scaling.type": ("string", "linear"), "gemma3.rope.scaling.factor": ("float32", 8.0)}
    spec = syn.write_synthetic_gguf(path, spec_of("gemma3", layers=6, extra_metadata=linear))
    model = qalora.load_gguf(path).model
    assert model.config.layer_types[5] == "full_attention"
    dim = spec.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    rotary = model.model.rotary_emb
    assert torch.allclose(rotary.full_attention_inv_freq, 1.0 / (1e6**steps) / 8, rtol=1e-6)
    assert torch.allclose(rotary.sliding_attention_inv_freq, 1.0 / (1e4**steps), rtol=1e-6)
    ids = torch.randint(3, spec.vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    agree, rel = agreement(llama_cpp_logits(path, ids, n_ctx=64, n_threads=1), ref)
    assert agree > 0.8 and rel < 0.05
    out = tmp_path / "out.gguf"
    qalora.export_gguf(model, out)
    assert open_bytes(out) == open_bytes(path)


@pytest.mark.parametrize(
    "name, metadata",
    [
        ("mistral", {"llama.rope.scaling.type": ("string", "linear"), "llama.rope.scaling.factor": ("float32", 4.0)}),
        ("mistral", {"llama.rope.scale_linear": ("float32", 4.0)}),  # older files: the factor alone
        ("qwen2", {"qwen2.rope.scaling.type": ("string", "linear"), "qwen2.rope.scaling.factor": ("float32", 4.0)}),
    ],
)
def test_linear_rope_scaling_divides_the_frequencies(name, metadata, tmp_path):
    """llama.cpp divides the rotary frequencies by a linear factor; transformers' GGUF readers
    skip the key, qalora puts it in the config."""
    path = tmp_path / f"{name}.gguf"
    spec = syn.write_synthetic_gguf(path, spec_of(name, extra_metadata=metadata))
    model = qalora.load_gguf(path).model
    steps = torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim
    expected = 1.0 / (spec.rope_theta**steps) / 4
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected, rtol=1e-6)
    ids = torch.randint(3, spec.vocab, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    agree, rel = agreement(llama_cpp_logits(path, ids, n_ctx=64, n_threads=1), ref)
    assert agree > 0.9 and rel < 0.05


@pytest.mark.parametrize(
    "name, kind", [("qwen2", "yarn"), ("qwen3", "yarn"), ("mistral", "yarn"), ("gemma2", "yarn"), ("phi3", "linear")]
)
def test_other_rope_scaling_is_refused_by_name(name, kind, tmp_path):
    """What neither transformers' model of the family nor qalora computes as llama.cpp does."""
    arch = FAMILIES[name]["arch"]
    path = tmp_path / f"{name}.gguf"
    scaling = {f"{arch}.rope.scaling.type": ("string", kind), f"{arch}.rope.scaling.factor": ("float32", 4.0)}
    syn.write_synthetic_gguf(path, spec_of(name, extra_metadata=scaling))
    with pytest.raises(qalora.FormatError, match=rf"rope\.scaling\.type = '{kind}' is not supported for {arch}"):
        qalora.load_gguf(path)
