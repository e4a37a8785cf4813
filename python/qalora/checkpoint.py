"""Checkpoints: a whole quantized model, or its adapters alone (safetensors + JSON, no pickle).

* :func:`save_pretrained` / :func:`from_pretrained`: ``model.safetensors`` +
  ``qalora_config.json`` (the config, the per-layer layout, merged or not).
* :func:`save_adapter` / :func:`load_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json``.

Every file is written atomically. Loaders check the files against the model before they
change it, so a refused load leaves the model as it was.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import QALoRAConfig
from .errors import AdapterMismatchError, CheckpointError
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_with
from .layers import QALoRALinear, QuantLinear, scale_dtype_of
from .state import QALoRAState, attach_state, config_of, require_state, state_of
from .targets import dense_weight, linear_like_modules, quantized_layers, replace_module

FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "qalora_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _version() -> str:
    from . import __version__

    return __version__


def _layer_meta(layer: nn.Module) -> dict:
    base = layer.base_layer if isinstance(layer, QALoRALinear) else layer
    meta = {
        "type": type(layer).__name__,
        "in_features": base.in_features,
        "out_features": base.out_features,
        "bits": base.bits,
        "group_size": base.group_size,
        "bias": base.bias is not None,
        "scale_dtype": str(base.scales.dtype).replace("torch.", ""),
        "offset_dtype": str(base.offsets.dtype).replace("torch.", ""),
    }
    if isinstance(layer, QALoRALinear):
        meta.update(adapter=layer.adapter, rank=layer.rank, alpha=layer.alpha)
    return meta


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: cannot read {path}: {e}") from None


def _check_format(data: dict, fmt: str, path: str) -> None:
    if data.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {fmt} file (format = {data.get('format')!r})")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {data.get('format_version')!r}; this qalora reads up to {FORMAT_VERSION}"
        )


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; the save is incomplete") from None
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"cannot read {path}: {e}") from None


def save_pretrained(model: nn.Module, directory) -> None:
    """Save the whole quantized model (merged or with adapters) as ``model.safetensors`` +
    ``qalora_config.json``. Writes are atomic; no pickle.

    Restore it with :func:`from_pretrained` into a fresh instance of the same architecture.
    """
    from safetensors.torch import save_model

    state = require_state(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    layers = {name: _layer_meta(layer) for name, layer in quantized_layers(model)}
    # save_model drops duplicate names of tied weights (embeddings / LM head) and
    # load_model restores them.
    atomic_write_with(
        os.path.join(directory, MODEL_WEIGHTS), lambda tmp: save_model(model, tmp, metadata={"format": "qalora"})
    )
    atomic_write_json(
        os.path.join(directory, MODEL_CONFIG),
        {
            "format": "qalora",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config_of(model).to_dict(),
            "merged": state.merged,
            "skipped": list(state.skipped),
            "source": state.source,
            "layers": layers,
        },
    )


def _build_layer(name: str, meta: dict, device) -> nn.Module:
    try:
        base = QuantLinear(
            meta["in_features"],
            meta["out_features"],
            meta["bits"],
            meta["group_size"],
            meta["bias"],
            scale_dtype_of(meta["scale_dtype"]),
            device,
            name,
            offset_dtype=scale_dtype_of(meta.get("offset_dtype", meta["scale_dtype"])),
        )
        if meta["type"] == "QALoRALinear":
            return QALoRALinear(base, meta["rank"], meta["alpha"], 0.0, meta["adapter"])
        if meta["type"] == "QuantLinear":
            return base
    except KeyError as e:
        raise CheckpointError(f"layer {name!r}: field {e} missing from the saved layer description") from None
    raise CheckpointError(f"layer {name!r}: unknown layer type {meta['type']!r}")


def _storage_groups(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """For each state-dict name, every name sharing its storage (tied weights such as the
    embeddings and LM head: a safetensors file holds only one of them)."""
    by_storage: dict[tuple, list] = {}
    for key, t in state.items():
        by_storage.setdefault((t.device, t.data_ptr(), t.numel(), t.dtype), []).append(key)
    return {key: names for names in by_storage.values() for key in names}


def from_pretrained(directory, base_model: nn.Module, *, dropout: float | None = None) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` into ``base_model`` (a fresh
    instance of the same architecture, e.g. built from its config: its weights are replaced).

    Returns the model, bit-exact to the one saved. The files are checked against the model
    (layers, tensor names and shapes) before anything in it changes.

    Raises:
        CheckpointError: a file is missing, damaged or of another format.
        AdapterMismatchError: the checkpoint does not fit this model.
    """
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, MODEL_CONFIG)
    data = _read_json(cfg_path, "qalora model config")
    _check_format(data, "qalora", cfg_path)
    config = QALoRAConfig.from_dict(data["config"])
    weights = os.path.join(directory, MODEL_WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{weights} does not exist; the save is incomplete")
    present = dict(linear_like_modules(base_model))
    device = next(base_model.parameters()).device
    new_layers = {}
    for name, meta in data["layers"].items():
        module = present.get(name)
        if module is None:
            raise AdapterMismatchError(
                f"layer {name!r} of the checkpoint is not a linear layer of this model; "
                f"is it the same architecture? (linear layers here: {', '.join(list(present)[:20])} ...)"
            )
        out_f, in_f = dense_weight(module)[0].shape
        if (in_f, out_f) != (meta["in_features"], meta["out_features"]):
            raise AdapterMismatchError(
                f"layer {name!r}: checkpoint has (in, out) = ({meta['in_features']}, {meta['out_features']}), "
                f"the model has ({in_f}, {out_f})"
            )
        layer = _build_layer(name, meta, device)
        if dropout and isinstance(layer, QALoRALinear):
            layer.lora_dropout = nn.Dropout(dropout)
        new_layers[name] = layer
    tensors = _load_safetensors(weights)
    # Swap the layers in, check every tensor name and shape, and swap the old ones back if
    # anything does not fit: the caller's model is changed only by a load that succeeds.
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
    for p in base_model.parameters():
        p.requires_grad_(False)
    for _, layer in quantized_layers(base_model, QALoRALinear):
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.requires_grad_(True)
    previous = state_of(base_model)
    source = data.get("source") or (dict(previous.source) if previous is not None else {})
    attach_state(
        base_model,
        QALoRAState(
            config=config,
            merged=bool(data.get("merged", False)),
            skipped=list(data.get("skipped", [])),
            source=dict(source) if isinstance(source, dict) else {},
        ),
    )
    return base_model


def save_adapter(model: nn.Module, directory) -> None:
    """Save only the adapters: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    config = config_of(model)
    layers = dict(quantized_layers(model, QALoRALinear))
    if not layers:
        raise AdapterMismatchError("the model holds no adapters (was it merged?)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight
    directory = os.fspath(directory)
    atomic_save_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors, metadata={"format": "qalora-adapter"})
    atomic_write_json(
        os.path.join(directory, ADAPTER_CONFIG),
        {
            "format": "qalora-adapter",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config.to_dict(),
            "layers": {name: _layer_meta(layer) for name, layer in layers.items()},
        },
    )


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into a wrapped model, in place.

    Every layer's shape, bits, group size, adapter kind and rank must match; the model's
    adapter layers and the file's must be the same set; every tensor is checked before any
    is copied. Otherwise AdapterMismatchError (CheckpointError for unreadable files), and
    the model is unchanged.
    """
    config_of(model)
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    data = _read_json(cfg_path, "adapter config")
    _check_format(data, "qalora-adapter", cfg_path)
    layers = dict(quantized_layers(model, QALoRALinear))
    saved = data.get("layers", {})
    missing = sorted(set(saved) - set(layers))
    extra = sorted(set(layers) - set(saved))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter layers do not match the model: in the file but not the model: {missing[:10]}; "
            f"in the model but not the file: {extra[:10]}"
        )
    for name, meta in saved.items():
        mine = _layer_meta(layers[name])
        for key in ("in_features", "out_features", "bits", "group_size", "adapter", "rank"):
            if meta.get(key) != mine[key]:
                raise AdapterMismatchError(
                    f"layer {name!r}: the adapter file has {key} = {meta.get(key)!r}, the model has {mine[key]!r}"
                )
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    tensors = _load_safetensors(weights)
    updates = []
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in tensors:
                raise AdapterMismatchError(f"{weights} lacks tensor {key!r}")
            target = getattr(layer, part).weight
            if tensors[key].shape != target.shape:
                raise AdapterMismatchError(
                    f"{key}: the file has shape {tuple(tensors[key].shape)}, the model has {tuple(target.shape)}"
                )
            updates.append((target, tensors[key]))
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)
    for name, layer in layers.items():
        layer.alpha = float(saved[name]["alpha"])
        layer.scaling = layer.alpha / layer.rank
    return model
