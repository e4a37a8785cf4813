"""A whole quantized model as a self-contained directory: :func:`save_pretrained` /
:func:`from_pretrained` (see the package's docs for what the directory holds and how a load
checks it).
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from ..config import QALoRAConfig
from ..embeddings import tied_heads
from ..errors import AdapterMismatchError, CheckpointError, QALoRAWarning
from ..hf_skeleton import restore_from_source
from ..layers import QALoRALinear, QuantEmbedding, QuantLinear, scale_dtype_of
from ..state import QALoRAState, attach_state, config_of, require_state, state_of
from ..targets import dense_weight, linear_like_modules, quantized_layers, replace_module
from ..ties import storage_key
from ..untrusted import manifest, read_json_file, safe_file, scan_directory, verify_manifest
from ..wrapping import norm_parameters
from .adapters import _adapter_parameters
from .architecture import _assign_tensors, _build_architecture
from .directory import _checkpoint_dir, _old_manifest_files, _save_directory
from .safetensors_header import _check_declared, _load_tensors, _read_header
from .schema import (
    FORMAT_VERSION,
    GENERATION_CONFIG,
    MODEL_CONFIG,
    MODEL_FILES,
    MODEL_WEIGHTS,
    _layer_tensor_specs,
    _model_layer_metas,
    _validate_model_config,
    _version,
    factored_buffers,
)

# ---------------------------------------------------------------- saving


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (tied embeddings / LM head), as
    contiguous CPU tensors that share no memory, and {dropped name: kept name}."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages = set()
    for key, t in model.state_dict().items():
        ident = (*storage_key(t), tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.device)
        if t.numel() and storage in storages:
            t = t.clone()  # another view of a stored tensor's memory
        storages.add(storage)
        kept[key] = t
    return kept, tied


def _architecture_of(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_json_string"):
        return {"library": "transformers", "class": type(model).__name__}
    return None


def _remembered_tokenizer(model: nn.Module):
    """The tokenizer a loader recorded in the model's state (a directory), if still there."""
    state = state_of(model)
    path = state.source.get("tokenizer") if state is not None else None
    if not isinstance(path, str) or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        warnings.warn(
            f"could not reload the tokenizer from {path} ({e}); saving without it", QALoRAWarning, stacklevel=3
        )
        return None


def save_pretrained(model: nn.Module, directory, *, tokenizer=None) -> None:
    """Save the whole quantized model (merged or with adapters) as a self-contained directory.

    Writes ``model.safetensors`` (tied tensors once) and ``qalora_config.json`` (qalora's
    config, each quantized layer's layout, a manifest of every file with its size and
    SHA-256), and for a Hugging Face model its ``config.json`` (and
    ``generation_config.json``) plus the tokenizer files: those of ``tokenizer`` or, without
    it, of the tokenizer the model was loaded with through :func:`qalora.load_model`.
    Dense tensors (embeddings, norms, an unquantized head) are stored in the dtype the model
    holds them in.

    The directory is written beside ``directory`` and swapped in as a whole: a crash leaves
    the complete old or the complete new checkpoint. Files in an existing ``directory`` that
    are not part of a model checkpoint (an adapter saved there, say) are kept.

    Restore it with :func:`from_pretrained` (``from_pretrained(directory)`` alone for a
    Hugging Face model). Raises :class:`CheckpointError` if ``directory`` cannot be
    replaced (a file, or a directory holding subdirectories).
    """
    state = require_state(model)
    layers = _model_layer_metas(model)
    arch = _architecture_of(model)
    tok = tokenizer if tokenizer is not None else _remembered_tokenizer(model)
    tensors, tied = _unique_state(model)
    _table_first(tensors, tied, model)
    owned = set(MODEL_FILES) | _old_manifest_files(directory, MODEL_CONFIG)

    def write(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, MODEL_WEIGHTS), metadata={"format": "qalora"})
        if arch is not None:
            model.config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(model, "can_generate", lambda: False)():
                gen.save_pretrained(tmp)
        tokenizer_files: list[str] = []
        if tok is not None:
            before = set(os.listdir(tmp))
            tok.save_pretrained(tmp)
            tokenizer_files = sorted(set(os.listdir(tmp)) - before)
        source = dict(state.source)
        source.pop("tokenizer", None)  # a loader's local path: the saved copy replaces it
        data = {
            "format": "qalora",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config_of(model).to_dict(),
            "merged": state.merged,
            "skipped": list(state.skipped),
            "source": source,
            "architecture": arch,
            "tied": tied,
            "tokenizer_files": tokenizer_files,
            "layers": layers,
            "files": manifest(tmp),
        }
        with open(os.path.join(tmp, MODEL_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    _save_directory(directory, owned, write)


# ---------------------------------------------------------------- loading a model


def _build_layer(meta: dict, device) -> nn.Module:
    if meta["type"] == "QuantEmbedding":
        return QuantEmbedding(
            meta["out_features"],
            meta["in_features"],
            meta["bits"],
            meta["group_size"],
            scale_dtype_of(meta["scale_dtype"]),
            device,
            offset_dtype=scale_dtype_of(meta["offset_dtype"]),
            dtype=scale_dtype_of(meta["dtype"]),
            padding_idx=meta["padding_idx"],
        )
    base = QuantLinear(
        meta["in_features"],
        meta["out_features"],
        meta["bits"],
        meta["group_size"],
        meta["bias"],
        scale_dtype_of(meta["scale_dtype"]),
        device,
        offset_dtype=scale_dtype_of(meta["offset_dtype"]),
    )
    if "factored" in meta:
        base.factor_(*factored_buffers(meta, device))
    if meta["type"] == "QALoRALinear":
        return QALoRALinear(
            base,
            meta["rank"],
            meta["alpha"],
            0.0,
            meta["adapter"],
            train_scales=meta.get("train_scales", False),
            train_offsets=meta.get("train_offsets", False),
        )
    return base


def _layer_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Where a checkpoint's layers may go: the linear-like modules and the embeddings."""
    sites = dict(linear_like_modules(model))
    sites.update((n, m) for n, m in model.named_modules() if n and isinstance(m, (nn.Embedding, QuantEmbedding)))
    return sites


def _site_kind(meta: dict) -> str:
    return "token embedding" if meta["type"] == "QuantEmbedding" else "linear layer"


def _site(sites: dict[str, nn.Module], name: str, meta: dict) -> nn.Module | None:
    module = sites.get(name)
    is_table = isinstance(module, (nn.Embedding, QuantEmbedding))
    return module if module is not None and is_table == (meta["type"] == "QuantEmbedding") else None


def _fitting_site(sites: dict[str, nn.Module], name: str, meta: dict, error) -> nn.Module:
    """The module a checkpoint layer goes to, checked for kind and (in, out); ``error(msg)``
    makes the exception each caller raises (the one-argument form blames the file, the
    two-argument form the model)."""
    module = _site(sites, name, meta)
    if module is None:
        raise error(f"the model has no {_site_kind(meta)} there")
    out_f, in_f = _site_shape(module)
    if (in_f, out_f) != (meta["in_features"], meta["out_features"]):
        raise error(
            f"(in, out) = ({meta['in_features']}, {meta['out_features']}) in the checkpoint, ({in_f}, {out_f}) in the model"
        )
    return module


def _site_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer site; an embedding's (vocabulary, dimension)."""
    if isinstance(module, QuantEmbedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Embedding):
        return tuple(module.weight.shape)
    return tuple(dense_weight(module)[0].shape)


def _tie_heads(model: nn.Module, layers: dict[str, dict]) -> None:
    """Makes each head recorded as tied hold its embedding's tensors (the same objects)."""
    for name, meta in layers.items():
        if "tied_to" in meta:
            model.get_submodule(meta["tied_to"]).share_into(model.get_submodule(name))


def _table_first(tensors: dict[str, torch.Tensor], tied: dict[str, str], model: nn.Module) -> None:
    """Stores a tied head's codes under the embedding's name (where the loader looks)."""
    for head, table in tied_heads(model).items():
        for part in ("packed", "scales", "offsets"):
            h, t = f"{head}.{part}", f"{table}.{part}"
            if h in tensors and tied.get(t) == h:
                tensors[t] = tensors.pop(h)
                del tied[t]
                tied[h] = t


def _storage_groups(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """For each state-dict name, every name sharing its storage (tied weights such as the
    embeddings and LM head: a safetensors file holds only one of them)."""
    by_storage: dict[tuple, list] = {}
    for key, t in state.items():
        by_storage.setdefault(storage_key(t), []).append(key)
    return {key: names for names in by_storage.values() for key in names}


def _set_trainable(model: nn.Module, config: QALoRAConfig | None = None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in quantized_layers(model, QALoRALinear):
        for p in _adapter_parameters(layer).values():
            p.requires_grad_(True)
    if config is not None and config.train_norms and any(True for _ in quantized_layers(model, QALoRALinear)):
        for p in norm_parameters(model):
            p.requires_grad_(True)


def from_pretrained(directory, base_model: nn.Module | None = None, *, dropout: float | None = None) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`.

    ``from_pretrained(directory)`` rebuilds a Hugging Face model from the directory alone
    (its ``config.json``; parameters are created on the meta device and replaced by the
    checkpoint's tensors, so no dense random initialisation happens) and returns it in eval
    mode, bit-exact to the model saved. ``from_pretrained(directory, base_model)`` loads into
    a fresh instance of the same architecture (any ``nn.Module``; its weights are replaced).

    Every file is checked first (see the module docs): a refused load raises before
    ``base_model`` changes. ``dropout`` sets the adapters' dropout for further training.

    Raises:
        CheckpointError: a file is missing, damaged, of another format, or fails validation.
        AdapterMismatchError: the checkpoint does not fit ``base_model``.
    """
    directory = _checkpoint_dir(directory)
    scan_directory(directory)
    cfg_path = os.path.join(directory, MODEL_CONFIG)
    meta = _validate_model_config(read_json_file(directory, MODEL_CONFIG, "qalora model config"), cfg_path)
    if meta["files"] is not None:
        verify_manifest(directory, meta["files"], MODEL_CONFIG)
    weights = safe_file(directory, MODEL_WEIGHTS, "model weights")
    header = _read_header(weights)
    for name, layer_meta in meta["layers"].items():
        _check_declared(header, _layer_tensor_specs(name, layer_meta), weights, MODEL_CONFIG)
    if base_model is None:
        model = _build_architecture(directory, meta, header, weights)
        present = _layer_sites(model)
        for name, layer_meta in meta["layers"].items():
            _fitting_site(
                present,
                name,
                layer_meta,
                lambda msg, name=name: CheckpointError(f"{cfg_path}: field 'layers.{name}': {msg}"),
            )
        tensors = _load_tensors(weights, header)
        for name, layer_meta in meta["layers"].items():
            layer = _build_layer(layer_meta, "meta")
            if dropout and isinstance(layer, QALoRALinear):
                layer.lora_dropout = nn.Dropout(dropout)
            replace_module(model, name, layer)
        _tie_heads(model, meta["layers"])
        _assign_tensors(model, tensors, meta["tied"], weights)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise CheckpointError(f"{weights}: no value for {leftover[:10]}")
        gen_path = os.path.join(directory, GENERATION_CONFIG)
        if os.path.lexists(gen_path) and hasattr(model, "generation_config"):
            from transformers import GenerationConfig

            try:
                model.generation_config = GenerationConfig.from_dict(
                    read_json_file(directory, GENERATION_CONFIG, "generation config")
                )
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{gen_path}: not a generation config: {e}") from None
        model.eval()
    else:
        tensors = _load_tensors(weights, header)
        model = _load_into(base_model, meta, tensors, weights, dropout)
    _set_trainable(model, meta["config"])
    source = dict(meta["source"])
    if meta["tokenizer_files"]:
        source["tokenizer"] = directory
    attach_state(
        model, QALoRAState(config=meta["config"], merged=meta["merged"], skipped=meta["skipped"], source=source)
    )
    if base_model is None and source.get("rope_freqs"):
        restore_from_source(model)  # a GGUF's rotary divisors: not in config.json
    return model


def _load_into(base_model: nn.Module, meta: dict, tensors: dict, weights: str, dropout) -> nn.Module:
    """The two-argument form: swap the layers into the caller's model, check every tensor
    name and shape, swap the old layers back if anything does not fit, then copy."""
    present = _layer_sites(base_model)
    params = list(base_model.parameters())
    device = params[0].device if params else torch.device("cpu")
    new_layers = {}
    for name, layer_meta in meta["layers"].items():
        _fitting_site(
            present,
            name,
            layer_meta,
            lambda msg, name=name: AdapterMismatchError(
                f"layer {name!r} of the checkpoint: {msg}; is it the same architecture? "
                f"(layer sites here: {', '.join(list(present)[:20])} ...)"
            ),
        )
        layer = _build_layer(layer_meta, device)
        if dropout and isinstance(layer, QALoRALinear):
            layer.lora_dropout = nn.Dropout(dropout)
        new_layers[name] = layer
    for name, layer_meta in meta["layers"].items():
        if "tied_to" in layer_meta:
            new_layers[layer_meta["tied_to"]].share_into(new_layers[name])
    originals = {name: base_model.get_submodule(name) for name in new_layers}
    for name, layer in new_layers.items():
        replace_module(base_model, name, layer)
    try:
        expected = base_model.state_dict()
        tied = _storage_groups(expected)
        missing = sorted(k for k in expected if not any(name in tensors for name in tied[k]))
        unexpected = sorted(k for k in tensors if k not in expected)
        if missing or unexpected:
            raise AdapterMismatchError(
                f"{weights} does not fit this model: missing tensors {missing[:10]}, unexpected tensors {unexpected[:10]}"
            )
        for key, t in tensors.items():
            want = expected[key]
            # Float tensors may be cast (a model built in another float dtype); integer
            # ones (packed codes) must match exactly.
            same_kind = t.dtype == want.dtype or (t.is_floating_point() and want.is_floating_point())
            if tuple(t.shape) != tuple(want.shape) or not same_kind:
                raise AdapterMismatchError(
                    f"{weights}: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)}, "
                    f"the model expects {want.dtype} of shape {tuple(want.shape)}"
                )
    except Exception:
        for name, module in originals.items():
            replace_module(base_model, name, module)
        raise
    with torch.no_grad():
        # A tied name shares storage with the one the file holds: one copy serves both.
        for key, t in tensors.items():
            expected[key].copy_(t)
    return base_model
