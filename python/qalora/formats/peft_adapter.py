"""PEFT's QA-LoRA adapters in: a directory written by PEFT with ``use_qalora=True`` (its
``adapter_config.json`` + ``adapter_model.safetensors``) loaded onto the same quantized
base imported by qalora, where it merges exactly.

PEFT's QA-LoRA forward (``peft.tuners.lora.variants.QALoraLinearVariant``) adds, for a layer
of ``K`` inputs and pooling group ``P`` (``qalora_group_size``)::

    delta = (mean_P(x) * (K / P)) @ A_p^T @ B_p^T * s_p,   A_p: (r, K / P)

with ``s_p = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under ``use_rslora``), while a qalora
layer of quantization group ``g`` adds ``mean_g(x) @ A_q^T @ B_q^T * s_q``, A_q: (r, K / g).
Where ``P`` is a multiple of ``g`` (``t = P / g``), ``mean_P`` is the average of ``t``
consecutive ``mean_g`` values, so

    A_q[:, i] = A_p[:, i // t] * (K / P) / t,   B_q = B_p,   s_q = s_p

gives PEFT's forward up to float rounding, and the update is constant within every
quantization group: it folds into the group offsets exactly (:func:`qalora.merge`). A
pooling group that is not a multiple of the quantization group makes an update that varies
inside a group, which no low-bit merge can hold: refused, with the reason.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from torch import nn

from ..errors import AdapterMismatchError, CheckpointError
from ..layers import QALoRALinear, QuantLinear
from ..untrusted import read_json_file, safe_file, scan_directory

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight")
# Options under which PEFT's layer computes something else than the pooled product above.
_MUST_BE_OFF = ("use_dora", "lora_bias", "fan_in_fan_out")


def is_peft_adapter(data: dict) -> bool:
    """Whether an ``adapter_config.json`` object was written by PEFT (not by qalora)."""
    return "peft_type" in data and data.get("format") != "qalora-adapter"


def _number(data: dict, key: str, path: str, *, integer: bool = False) -> float:
    v = data.get(key)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or v <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise CheckpointError(f"{path}: field {key!r} = {v!r}; it must be {kind}")
    return v


def _pattern_value(pattern: Any, module: str, default: float, key: str, path: str) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name it ends with (or,
    as a regex, the whole name)."""
    if pattern in (None, {}):
        return default
    if not isinstance(pattern, dict):
        raise CheckpointError(f"{path}: field {key!r} must be an object (module pattern -> value)")
    for pat, value in pattern.items():
        try:
            matches = module == pat or module.endswith("." + str(pat)) or re.fullmatch(str(pat), module)
        except re.error as e:
            raise CheckpointError(f"{path}: field {key!r}: key {pat!r} is not a valid pattern ({e})") from None
        if matches:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise CheckpointError(f"{path}: field {key!r}[{pat!r}] = {value!r}; it must be positive")
            return value
    return default


def read_config(directory: str) -> dict:
    """The PEFT adapter config, checked for what this importer reproduces."""
    path = os.path.join(directory, CONFIG)
    data = read_json_file(directory, CONFIG, "PEFT adapter config")
    if data.get("peft_type") != "LORA":
        raise AdapterMismatchError(
            f"{path}: peft_type {data.get('peft_type')!r}; qalora reads PEFT's LoRA adapters with use_qalora=True"
        )
    if data.get("use_qalora") is not True:
        raise AdapterMismatchError(
            f"{path}: a plain PEFT LoRA adapter (use_qalora is not true): its dense update cannot merge exactly "
            f"into low-bit weights; train it with PEFT's use_qalora=True (or with qalora) to merge it exactly"
        )
    for key in _MUST_BE_OFF:
        if data.get(key):
            raise AdapterMismatchError(f"{path}: {key} = {data[key]!r} is not supported for a QA-LoRA adapter")
    if data.get("bias", "none") != "none":
        raise AdapterMismatchError(f"{path}: bias = {data['bias']!r}; only 'none' (no trained biases) is supported")
    if data.get("modules_to_save"):
        raise AdapterMismatchError(
            f"{path}: modules_to_save = {data['modules_to_save']!r}: fully trained modules are not part of a "
            f"QA-LoRA merge; not supported"
        )
    _number(data, "r", path, integer=True)
    _number(data, "lora_alpha", path)
    _number(data, "qalora_group_size", path, integer=True)
    return data


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from ..checkpoint.safetensors_header import _load_tensors, _read_header

    path = safe_file(directory, WEIGHTS, "PEFT adapter weights")
    header = _read_header(path)
    for key, (dtype, shape) in header.items():
        if not _KEY.fullmatch(key):
            raise AdapterMismatchError(
                f"{path}: tensor {key!r} is not a LoRA A/B weight; qalora imports PEFT QA-LoRA adapters holding "
                f"only lora_A / lora_B weights"
            )
        if not dtype.is_floating_point or len(shape) != 2:
            raise CheckpointError(f"{path}: tensor {key!r} is {dtype} of shape {shape}; expected a 2-D float matrix")
    tensors = _load_tensors(path, header)
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf values")
    return tensors


def _layers_in_file(tensors: dict[str, torch.Tensor], path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, which = _KEY.fullmatch(key).groups()
        pairs.setdefault(module, {})[which] = t
    out = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: layer {module!r} has {sorted(pair)} but not both lora_A and lora_B")
        out[module] = (pair["lora_A"], pair["lora_B"])
    if not out:
        raise CheckpointError(f"{path} holds no LoRA weights")
    return out


def _base_of(module: nn.Module) -> QuantLinear | None:
    if isinstance(module, QALoRALinear):
        return module.base_layer
    return module if isinstance(module, QuantLinear) else None


def convert_layer(
    a_peft: torch.Tensor, b_peft: torch.Tensor, in_features: int, group_size: int, pool: int, where: str
) -> torch.Tensor:
    """qalora's lora_A for PEFT's (A_p, pooling group ``pool``) on a layer of quantization
    group ``group_size`` (see the module docs); B and the scaling carry over unchanged."""
    if pool % group_size or in_features % pool:
        raise AdapterMismatchError(
            f"{where}: PEFT pooled its input in groups of {pool} (qalora_group_size), the layer is quantized in "
            f"groups of {group_size}: the pooling group must be a multiple of the quantization group (and divide "
            f"in_features = {in_features}), or the update varies inside a group and cannot merge exactly into "
            f"low-bit weights. Train the adapter with qalora_group_size = {group_size}."
        )
    rank = a_peft.shape[0]
    if a_peft.shape != (rank, in_features // pool) or b_peft.shape[1] != rank:
        raise AdapterMismatchError(
            f"{where}: lora_A {tuple(a_peft.shape)} / lora_B {tuple(b_peft.shape)} do not fit a layer of "
            f"{in_features} inputs pooled in groups of {pool} (lora_A must be (r, {in_features // pool}))"
        )
    t = pool // group_size
    a = a_peft.double().repeat_interleave(t, dim=1) * (in_features / pool / t)
    return a.float()


def load_peft_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT QA-LoRA adapter directory onto ``model``, in place, and return it.

    ``model`` holds the quantized base the adapter was trained on, imported by qalora (a
    GPTQ checkpoint through :func:`qalora.load_model`, or any model whose adapted layers are
    :class:`qalora.QuantLinear`). Unwrapped, it is wrapped with the adapter's rank and
    layers (no other trainables); wrapped, every adapted layer must be one of the file's,
    with its rank. Every check passes before anything is changed.

    Raises:
        AdapterMismatchError: not a PEFT QA-LoRA adapter, an option qalora does not
            reproduce, a layer the model lacks or does not hold quantized, ranks that
            differ, or a pooling group that is not a multiple of the layer's group.
        CheckpointError: missing, damaged or non-finite files.
    """
    from ..checkpoint.directory import _checkpoint_dir
    from ..config import QALoRAConfig
    from ..state import state_of
    from ..wrapping import wrap

    directory = _checkpoint_dir(directory)
    scan_directory(directory)
    cfg = read_config(directory)
    cfg_path = os.path.join(directory, CONFIG)
    weights_path = os.path.join(directory, WEIGHTS)
    pairs = _layers_in_file(_read_weights(directory), weights_path)
    modules = dict(model.named_modules())
    pool = int(cfg["qalora_group_size"])
    rank_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    plan = []
    for name, (a_p, b_p) in pairs.items():
        where = f"{weights_path}: layer {name!r}"
        base = _base_of(modules.get(name))
        if base is None:
            what = "does not have it" if name not in modules else f"holds it as {type(modules[name]).__name__}"
            raise AdapterMismatchError(
                f"{where}: the model {what}; load the quantized base the adapter was trained on (e.g. the GPTQ "
                f"checkpoint through qalora.load_model) so that the layer is a qalora QuantLinear"
            )
        rank = int(_pattern_value(cfg.get("rank_pattern"), name, rank_default, "rank_pattern", cfg_path))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, alpha_default, "alpha_pattern", cfg_path))
        if a_p.shape[0] != rank:
            raise AdapterMismatchError(f"{where}: lora_A has rank {a_p.shape[0]}, adapter_config.json says {rank}")
        if b_p.shape != (base.out_features, rank):
            raise AdapterMismatchError(
                f"{where}: lora_B is {tuple(b_p.shape)}, the layer needs ({base.out_features}, {rank})"
            )
        a_q = convert_layer(a_p, b_p, base.in_features, base.group_size, pool, where)
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        plan.append((name, rank, a_q, b_p.float(), scaling))
    ranks = {rank for _, rank, *_ in plan}
    wrapped = dict((n, m) for n, m in modules.items() if isinstance(m, QALoRALinear))
    if wrapped:
        extra = sorted(set(wrapped) - set(pairs))
        if extra:
            raise AdapterMismatchError(
                f"{weights_path}: the model adapts layers the PEFT adapter does not hold: {extra[:5]}"
            )
        for name, rank, *_ in plan:
            layer = wrapped.get(name)
            if layer is None or layer.rank != rank or layer.adapter != "qalora":
                raise AdapterMismatchError(
                    f"{weights_path}: layer {name!r} needs a QA-LoRA adapter of rank {rank}; the wrapped model has "
                    f"{'none' if layer is None else f'{layer.adapter} of rank {layer.rank}'}"
                )
    else:
        if len(ranks) != 1:
            raise AdapterMismatchError(
                f"{cfg_path}: layers of different ranks {sorted(ranks)} (rank_pattern); qalora adapts every layer "
                f"of a model at one rank, so such an adapter is not supported"
            )
        state = state_of(model)
        if state is not None and state.config is not None:
            raise AdapterMismatchError("the model is already wrapped but holds none of the adapter's layers")
        wrap(
            model,
            QALoRAConfig(
                rank=ranks.pop(),
                alpha=alpha_default,
                dropout=float(cfg.get("lora_dropout") or 0.0),
                target_modules=[name for name, *_ in plan],
                train_offsets=False,
            ),
            show_progress=False,
        )
        modules = dict(model.named_modules())
    with torch.no_grad():
        for name, rank, a_q, b_q, scaling in plan:
            layer = modules[name]
            layer.lora_A.weight.copy_(a_q)
            layer.lora_B.weight.copy_(b_q)
            layer.scaling = scaling
            layer.alpha = scaling * rank
    return model
