"""The README's quick start runs as written (a user pastes it)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def section_code(heading: str) -> str:
    """The first python block after ``heading`` in the README."""
    text = README.read_text()
    section = text.split(heading + "\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README's {heading!r} has no python block"
    return match.group(1)


def quick_start_code() -> str:
    return section_code("## Quick start")


def _bundled_model_or_skip():
    try:
        from qalora.loaders import bundled_gguf_path

        bundled_gguf_path()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(str(e))


def test_readme_quick_start_runs(tmp_path):
    pytest.importorskip("transformers")
    _bundled_model_or_skip()
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    r = subprocess.run(
        [sys.executable, "-c", quick_start_code()], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "trainable params" in r.stdout
    # The printed training loss goes down (the mean of each printed window of steps).
    means = [float(line.rsplit(" ", 1)[1]) for line in r.stdout.splitlines() if "mean loss" in line]
    assert len(means) >= 2 and means[-1] < means[0], r.stdout
    # The saved directory stands on its own, in a fresh process, for the library and the CLI.
    saved = tmp_path / "smollm2-qalora-4bit"
    code = f"import qalora; m = qalora.from_pretrained({str(saved)!r}); print(type(m).__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "LlamaForCausalLM" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, "-m", "qalora", "eval", "--model", str(saved), "--eval-blocks", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_readme_trl_example_runs(tmp_path):
    """The README's "Training with TRL" as written, with 2 training steps instead of 30 (each
    takes tens of CPU-seconds on two cores)."""
    pytest.importorskip("trl")
    _bundled_model_or_skip()
    code = section_code("### Training with TRL")
    assert code.count("max_steps=30") == 1
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    r = subprocess.run(
        [sys.executable, "-c", code.replace("max_steps=30", "max_steps=2")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "sft-qalora-4bit.gguf" in r.stdout and "Q4_1" in r.stdout, r.stdout
    import qalora
    from qalora.targets import quantized_layers

    model = qalora.from_pretrained(tmp_path / "sft-qalora-4bit")
    assert not list(quantized_layers(model, qalora.QALoRALinear))  # saved merged
    assert len(list(quantized_layers(model))) == 210


def test_readme_peft_adapter_example_runs(tmp_path):
    """The README's "PEFT QA-LoRA adapters" as written, on a tiny GPTQ checkpoint and an
    adapter PEFT trained on it (pooling group 64 over quantization groups of 32)."""
    pytest.importorskip("peft")
    import qalora
    import torch
    from qalora.formats.gptq_checkpoint import load_gptq_model
    from qalora.targets import quantized_layers
    from test_gptq_format import write_hand_checkpoint
    from test_peft_adapters import _ids, peft_qalora
    from tiny_models import char_tokenizer

    gptq = tmp_path / "Llama-3.2-1B-Instruct-GPTQ"
    write_hand_checkpoint(gptq)
    char_tokenizer().save_pretrained(gptq)  # a checkpoint comes with its tokenizer
    peft_model = peft_qalora(load_gptq_model(gptq), tmp_path / "peft-qalora-adapter", pool=64)
    code = section_code("### PEFT QA-LoRA adapters")
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    r = subprocess.run(
        [sys.executable, "-c", "import qalora\n" + code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    merged = qalora.from_pretrained(tmp_path / "merged-4bit")
    assert len(list(quantized_layers(merged))) == 14
    assert not list(quantized_layers(merged, qalora.QALoRALinear))
    ids = _ids(5)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
