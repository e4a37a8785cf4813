"""A Hugging Face model rebuilt without its weights: the architecture a config describes,
with every parameter on the meta device, for a loader to fill with the tensors of a file.

Every loader that builds a transformers model from a config goes through :func:`meta_model`:
:func:`qalora.from_pretrained` (a qalora checkpoint's ``config.json``),
:func:`qalora.load_gguf` (the config transformers reads from a GGUF file) and the GPTQ
checkpoint loader (:mod:`qalora.formats.gptq_checkpoint`). Nothing is allocated for the
parameters and nothing is randomly initialised; buffers computed at construction (rotary
tables) are real, as they are not saved in the files. Those buffers can be large (a causal
mask of max_position_embeddings squared per layer), so :func:`bounded_meta_model` first
measures them on a build where every tensor is on the meta device (:func:`buffer_bytes`) and
refuses a model that would not fit in memory beside its weights, and then counts them while
it builds.

What a config cannot say is restored here too: the per-frequency rotary divisors of a
Llama 3.1-style GGUF file (``rope_freqs``), which the model's source record keeps
(:func:`apply_rope_freqs`, :func:`restore_from_source`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from . import config_check
from .errors import CheckpointError, FormatError
from .state import state_of


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no random init:
    the checkpoint's tensors replace them) and their buffers real (e.g. rotary tables
    computed at construction and not saved)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_model(model_class: Any, config: Any, **kwargs: Any) -> nn.Module:
    """The model ``config`` describes, built under :func:`parameters_on_meta`.

    Args:
        model_class: a transformers model class (built with its ``_from_config``), or an Auto
            class such as ``AutoModelForCausalLM`` (its ``from_config``, which picks the
            class from the config).
        config: a transformers config object.
        kwargs: passed on to ``from_config`` (e.g. ``dtype``).
    """
    build = model_class._from_config if hasattr(model_class, "_from_config") else model_class.from_config
    with parameters_on_meta():
        return build(config, **kwargs)


def buffer_bytes(model_class: Any, config: Any, **kwargs: Any) -> int | None:
    """Bytes of the buffers the model ``config`` describes would hold, measured on a build
    with every tensor on the meta device (nothing is allocated); None where such a build
    fails (a model whose construction reads its tensors' values)."""
    import warnings

    build = model_class._from_config if hasattr(model_class, "_from_config") else model_class.from_config
    try:
        with warnings.catch_warnings(), parameters_on_meta(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build(config, **kwargs)
    except Exception:
        return None
    return sum(b.numel() * b.element_size() for b in model.buffers())


class _BufferLimit(Exception):
    def __init__(self, total: int) -> None:
        self.total = total


@contextmanager
def _counting_buffers(limit: int) -> Iterator[None]:
    """Stops a build (with :class:`_BufferLimit`) once its real buffers pass ``limit`` bytes."""
    original = nn.Module.register_buffer
    total = 0

    def register(self, name, tensor, persistent=True):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            total += tensor.numel() * tensor.element_size()
            if total > limit:
                raise _BufferLimit(total)
        original(self, name, tensor, persistent)

    nn.Module.register_buffer = register
    try:
        yield
    finally:
        nn.Module.register_buffer = original


def bounded_meta_model(
    model_class: Any,
    config: Any,
    *,
    tensor_bytes: int,
    where: str,
    error: type[Exception] = CheckpointError,
    **kwargs: Any,
) -> nn.Module:
    """:func:`meta_model`, refused (``error`` naming ``where``, the config file) when the
    buffers the build would allocate and the ``tensor_bytes`` of weights to be loaded into it
    exceed the memory available (:func:`qalora.config_check.available_memory`): measured
    before the build, and counted during it (a model the meta-device build cannot measure)."""
    measured = buffer_bytes(model_class, config, **kwargs)
    if measured is not None:
        config_check.check_memory(
            tensor_bytes + measured, where, "loading the weights and building the model's buffers", error=error
        )
    free = config_check.available_memory()
    if free is None:
        return meta_model(model_class, config, **kwargs)
    limit = max(0, free - tensor_bytes)
    try:
        with _counting_buffers(limit):
            return meta_model(model_class, config, **kwargs)
    except _BufferLimit as e:
        raise error(
            f"{where}: building the model allocated more than {e.total / 2**30:.2f} GiB of buffers before it was "
            f"stopped; beside {tensor_bytes / 2**30:.2f} GiB of weights that exceeds the {free / 2**30:.2f} GiB "
            f"available (check max_position_embeddings and the layer count)"
        ) from None


def apply_rope_freqs(model: nn.Module, config, factors, path: str) -> None:
    """Llama 3.1-style files carry per-frequency divisors of the rotary angles
    (``rope_freqs``); fold them into the rotary embedding's inverse frequencies. The source
    record keeps them, so a model rebuilt from a checkpoint gets them again."""
    factors = np.asarray(factors, dtype=np.float32)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise FormatError(f"{path}: rope_freqs together with rope type {rope.get('rope_type')!r} is not supported")
    divisor = torch.from_numpy(factors.astype(np.float32))
    found = False
    for m in model.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.shape == divisor.shape:
            m.inv_freq = inv / divisor
            if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
                m.original_inv_freq = m.original_inv_freq / divisor
            found = True
    if not found:
        raise FormatError(
            f"{path}: rope_freqs has {divisor.numel()} entries, which fits no rotary embedding of this model"
        )


def restore_from_source(model: nn.Module) -> None:
    """Re-applies what a rebuilt model (e.g. from a checkpoint) cannot get from its config:
    the rotary divisors of a file with ``rope_freqs``."""
    state = state_of(model)
    factors = state.source.get("rope_freqs") if state is not None else None
    if factors:
        apply_rope_freqs(model, model.config, factors, state.source.get("path", "checkpoint"))
