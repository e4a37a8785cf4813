"""The README's quick start runs as written (a user pastes it)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Quick start has no python block"
    return match.group(1)


def test_readme_quick_start_runs(tmp_path):
    pytest.importorskip("transformers")
    try:
        from qalora.loaders import bundled_gguf_path

        bundled_gguf_path()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(str(e))
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    r = subprocess.run(
        [sys.executable, "-c", quick_start_code()], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "trainable params" in r.stdout
    assert (tmp_path / "smollm2-qalora-4bit" / "model.safetensors").exists()
