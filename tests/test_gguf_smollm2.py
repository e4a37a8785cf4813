"""GGUF in and out on the real SmolLM2-135M-Instruct file (Q4_1 layers, a Q8_0 embedding),
checked by outside readers: the gguf package, transformers' GGUF loader, and llama.cpp
(through llama-cpp-python; those tests skip where it is not installed, CI installs it)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import qalora
import torch
from qalora import datasets, train
from qalora.formats.gguf_file import TensorReader, read_header
from qalora.targets import quantized_layers

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
try:
    from qalora.loaders import bundled_gguf_path

    SMOLLM2 = bundled_gguf_path()
except qalora.ModelLoadError as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf_checks import agreement, llama, llama_cpp_logits  # noqa: E402


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI installs it)")


@pytest.fixture(scope="module")
def original():
    return qalora.load_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def blocks(original):
    ds = datasets.bundled_dataset()
    tok = original.tokenizer
    return datasets.token_blocks(tok, ds.train, 32, max_blocks=4), datasets.token_blocks(
        tok, ds.heldout, 64, max_blocks=8
    )


@pytest.fixture(scope="module")
def reference():
    """transformers' own reading of the original file (dequantized float32 weights)."""
    directory, name = os.path.split(SMOLLM2)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def finetuned(original, blocks, tmp_path_factory):
    """SmolLM2 fine-tuned with QA-LoRA (a few steps), merged (float16 offsets), exported."""
    model = copy.deepcopy(original.model)
    qalora.wrap(model, qalora.QALoRAConfig(rank=8, alpha=16))
    train.finetune(model, blocks[0], 2, batch_size=2, lr=5e-3, show_progress=False)
    qalora.merge(model)
    model.eval()
    path = tmp_path_factory.mktemp("export") / "model.gguf"
    report = qalora.export_gguf(model, path)
    return model, str(path), report


def test_untouched_import_export_is_byte_identical(original, tmp_path):
    out = tmp_path / "same.gguf"
    report = qalora.export_gguf(original.model, out)
    assert report.count("copied") == 272
    a, b = read_header(SMOLLM2), read_header(out)
    assert a.metadata == b.metadata and list(a.tensors) == list(b.tensors)
    with TensorReader(SMOLLM2) as ra, TensorReader(out) as rb:
        for name in a.tensors:
            assert a.tensors[name].ggml_type == b.tensors[name].ggml_type
            assert np.array_equal(ra.raw(a.tensors[name]), rb.raw(b.tensors[name])), name
    with open(SMOLLM2, "rb") as fa, open(out, "rb") as fb:
        assert fa.read() == fb.read()  # the whole file, metadata layout included


def test_finetuned_export_reimports_bit_identical(original, finetuned):
    model, path, report = finetuned
    assert report.count("exact") == 210 and report.count("copied") == 62  # embeddings and norms unchanged
    assert report.max_param_rel_change == 0.0 and report.max_rel_error == 0.0
    back = qalora.load_gguf(path).model
    changed = 0
    for (name, a), (_, b), (_, o) in zip(
        quantized_layers(model), quantized_layers(back), quantized_layers(original.model)
    ):
        for key in ("packed", "scales", "offsets"):
            x, y = getattr(a, key), getattr(b, key)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, key)
        changed += not torch.equal(a.offsets, o.offsets)
    assert changed == 210  # training moved every layer's offsets


def test_transformers_reads_the_export(finetuned, blocks):
    model, path, _ = finetuned
    directory, name = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = blocks[1][:2]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 summation order only


def _llama_cpp_argmax(path, blocks):
    return llama_cpp_logits(path, blocks).argmax(-1)


def _logits(model, blocks):
    with torch.no_grad():
        return model(input_ids=blocks).logits.numpy()


def _argmax(model, blocks):
    return _logits(model, blocks).argmax(-1)


def test_llama_cpp_runs_the_export_as_qalora_does(finetuned, blocks, reference):
    """llama.cpp rounds activations to 8 bits, so it differs from any float32 reader; the
    original file calibrates by how much (against transformers). The export must fare as well
    against qalora: the logits differ no more (up to 25%), and greedy next tokens over 8 x 64
    held-out positions agree about as often, up to three percentage points (15 positions): the
    count hinges on near-ties, and two float32 GEMM orderings of the same fine-tuning (the same
    exact arithmetic, rounded differently) were measured to move it by 1.6 points, 0.947 vs 0.932
    against the original's 0.943, with the logit difference steady at 0.033."""
    llama_cpp_or_skip()
    model, path, _ = finetuned
    heldout = blocks[1]
    base_agree, base_rel = agreement(llama_cpp_logits(SMOLLM2, heldout), _logits(reference, heldout))
    exp_agree, exp_rel = agreement(llama_cpp_logits(path, heldout), _logits(model, heldout))
    print(
        f"llama.cpp vs float32: original file vs transformers: greedy agreement {base_agree:.4f}, logits rel diff "
        f"{base_rel:.4f}; export vs qalora: {exp_agree:.4f}, {exp_rel:.4f}"
    )
    assert base_agree > 0.8
    assert exp_agree >= base_agree - 0.03
    assert exp_rel <= 1.25 * base_rel
    assert (_argmax(model, heldout) != _argmax(reference, heldout)).any()  # the export is not the original


TEXTS = ("To be, or not to be", "ROMEO. O, she doth teach the torches to burn bright!", "x = 12345 + 67;\n\tdone")


def digit_splitting(tokenizer):
    """The same vocabulary with single digits split off before the byte-level regex."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]],
    }
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **special)


def test_llama_cpp_reads_an_export_written_from_a_hugging_face_model(original, blocks, tmp_path):
    """No GGUF source: metadata and tokenizer written from the config and tokenizer."""
    llama_cpp_or_skip()
    model = qalora.load_model(dense=True).model
    qalora.state_of(model).source = {}  # forget the file: a plain Hugging Face model
    qalora.wrap(model, qalora.QALoRAConfig(rank=4))
    qalora.merge(model)
    for tok, pre in ((original.tokenizer, "gpt-2"), (digit_splitting(original.tokenizer), "smollm")):
        out = tmp_path / f"from_hf_{pre}.gguf"
        report = qalora.export_gguf(model, out, tokenizer=tok)
        assert report.source == "config" and report.count("exact") == 210
        a, b = read_header(SMOLLM2), read_header(out)
        assert b.get("tokenizer.ggml.pre") == pre
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            assert a.get(key) == b.get(key), key
        llm = llama(out)
        try:
            for text in TEXTS:
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids, (pre, text)
        finally:
            llm.close()
    assert b.get("tokenizer.chat_template") is None  # the second tokenizer was built without one
    heldout = blocks[1][:4]
    assert (_llama_cpp_argmax(out, heldout) == _argmax(model, heldout)).mean() > 0.8


def test_export_of_every_trained_group_parameter_is_exact_and_runs_in_llama_cpp(original, blocks, reference, tmp_path):
    """A fine-tune that trains scales, offsets, norms and the pooled adapter, merged: every
    quantized layer is written exactly as Q4_1 (the gguf package decodes the very weights
    qalora computes with), the trained norms as F32 bit for bit, and llama.cpp runs it as
    closely to qalora as it runs the original file to transformers."""
    llama_cpp_or_skip()
    model = copy.deepcopy(original.model)
    qalora.wrap(
        model,
        qalora.QALoRAConfig(
            rank=4,
            alpha=8,
            train_scales=True,
            train_offsets=True,
            train_norms=True,
            offset_lr_scale=10,
            scale_lr_scale=10,
        ),
    )
    train.finetune(model, blocks[0], 2, batch_size=2, lr=5e-3, show_progress=False)
    qalora.merge(model)
    model.eval()
    path = tmp_path / "trained.gguf"
    report = qalora.export_gguf(model, path)
    by_name = {t.name: t for t in report.tensors}
    assert report.count("exact") == 210
    reader = gguf.GGUFReader(str(path))
    written = {t.name: t for t in reader.tensors}
    norm = model.model.layers[3].input_layernorm.weight.detach()
    assert not torch.equal(norm, torch.ones_like(norm))  # it trained
    t = written["blk.3.attn_norm.weight"]
    assert by_name["blk.3.attn_norm.weight"].type == "F32"
    assert np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(-1), norm.numpy())
    layer = model.model.layers[3].mlp.down_proj  # no rope permutation: rows as written
    t = written["blk.3.ffn_down.weight"]
    decoded = gguf_dequantize(t.data, t.tensor_type).reshape(layer.out_features, layer.in_features)
    assert np.array_equal(decoded, layer.dequantize().numpy())
    heldout = blocks[1][:4]
    _, base_rel = agreement(llama_cpp_logits(SMOLLM2, heldout), _logits(reference, heldout))
    agree, rel = agreement(llama_cpp_logits(path, heldout), _logits(model, heldout))
    # The logits criterion is the robust one (greedy agreement over 256 positions hinges on
    # near-ties, and this fine-tune moves the model far in two steps): llama.cpp's 8-bit
    # activations differ from float32 about as much as on the original (a tensor written wrong
    # would differ by the order of the logits themselves).
    assert rel <= 2 * base_rel and agree > 0.75


def test_compare_with_gguf_scores_every_deployed_file_in_llama_cpp(tmp_path, monkeypatch):
    """``qalora compare --gguf`` on SmolLM2 (one step each, to keep it short): the exact
    method's merged model exported and scored by llama.cpp, the dense-LoRA baseline quantized
    by llama.cpp itself to Q4_1 and Q4_K_M and scored there; the files' bits per weight."""
    llama_cpp_or_skip()
    from qalora.cli import main

    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "cmp"
    argv = ["compare", "--out", str(out), "--settings", "4:32", "--quantizers", "rtn", "--steps", "1"]
    argv += ["--eval-blocks", "1", "--batch-size", "1", "--block-size", "64", "--calibration-blocks", "1"]
    assert main([*argv, "--methods", "qalora+offsets", "--gguf"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    exported = rows["qalora+offsets, merged, exported GGUF (llama.cpp)"]
    assert (exported["deployed"], exported["exact"]) == (True, True)
    assert exported["gguf_bits"] == pytest.approx(5.0)  # Q4_1: 4-bit codes + float16 d and m per 32
    # llama.cpp rounds activations to 8 bits: its perplexity is near, not equal to, qalora's
    merged = rows["qalora+offsets, merged"]["heldout_ppl"]
    assert exported["heldout_ppl"] == pytest.approx(merged, rel=0.1)
    for name, bits in (("Q4_1", 5.0), ("Q4_K_M", None)):
        row = rows[f"dense LoRA, merged + quantized by llama.cpp to {name}"]
        assert (row["deployed"], row["exact"]) == (True, False) and row["heldout_ppl"] > 1
        if bits is not None:
            assert row["gguf_bits"] == pytest.approx(bits)
        else:
            assert 4.5 < row["gguf_bits"] < 6.0
    assert not list(tmp_path.glob("*.gguf-work"))  # the scratch files are gone


# --------------------------------------------------------------------------- a Q4_K_M file


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    """SmolLM2 as llama.cpp's quantizer writes Q4_K_M. Its rows of 576 weights are no
    multiple of 256, so llama.cpp gives those tensors its fallback types (Q5_0 for Q4_K,
    Q8_0 for Q6_K); the 1536-wide ffn_down tensors are Q4_K / Q6_K."""
    llama_cpp_or_skip()
    from qalora.formats import llama_cpp_eval

    path = tmp_path_factory.mktemp("q4km") / "smollm2-q4_k_m.gguf"
    llama_cpp_eval.quantize(SMOLLM2, str(path), "Q4_K_M", allow_requantize=True)
    return str(path)


def test_q4_k_m_import_exports_back_to_its_own_types(q4_k_m, blocks, tmp_path):
    """A Q4_K_M import, fine-tuned with the default config and merged, goes back out in the
    file's own types and at its size (plus what the reported type changes add), and
    llama.cpp's perplexity of the export is within 1% of qalora's on the merged model."""
    from qalora.formats import gguf_blocks, gguf_export, llama_cpp_eval

    header = read_header(q4_k_m)
    kinds = {e.name: gguf_blocks.type_name(e.ggml_type) for e in header.tensors.values()}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(kinds.values())
    # Untouched, the file comes back byte for byte (`qalora export --model X.gguf`).
    untouched = qalora.load_gguf(q4_k_m)
    same = tmp_path / "same.gguf"
    qalora.export_gguf(untouched.model, same)
    with open(q4_k_m, "rb") as f:
        assert same.read_bytes() == f.read()
    # A Q4_K layer re-encoded without a change lands on llama.cpp's own bytes.
    name = next(n for n, k in kinds.items() if k == "Q4_K")
    layer = dict(quantized_layers(untouched.model))[qalora.formats.gguf_arch.hf_name(name).rpartition(".")[0]]
    item = gguf_export._Item(name, (layer.in_features, layer.out_features), layer=layer)
    errors = gguf_export._Errors()
    raw = np.concatenate([c.reshape(-1) for c in gguf_export._encode(item, gguf_blocks.Q4_K, errors)])
    with TensorReader(q4_k_m) as reader:
        assert np.array_equal(raw, reader.raw(header.tensors[name]).reshape(-1))
    assert errors.diff2 == 0.0

    model = copy.deepcopy(untouched.model)
    torch.manual_seed(0)  # lora_A's initialization: the comparison below is of one fixed model
    with pytest.warns(qalora.QALoRAWarning, match="Q6_K/Q8_0"):  # attn_v (Q8_0), ffn_down (Q6_K): no adapter
        qalora.wrap(model, qalora.QALoRAConfig(rank=8, alpha=16))
    train.finetune(model, blocks[0], 2, batch_size=2, lr=5e-3, show_progress=False)
    qalora.merge(model)
    model.eval()
    out = tmp_path / "merged.gguf"
    report = qalora.export_gguf(model, out)
    written = {t.name: t for t in report.tensors}
    for t in report.tensors:
        if kinds[t.name] == "Q5_0" and t.how != "copied":
            assert (t.type, t.how) == ("Q5_1", "exact"), t  # Q5_0 + a merged offset: Q5_1 holds it
        else:
            assert t.type == kinds[t.name], t
    # qalora.merge put the Q4_K layers' offsets on their grid already: the export writes them
    # exactly, and the merge's rounding report holds the fit.
    k_layers = [t for t in report.tensors if t.type == "Q4_K"]
    assert k_layers and all(t.how == "exact" for t in k_layers)
    rounding = qalora.state_of(model).merge_rounding
    assert rounding["grid_layers"] == len(k_layers) and 0 < rounding["offset"] < 1
    assert all(written[n].how == "copied" for n, k in kinds.items() if k in ("Q6_K", "Q8_0", "F32"))
    assert report.type_changes() == {"Q5_0->Q5_1": sum(1 for t in report.tensors if t.type == "Q5_1")}
    size = os.path.getsize(out)
    assert size <= 1.02 * os.path.getsize(q4_k_m) + report.type_change_bytes
    heldout = blocks[1]
    ours = train.perplexity(model, heldout)
    theirs = llama_cpp_eval.perplexity(str(out), heldout)
    print(f"Q4_K_M import, merged: qalora {ours:.4f}, llama.cpp on the export {theirs:.4f}; {report.summary()}")
    assert abs(theirs / ours - 1) < 0.01
