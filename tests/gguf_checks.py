"""Checks the GGUF tests share: a random update of a wrapped model's adapters, and llama.cpp
(through llama-cpp-python; skipped where it is not installed) as an outside judge of a file:
its logits on token blocks, and how often its greedy next tokens agree with a reference."""

from __future__ import annotations

import numpy as np
import pytest
import qalora
import torch


def random_update(model, seed=0, std=0.02):
    """Random lora_B weights (seeded) on every QA-LoRA layer: a merge then changes the model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, qalora.QALoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def llama(path, n_ctx=128, n_threads=2, **kw):
    # verbose=True: llama.cpp logs to stderr (pytest captures it); the quiet mode leaks file handles.
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI installs it)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=True, n_threads=n_threads, seed=0, **kw)


def llama_cpp_logits(path, blocks, **kw) -> np.ndarray:
    """llama.cpp's logits at every position of each block (num, length, vocab)."""
    llm = llama(path, logits_all=True, **kw)
    try:
        out = []
        for b in blocks:
            llm.reset()
            llm.eval(b.tolist())
            out.append(np.array(llm.scores[: len(b)], dtype=np.float32))  # a copy: the buffer is reused
        return np.stack(out)
    finally:
        llm.close()


def agreement(cpp, ref):
    """(share of positions with the same greedy next token, relative logit difference)."""
    return float((cpp.argmax(-1) == ref.argmax(-1)).mean()), float(np.linalg.norm(cpp - ref) / np.linalg.norm(ref))
