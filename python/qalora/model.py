"""Model-level API: wrap, merge, summaries, save and load."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .config import QALoRAConfig
from .errors import (
    AdapterMismatchError,
    CheckpointError,
    ConfigError,
    DTypeError,
    GroupSizeError,
    InvalidValueError,
    NoTargetModulesError,
    QALoRAWarning,
)
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_with
from .layers import QALoRALinear, QuantLinear, check_group_size, scale_dtype_of
from .progress import progress

FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "qalora_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# --------------------------------------------------------------------------- discovery


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # Hugging Face's Conv1D (GPT-2 family): a linear layer with a transposed (in, out) weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _dense_weight(module: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, in) weight and bias of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias


def _linear_like_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling the module,
    # so its projection cannot be swapped for another module type.
    mha = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and _is_linear_like(m) and not any(name.startswith(p + ".") for p in mha)
    ]


def _output_head_names(model: nn.Module) -> set:
    """The output projection (LM head) and any linear whose weight is tied to an embedding."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if m is head or name.split(".")[-1] == "lm_head":
            heads.add(name)
        elif _is_linear_like(m) and m.weight.data_ptr() in embedding_ptrs:
            heads.add(name)
    return heads


def _matches(name: str, spec) -> bool:
    """A regex must match the whole qualified name. A list entry matches a module whose
    name, or an ancestor's, equals it or ends with "." + it (so "mlp" covers mlp.up_proj)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == s or p.endswith("." + s) for p in paths for s in spec)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _qalora_layers(model: nn.Module, kind=(QALoRALinear, QuantLinear)) -> Iterator[Tuple[str, nn.Module]]:
    """Top-level qalora layers (a QALoRALinear's own base_layer is not listed separately)."""
    inside = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (QALoRALinear, QuantLinear)):
            inside.add(name)
            if isinstance(m, kind):
                yield name, m


def config_of(model: nn.Module) -> QALoRAConfig:
    cfg = getattr(model, "qalora_config", None)
    if not isinstance(cfg, QALoRAConfig):
        raise ConfigError("this model has not been wrapped by qalora.wrap (no qalora_config attribute)")
    return cfg


# --------------------------------------------------------------------------- summary


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            yield t


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


@dataclass
class ModelSummary:
    """Parameter and memory counts of a model (quantized weights count as parameters)."""

    trainable_params: int
    total_params: int
    memory_bytes: int
    memory_bytes_before_wrap: Optional[int]
    quantized_layers: int
    adapter_layers: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        mib = 1 << 20
        text = (
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%) | quantized layers: {self.quantized_layers} "
            f"(with adapter: {self.adapter_layers}) | memory: {self.memory_bytes / mib:.2f} MiB"
        )
        if self.memory_bytes_before_wrap:
            text += (
                f" (before wrap: {self.memory_bytes_before_wrap / mib:.2f} MiB, "
                f"{self.memory_bytes / self.memory_bytes_before_wrap:.1%})"
            )
        return text


def summary(model: nn.Module) -> ModelSummary:
    """Trainable vs total parameters and memory, before and after :func:`wrap`."""
    params = {id(p): p for p in model.parameters()}.values()
    quant = [m for _, m in _qalora_layers(model, QuantLinear)]
    quant += [m.base_layer for _, m in _qalora_layers(model, QALoRALinear)]
    return ModelSummary(
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params) + sum(m.in_features * m.out_features for m in quant),
        memory_bytes=memory_bytes(model),
        memory_bytes_before_wrap=getattr(model, "qalora_memory_before_wrap", None),
        quantized_layers=len(quant),
        adapter_layers=sum(1 for _ in _qalora_layers(model, QALoRALinear)),
    )


# --------------------------------------------------------------------------- wrap / merge


def _select_targets(model: nn.Module, config: QALoRAConfig) -> List[Tuple[str, nn.Module]]:
    candidates = _linear_like_modules(model)
    if config.target_modules is None:
        heads = _output_head_names(model)
        chosen = [(n, m) for n, m in candidates if n not in heads]
    else:
        chosen = [(n, m) for n, m in candidates if _matches(n, config.target_modules)]
    chosen = [(n, m) for n, m in chosen if not _matches(n, config.exclude_modules)]
    if not chosen:
        seen = [n for n, _ in candidates]
        listing = ", ".join(seen[:40]) + (f", ... ({len(seen)} in all)" if len(seen) > 40 else "")
        raise NoTargetModulesError(
            f"no layer matched target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}); "
            f"linear-like modules in this model: {listing or 'none'}"
        )
    return chosen


def wrap(model: nn.Module, config: Optional[QALoRAConfig] = None, *, show_progress: Optional[bool] = None) -> nn.Module:
    """Quantize the targeted linear layers and attach trainable adapters, in place.

    Each targeted ``nn.Linear`` / ``Conv1D`` becomes a :class:`QALoRALinear` holding the
    frozen quantized base (packed codes, scales, offsets, bias) and ``lora_A``/``lora_B``;
    its dense weight is released. Every other parameter is frozen, so only adapters train.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face model, a plain MLP, ...).
        config: a :class:`QALoRAConfig` (default: 4-bit, group 32, rank 16).
        show_progress: progress bar over layers (default: when there are more than 8).

    Returns:
        The same model object.

    Raises:
        NoTargetModulesError: nothing matched (the message lists the linear-like modules).
        GroupSizeError: a layer's in_features is not divisible by group_size and
            ``config.on_indivisible == "raise"``.
    """
    config = config if config is not None else QALoRAConfig()
    if not isinstance(config, QALoRAConfig):
        raise ConfigError(f"config: expected a QALoRAConfig, got {type(config).__name__}")
    if isinstance(getattr(model, "qalora_config", None), QALoRAConfig):
        raise ConfigError("this model is already wrapped; wrap a fresh model or load adapters with qalora.load_adapter")
    targets = _select_targets(model, config)
    # Check every layer before changing any, so a refused wrap leaves the model untouched.
    keep, skipped = [], []
    for name, module in targets:
        weight, _ = _dense_weight(module)
        try:
            check_group_size(weight.shape[1], config.bits, config.group_size, name)
            keep.append((name, module))
        except GroupSizeError as e:
            if config.on_indivisible == "raise":
                raise
            skipped.append(name)
            warnings.warn(f"{e}; left unquantized (on_indivisible='skip')", QALoRAWarning, stacklevel=2)
    if not keep:
        raise NoTargetModulesError(f"every matched layer was skipped as indivisible by group_size={config.group_size}: {skipped}")

    before = memory_bytes(model)
    for p in model.parameters():
        p.requires_grad_(False)
    scale_dtype = scale_dtype_of(config.scale_dtype)
    for name, module in progress(keep, desc="qalora: quantizing layers", enabled=show_progress, min_items=9):
        weight, bias = _dense_weight(module)
        base = QuantLinear.from_weight(weight, bias, config.bits, config.group_size, scale_dtype, name)
        # Adapters are created in float32 whatever the model's dtype: they are what trains.
        layer = QALoRALinear(base, config.rank, config.alpha, config.dropout, config.adapter)
        _replace(model, name, layer)
        del module, weight, bias
    model.qalora_config = config
    model.qalora_memory_before_wrap = before
    model.qalora_skipped = skipped
    return model


def merge(model: nn.Module, offset_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every QA-LoRA adapter into its layer's offsets (exact; codes unchanged), in place.

    Each :class:`QALoRALinear` becomes a plain :class:`QuantLinear`: the model is then a pure
    low-bit model with no adapter. ``m' = m + scaling * (B A) / group_size``, computed in
    float32 and stored in the offsets' dtype (float16 rounding of the offsets is the only
    difference from the unmerged model).

    Args:
        offset_dtype: store the merged offsets in this dtype (default: keep theirs).
            ``torch.float32`` keeps a small update that float16 would round away, at 16 more
            bits per group.

    Raises:
        MergeError: the model holds dense LoRA adapters (``adapter="lora"``); use
            :func:`merge_requantize`.
    """
    if offset_dtype is not None and offset_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DTypeError(f"offset_dtype: got {offset_dtype!r}, allowed: torch.float16, torch.bfloat16, torch.float32")
    layers = list(_qalora_layers(model, QALoRALinear))
    config_of(model)
    merged = [(name, layer.merged(offset_dtype)) for name, layer in layers]  # all checked before any swap
    for name, new in merged:
        _replace(model, name, new)
    model.qalora_merged = True
    return model


def merge_requantize(model: nn.Module) -> nn.Module:
    """QLoRA-style deployment, for comparison: add each adapter's dense update to the
    dequantized weight and re-quantize with RTN at the same bits and group size. Lossy for
    dense LoRA adapters; in place."""
    config_of(model)
    for name, layer in list(_qalora_layers(model, QALoRALinear)):
        _replace(model, name, layer.requantized())
    model.qalora_merged = True
    return model


def set_activations(model: nn.Module, mode: str) -> int:
    """Choose how every quantized layer of ``model`` multiplies small CPU batches:
    ``"exact"`` (the default) or ``"int8"`` (activations quantized to int8 per block of up
    to 128 values; faster generation, error bounded as described in
    :func:`qalora.ops.qmatmul`). Returns the number of layers set. A run-time choice: it is
    not saved with the model.

    Raises:
        InvalidValueError: ``mode`` is neither ``"exact"`` nor ``"int8"``.
        ConfigError: the model holds no qalora layer.
    """
    if mode not in ("exact", "int8"):
        raise InvalidValueError(f"mode: got {mode!r}, allowed: 'exact', 'int8'")
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.activations = mode
            count += 1
    if count == 0:
        raise ConfigError("this model holds no qalora layer; wrap it with qalora.wrap first")
    return count


# --------------------------------------------------------------------------- save / load


def _layer_meta(layer: nn.Module) -> Dict:
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


def _read_json(path: str, what: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: cannot read {path}: {e}") from None


def _check_format(data: Dict, fmt: str, path: str) -> None:
    if data.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {fmt} file (format = {data.get('format')!r})")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {data.get('format_version')!r}; this qalora reads up to {FORMAT_VERSION}")


def save_pretrained(model: nn.Module, directory) -> None:
    """Save the whole quantized model (merged or with adapters) as ``model.safetensors`` +
    ``qalora_config.json``. Writes are atomic; no pickle.

    Restore it with :func:`from_pretrained` into a fresh instance of the same architecture.
    """
    from safetensors.torch import save_model

    config = config_of(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    layers = {name: _layer_meta(layer) for name, layer in _qalora_layers(model)}
    # save_model drops duplicate names of tied weights (embeddings / LM head) and
    # load_model restores them.
    atomic_write_with(os.path.join(directory, MODEL_WEIGHTS), lambda tmp: save_model(model, tmp, metadata={"format": "qalora"}))
    atomic_write_json(
        os.path.join(directory, MODEL_CONFIG),
        {
            "format": "qalora",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config.to_dict(),
            "merged": bool(getattr(model, "qalora_merged", False)),
            "skipped": list(getattr(model, "qalora_skipped", [])),
            "layers": layers,
        },
    )


def _version() -> str:
    from . import __version__

    return __version__


def _build_layer(name: str, meta: Dict, device) -> nn.Module:
    try:
        base = QuantLinear(
            meta["in_features"], meta["out_features"], meta["bits"], meta["group_size"], meta["bias"],
            scale_dtype_of(meta["scale_dtype"]), device, name,
            offset_dtype=scale_dtype_of(meta.get("offset_dtype", meta["scale_dtype"])),
        )
        if meta["type"] == "QALoRALinear":
            return QALoRALinear(base, meta["rank"], meta["alpha"], 0.0, meta["adapter"])
        if meta["type"] == "QuantLinear":
            return base
    except KeyError as e:
        raise CheckpointError(f"layer {name!r}: field {e} missing from the saved layer description") from None
    raise CheckpointError(f"layer {name!r}: unknown layer type {meta['type']!r}")


def from_pretrained(directory, base_model: nn.Module, *, dropout: Optional[float] = None) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` into ``base_model`` (a fresh
    instance of the same architecture, e.g. built from its config: its weights are replaced).

    Returns the model, bit-exact to the one saved. Raises CheckpointError /
    AdapterMismatchError if the directory does not fit the model.
    """
    from safetensors.torch import load_model

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, MODEL_CONFIG)
    data = _read_json(cfg_path, "qalora model config")
    _check_format(data, "qalora", cfg_path)
    config = QALoRAConfig.from_dict(data["config"])
    weights = os.path.join(directory, MODEL_WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{weights} does not exist; the save is incomplete")
    present = dict(_linear_like_modules(base_model))
    device = next(base_model.parameters()).device
    for name, meta in data["layers"].items():
        module = present.get(name)
        if module is None:
            raise AdapterMismatchError(
                f"layer {name!r} of the checkpoint is not a linear layer of this model; "
                f"is it the same architecture? (linear layers here: {', '.join(list(present)[:20])} ...)"
            )
        out_f, in_f = _dense_weight(module)[0].shape
        if (in_f, out_f) != (meta["in_features"], meta["out_features"]):
            raise AdapterMismatchError(
                f"layer {name!r}: checkpoint has (in, out) = ({meta['in_features']}, {meta['out_features']}), "
                f"the model has ({in_f}, {out_f})"
            )
        layer = _build_layer(name, meta, device)
        if dropout and isinstance(layer, QALoRALinear):
            layer.lora_dropout = nn.Dropout(dropout)
        _replace(base_model, name, layer)
    for p in base_model.parameters():
        p.requires_grad_(False)
    try:
        load_model(base_model, weights, strict=True, device=str(device))
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} does not fit this model: {str(e)[:2000]}") from None
    for _, layer in _qalora_layers(base_model, QALoRALinear):
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.requires_grad_(True)
    base_model.qalora_config = config
    base_model.qalora_merged = bool(data.get("merged", False))
    base_model.qalora_skipped = list(data.get("skipped", []))
    return base_model


def save_adapter(model: nn.Module, directory) -> None:
    """Save only the adapters: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    config = config_of(model)
    layers = dict(_qalora_layers(model, QALoRALinear))
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
    adapter layers and the file's must be the same set. Otherwise AdapterMismatchError.
    """
    from safetensors.torch import load_file

    config_of(model)
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    data = _read_json(cfg_path, "adapter config")
    _check_format(data, "qalora-adapter", cfg_path)
    layers = dict(_qalora_layers(model, QALoRALinear))
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
    try:
        tensors = load_file(weights)
    except FileNotFoundError:
        raise CheckpointError(f"{weights} does not exist") from None
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    with torch.no_grad():
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
                target.copy_(tensors[key])
            layer.alpha = float(saved[name]["alpha"])
            layer.scaling = layer.alpha / layer.rank
    return model
