"""A model's adapters alone: ``adapter_model.safetensors`` + ``adapter_config.json``
(:func:`save_adapter` / :func:`load_adapter`), with trained group parameters and norms.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..errors import AdapterMismatchError
from ..layers import QALoRALinear
from ..state import config_of
from ..targets import quantized_layers
from ..untrusted import manifest, read_json_file, safe_file, scan_directory, verify_manifest
from ..wrapping import norm_parameters
from .directory import _checkpoint_dir, _old_manifest_files, _save_directory
from .safetensors_header import _check_declared, _load_tensors, _read_header
from .schema import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    _layer_meta,
    _layer_tensor_specs,
    _validate_adapter_config,
    _version,
)


def _adapter_parameters(layer: QALoRALinear) -> dict[str, nn.Parameter]:
    """What an adapter layer trains, by its key under the layer's name."""
    out = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
    for key in ("delta_scales", "delta_offsets"):
        if getattr(layer, key) is not None:
            out[key] = getattr(layer, key)
    return out


def _norm_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's normalization parameters by qualified name (what ``train_norms`` trains)."""
    wanted = {id(p) for p in norm_parameters(model)}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def save_adapter(model: nn.Module, directory) -> None:
    """Save only the adapters: ``adapter_model.safetensors`` + ``adapter_config.json``
    (with a manifest of both files' sizes and SHA-256). Atomic as a whole, like
    :func:`qalora.save_pretrained`; other files in ``directory`` (a model saved there) are kept."""
    config = config_of(model)
    layers = dict(quantized_layers(model, QALoRALinear))
    if not layers:
        raise AdapterMismatchError("the model holds no adapters (was it merged?)")
    tensors = {}
    for name, layer in layers.items():
        for key, p in _adapter_parameters(layer).items():
            tensors[f"{name}.{key}"] = p.detach().to("cpu").contiguous().clone()
    # Trained norms are part of what training changed (config.train_norms).
    norms = _norm_tensors(model) if config.train_norms else {}
    tensors.update({k: v.detach().to("cpu").contiguous().clone() for k, v in norms.items()})
    metas = {name: _layer_meta(layer) for name, layer in layers.items()}
    owned = set(ADAPTER_FILES) | _old_manifest_files(directory, ADAPTER_CONFIG)

    def write(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "qalora-adapter"})
        data = {
            "format": "qalora-adapter",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config.to_dict(),
            "layers": metas,
            "files": manifest(tmp),
        }
        if norms:
            data["norms"] = {k: list(v.shape) for k, v in norms.items()}
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    _save_directory(directory, owned, write)


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into a wrapped model, in place; or a
    PEFT adapter directory trained with ``use_qalora=True`` onto the quantized base it was
    trained on (see :func:`qalora.formats.peft_adapter.load_peft_adapter`).

    The adapter config is validated like a model checkpoint's (schema, manifest, declared
    tensor dtypes and shapes, finite values). Every layer's shape, bits, group size, adapter
    kind and rank must match the model's; the model's adapter layers and the file's must be
    the same set; every tensor is checked before any is copied. Otherwise
    AdapterMismatchError (CheckpointError for missing, damaged or invalid files), and the
    model is unchanged.
    """
    directory = _checkpoint_dir(directory)
    scan_directory(directory)
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    raw = read_json_file(directory, ADAPTER_CONFIG, "adapter config")
    from ..formats import peft_adapter

    if peft_adapter.is_peft_adapter(raw):
        return peft_adapter.load_peft_adapter(model, directory)
    config_of(model)
    meta = _validate_adapter_config(raw, cfg_path)
    if meta["files"] is not None:
        verify_manifest(directory, meta["files"], ADAPTER_CONFIG)
    layers = dict(quantized_layers(model, QALoRALinear))
    saved = meta["layers"]
    missing = sorted(set(saved) - set(layers))
    extra = sorted(set(layers) - set(saved))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter layers do not match the model: in the file but not the model: {missing[:10]}; "
            f"in the model but not the file: {extra[:10]}"
        )
    for name, layer_meta in saved.items():
        mine = _layer_meta(layers[name])
        mine.setdefault("train_scales", False)
        mine.setdefault("train_offsets", False)
        for key in (
            "in_features",
            "out_features",
            "bits",
            "group_size",
            "adapter",
            "rank",
            "train_scales",
            "train_offsets",
        ):
            if layer_meta[key] != mine[key]:
                raise AdapterMismatchError(
                    f"layer {name!r}: the adapter file has {key} = {layer_meta[key]!r}, the model has {mine[key]!r}"
                )
    weights = safe_file(directory, ADAPTER_WEIGHTS, "adapter weights")
    header = _read_header(weights)
    for name, layer_meta in saved.items():
        specs = {k: v for k, v in _layer_tensor_specs(name, layer_meta).items() if ".lora_" in k or ".delta_" in k}
        _check_declared(header, specs, weights, ADAPTER_CONFIG)
    norms = _norm_tensors(model)
    saved_norms = meta["norms"]
    if saved_norms and set(saved_norms) != set(norms):
        raise AdapterMismatchError(
            f"the adapter file holds trained norms {sorted(saved_norms)[:5]}..., the model's norms are "
            f"{sorted(norms)[:5]}...: not the same architecture"
        )
    _check_declared(header, {k: ("float", tuple(norms[k].shape)) for k in saved_norms}, weights, ADAPTER_CONFIG)
    tensors = _load_tensors(weights, header)
    updates = []
    targets = [(f"{name}.{key}", p) for name, layer in layers.items() for key, p in _adapter_parameters(layer).items()]
    targets += [(key, norms[key]) for key in saved_norms]
    for key, target in targets:
        if key not in tensors:
            raise AdapterMismatchError(f"{key}: the model trains it, the adapter file does not hold it")
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
