"""Rebuilding a Hugging Face model from a checkpoint directory alone: the class its JSON
names, built from its ``config.json`` (bounded first: a hostile config must not make the
build allocate or loop for long: its architecture fields are checked
(:mod:`qalora.config_check`), its layer count against the layers the weights hold, and the
memory the build needs against what is available) with every parameter on the meta device
(:func:`qalora.hf_skeleton.bounded_meta_model`), then given the file's tensors, ties kept.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..config_check import check_config, check_layer_tensors
from ..errors import CheckpointError, QALoRAError
from ..hf_skeleton import bounded_meta_model
from ..untrusted import read_json_file
from .schema import HF_CONFIG, MODEL_CONFIG

#: Largest integer a Hugging Face config.json may hold here (sizes, ids, lengths): a hostile
#: config must not make the architecture allocate a huge buffer while it is built.
MAX_CONFIG_INT = 1 << 24


def _bound_config_ints(value: Any, path: str, field: str = "") -> None:
    # Iterative: a deeply nested (hostile) config must not exhaust the Python stack here.
    stack = [(value, field)]
    while stack:
        value, field = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{field}.{k}" if field else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{field}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
            raise CheckpointError(
                f"{path}: field {field!r}: got {value}, larger than any real model's ({MAX_CONFIG_INT})"
            )


def _check_hf_config(hf_config: dict, header: dict, path: str, weights: str) -> None:
    """The config's architecture fields (:func:`qalora.config_check.check_config`) and the
    weights' tensor table against them: a hostile config must not make the build loop over
    layers the file does not hold."""
    _bound_config_ints(hf_config, path)
    arch = check_config(hf_config, path)
    check_layer_tensors(arch, {name: shape for name, (_, shape) in header.items()}, path, weights)


def _build_architecture(directory: str, meta: dict, header: dict, weights: str) -> nn.Module:
    cfg_path = os.path.join(directory, HF_CONFIG)
    arch = meta["architecture"]
    if arch is None and os.path.lexists(cfg_path):  # format 1: the class is in config.json
        archs = read_json_file(directory, HF_CONFIG, "Hugging Face config").get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            arch = {"library": "transformers", "class": archs[0]}
    if arch is None:
        raise CheckpointError(
            f"{os.path.join(directory, MODEL_CONFIG)}: field 'architecture' is empty: the model was not a Hugging "
            f"Face model, so its architecture cannot be rebuilt from the directory; pass a fresh instance: "
            f"qalora.from_pretrained(directory, model)"
        )
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{directory} holds a Hugging Face {arch['class']}; rebuilding it needs transformers "
            f"(pip install 'qalora[hf]')"
        ) from None
    cls = getattr(transformers, arch["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{os.path.join(directory, MODEL_CONFIG)}: field 'architecture.class': {arch['class']!r} is not a "
            f"model class of transformers {transformers.__version__}"
        )
    hf_config = read_json_file(directory, HF_CONFIG, "Hugging Face config")
    _check_hf_config(hf_config, header, cfg_path, weights)
    tensor_bytes = sum(math.prod(shape) * dtype.itemsize for dtype, shape in header.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = cls.config_class.from_dict(hf_config)
            return bounded_meta_model(cls, config, tensor_bytes=tensor_bytes, where=cfg_path)
    except QALoRAError:
        raise
    except Exception as e:  # transformers validates configs with many exception types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{cfg_path}: transformers cannot build {arch['class']} from it: {first}") from None


def _assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str], path: str) -> None:
    """Puts the file's tensors into a model built on the meta device, keeping ties: names
    sharing one parameter object (or recorded as tied) get the same tensor."""
    owners: dict[int, list[tuple[nn.Module, str, bool, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr, True, prefix + attr))
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                owners.setdefault(id(b), []).append((module, attr, False, prefix + attr))
    expected = {name for group in owners.values() for (_, _, _, name) in group}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{path}: tensors the architecture does not have: {unexpected[:10]}")
    plan = []
    for group in owners.values():
        names = [name for (_, _, _, name) in group]
        source = next((n for n in names if n in tensors), None)
        if source is None:
            source = next((tied[n] for n in names if tied.get(n) in tensors), None)
        if source is None:
            raise CheckpointError(f"{path}: tensor {names[0]!r} of the architecture is missing")
        module, attr, _, _ = group[0]
        want = getattr(module, attr)
        t = tensors[source]
        same_kind = t.dtype == want.dtype or (t.is_floating_point() and want.is_floating_point())
        if tuple(t.shape) != tuple(want.shape) or not same_kind:
            raise CheckpointError(
                f"{path}: tensor {source!r} is {t.dtype} of shape {tuple(t.shape)}; the architecture expects "
                f"{want.dtype} of shape {tuple(want.shape)}"
            )
        plan.append((group, t))
    for group, t in plan:
        value = nn.Parameter(t, requires_grad=False) if group[0][2] else t
        for module, attr, is_param, _ in group:
            (module._parameters if is_param else module._buffers)[attr] = value
