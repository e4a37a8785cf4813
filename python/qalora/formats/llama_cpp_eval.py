"""llama.cpp as an outside judge of a GGUF file: its perplexity on token blocks and its own
quantizer (through llama-cpp-python, an optional dependency). ``qalora compare --gguf`` and
``benches/bench_gguf_deploy.py`` use these to evaluate what a user would deploy."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from ..errors import ConfigError, FormatError


def require():
    """llama_cpp, or a ConfigError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            "this needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp from source)"
        ) from None
    return llama_cpp


def open_model(path: str, threads: int = 2, **kw):
    llama_cpp = require()
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, verbose=False, seed=0, **kw)


def perplexity(path: str, blocks: torch.Tensor, threads: int = 2) -> float:
    """exp(mean next-token NLL) over every predicted token of ``blocks`` (num, length), from
    llama.cpp's logits: the same tokens and the same average as :func:`qalora.train.perplexity`."""
    if blocks.shape[-1] > 256:
        raise ConfigError(f"blocks of {blocks.shape[-1]} tokens: at most 256 fit the context this opens")
    llm = open_model(path, threads, logits_all=True)
    nll, count = 0.0, 0
    try:
        for ids in blocks.tolist():
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


#: llama.cpp's file types this module quantizes to, by the names llama.cpp's tools use.
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K")


def quantize(src: str, dst: str, type_name: str, threads: int = 2, allow_requantize: bool = False) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``): ``src`` (an F16/F32 GGUF; a
    quantized one with ``allow_requantize``) to ``dst`` at ``type_name`` (one of
    :data:`QUANT_TYPES`)."""
    llama_cpp = require()
    if type_name not in QUANT_TYPES:
        raise ConfigError(f"type_name: got {type_name!r}, allowed: {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.allow_requantize = bool(allow_requantize)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise FormatError(f"llama.cpp could not quantize {src} to {type_name} (llama_model_quantize returned {rc})")
