"""qalora's per-model state: one object on the model, instead of loose attributes.

:func:`qalora.wrap` (and the loaders and :func:`qalora.from_pretrained`) attach a
:class:`QALoRAState` as ``model.qalora_state``. Everything qalora needs to remember about a
model lives there: the config it was wrapped with, whether it has been merged, which layers
were left dense, its memory before wrapping, and where it came from (e.g. a GGUF file).
It is a plain attribute, so ``copy.deepcopy(model)`` copies it with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import QALoRAConfig
from .errors import ConfigError

#: Attribute of the model that holds its state.
STATE_ATTR = "qalora_state"


@dataclass
class QALoRAState:
    """What qalora knows about a wrapped (or loaded) model.

    Attributes:
        config: the :class:`QALoRAConfig` the model was wrapped with; ``None`` for a model
            that holds quantized layers but has not been wrapped yet (e.g. one imported
            from a quantized file).
        merged: True once the adapters are folded into the quantized weights.
        skipped: layers matched by the config but left dense (``on_indivisible="skip"``).
        memory_before_wrap: bytes of parameters and buffers before :func:`qalora.wrap`
            (``None`` when unknown, e.g. for a model loaded from a checkpoint).
        source: where the model came from (free-form, JSON-serialisable), e.g.
            ``{"format": "gguf", "path": "..."}``; empty when unknown.
        quantization: how the base was quantized (JSON-serialisable): the quantizer and,
            for GPTQ, each layer's relative output error on the calibration inputs (and
            RTN's, for comparison), its dampening and the wall time.
        merge_rounding: after :func:`qalora.merge`, how far the stored group parameters
            are from what was trained (rounding to their storage dtypes): the largest
            relative change of a scale (``"scale"``) and of an offset in steps of its
            group's scale (``"offset"``), over all layers, with the layer of each
            (``"scale_layer"``, ``"offset_layer"``). Empty before a merge.
    """

    config: QALoRAConfig | None
    merged: bool = False
    skipped: list[str] = field(default_factory=list)
    memory_before_wrap: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    merge_rounding: dict[str, Any] = field(default_factory=dict)


def state_of(model: nn.Module) -> QALoRAState | None:
    """The model's :class:`QALoRAState`, or ``None`` if qalora has not touched it."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, QALoRAState) else None


def require_state(model: nn.Module) -> QALoRAState:
    """The state of a wrapped model; a model that :func:`qalora.wrap` has not configured
    raises :class:`ConfigError`."""
    state = state_of(model)
    if state is None or state.config is None:
        raise ConfigError("this model has not been wrapped by qalora.wrap (it has no qalora_state with a config)")
    return state


def attach_state(model: nn.Module, state: QALoRAState) -> QALoRAState:
    # object.__setattr__ keeps nn.Module from treating the dataclass as a submodule or buffer.
    object.__setattr__(model, STATE_ATTR, state)
    return state


def config_of(model: nn.Module) -> QALoRAConfig:
    """The config a model was wrapped with (raises :class:`ConfigError` if it was not)."""
    config = require_state(model).config
    assert config is not None  # require_state checked it
    return config
