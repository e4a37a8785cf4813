"""quantize_embeddings on the real SmolLM2-135M-Instruct (tied embedding / head, 49152 x 576):
held-out perplexity and model directory size with the option off and on, the saved model
reloaded with its tie, and the GGUF export (a Q4_1 token_embd.weight) read by llama.cpp."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import qalora
import torch
from qalora import datasets
from qalora.formats.gguf_file import read_header
from qalora.layers import QuantEmbedding
from qalora.train import perplexity

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
try:
    from qalora.loaders import bundled_gguf_path

    bundled_gguf_path()
except qalora.ModelLoadError as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    lm = qalora.load_model()  # the GGUF's 4-bit layers as they are; the embedding dense (file: Q8_0)
    ds = datasets.bundled_dataset()
    heldout = datasets.token_blocks(lm.tokenizer, ds.heldout, 64, max_blocks=8)
    root = tmp_path_factory.mktemp("smollm2_embed")
    out = {"heldout": heldout, "tokenizer": lm.tokenizer}
    for on in (False, True):
        model = copy.deepcopy(lm.model)
        qalora.wrap(model, qalora.QALoRAConfig(rank=4, quantize_embeddings=on))
        qalora.merge(model)  # zero adapters: the merged model is the base
        model.eval()
        directory = root / ("on" if on else "off")
        qalora.save_pretrained(model, directory, tokenizer=lm.tokenizer)
        out[on] = {
            "model": model,
            "ppl": perplexity(model, heldout, batch_size=4, show_progress=False),
            "dir": directory,
            "bytes": dir_bytes(directory),
            "memory": qalora.memory_bytes(model),
        }
    return out


def test_perplexity_and_size_on_vs_off(runs):
    off, on = runs[False], runs[True]
    change = on["ppl"] / off["ppl"] - 1
    mib = 1 << 20
    print(
        f"SmolLM2-135M, 4-bit g32 layers, held-out perplexity ({runs['heldout'].numel()} tokens): embedding dense "
        f"{off['ppl']:.3f}, quantized (4-bit g32, tied head shares it) {on['ppl']:.3f} ({100 * change:+.2f}%); "
        f"model directory {off['bytes'] / mib:.1f} MiB -> {on['bytes'] / mib:.1f} MiB; "
        f"memory {off['memory'] / mib:.1f} MiB -> {on['memory'] / mib:.1f} MiB"
    )
    assert isinstance(on["model"].get_input_embeddings(), QuantEmbedding)
    assert on["model"].lm_head.packed is on["model"].get_input_embeddings().packed
    # 49152 x 576 float32 (108 MiB) becomes 4-bit codes + float16 scales/offsets (16.9 MiB)
    assert off["bytes"] - on["bytes"] > 85 * mib
    # It costs something (SmolLM2's table is not on a 4-bit grid, and the tied table also
    # makes the logits): about +10% here, measured; the bound only catches a broken lookup.
    assert 0.0 < change < 0.25


def test_saved_model_reloads_tied_and_identical(runs):
    on = runs[True]
    back = qalora.from_pretrained(on["dir"])
    assert back.lm_head.packed is back.get_input_embeddings().packed
    ids = runs["heldout"][:2]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, on["model"](input_ids=ids).logits)


def test_gguf_export_writes_the_table_as_q4_1_and_llama_cpp_runs_it(runs, tmp_path):
    from qalora.formats import gguf_blocks

    on = runs[True]
    path = tmp_path / "embed_q4.gguf"
    report = qalora.export_gguf(on["model"], path)
    assert report.max_param_rel_change == 0.0 and report.max_rel_error == 0.0
    header = read_header(path)
    assert header.tensors["token_embd.weight"].ggml_type == gguf_blocks.Q4_1
    assert "output.weight" not in header.tensors  # the tied head reads token_embd
    back = qalora.load_gguf(path).model
    want = on["model"].get_input_embeddings().dequantize(torch.float32)
    got = back.get_input_embeddings()
    got = got.dequantize(torch.float32) if isinstance(got, QuantEmbedding) else got.weight.detach().float()
    assert torch.equal(got, want)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI installs it)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=True, n_threads=2, seed=0, logits_all=True)
    try:
        heldout = runs["heldout"][:4]
        agree = []
        for block in heldout:
            llm.reset()
            llm.eval(block.tolist())
            cpp = np.array(llm.scores[: len(block)], dtype=np.float32)
            with torch.no_grad():
                mine = on["model"](input_ids=block[None]).logits[0].numpy()
            agree.append((cpp.argmax(-1) == mine.argmax(-1)).mean())
    finally:
        llm.close()
    print(f"llama.cpp vs qalora on the export with a Q4_1 embedding: greedy agreement {np.mean(agree):.4f}")
    assert np.mean(agree) > 0.8
