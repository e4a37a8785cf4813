"""`QALoRAConfig`: what to quantize and how to adapt it (versioned, JSON round-trip)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import defaults
from .errors import ConfigError, QALoRAError, UnsupportedBitsError
from .io import atomic_write_text
from .ops import check_layout

#: Bumped when the meaning of a field changes; files of a newer version are refused.
CONFIG_VERSION = 1

_SCALE_DTYPES = ("float16", "bfloat16", "float32")
_ADAPTERS = ("qalora", "lora")
_ON_INDIVISIBLE = ("raise", "skip")
_FIXED_OFFSET_LAYERS = ("skip", "adapt")
_QUANTIZERS = ("rtn", "gptq")
# Fields added after the first release, with the values older releases behave as: a file
# holds such a field only where it differs from that value (so files that do not use it stay
# readable by those releases), and a file without it means that value, whatever today's
# default (see to_dict / from_dict).
_LATER_FIELDS = {
    "quantize_embeddings": False,
    "train_scales": False,
    "train_offsets": False,
    "train_norms": False,
    "offset_lr_scale": 1.0,
    "scale_lr_scale": 1.0,
    "fixed_offset_layers": "adapt",
}


@dataclass
class QALoRAConfig:
    """Settings of :func:`qalora.wrap`.

    Attributes:
        bits: code width of the frozen base: 2, 3, 4, 5, 6 or 8.
        group_size: columns (in_features) per quantization group; it must divide each
            targeted layer's in_features (see ``on_indivisible``).
        rank: LoRA rank r, at most :data:`qalora.defaults.MAX_RANK` and, for :func:`qalora.wrap`,
            at most min(in_features, out_features) of every targeted layer.
        alpha: LoRA alpha (finite); the adapter output is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input during training.
        target_modules: which linear layers to quantize and adapt. ``None`` (default): every
            ``nn.Linear`` / Hugging Face ``Conv1D`` except the output head. A list: module
            names or name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
            an entry naming a parent module covers the layers inside it (``"mlp"``).
            A string: a regular expression that must match the whole qualified name.
        exclude_modules: names, suffixes or a regex (same rules) never wrapped.
        scale_dtype: storage dtype of scales and offsets: "float16" (default), "bfloat16",
            "float32".
        on_indivisible: a targeted layer whose in_features is not divisible by group_size:
            "raise" (default, naming the layer) or "skip" (left dense and frozen, with a warning).
        adapter: "qalora" (default: pooled adapter that merges exactly) or "lora" (a standard
            dense LoRA on the same quantized base, for comparison; it can only be merged by
            re-quantizing, see :func:`qalora.merge_requantize`).
        quantizer: how the frozen base is quantized: "rtn" (default: min-max round to
            nearest, no data needed) or "gptq" (GPTQ, Frantar et al. 2022: each layer's
            rounding error is compensated on calibration activations; needs
            ``qalora.wrap(..., calibration=token_ids)``). Both give the same layout.
        damp_percent: GPTQ's dampening, as a fraction of the mean diagonal of the Hessian
            added to its diagonal (0.01 = 1%, the GPTQ paper's value).
        act_order: GPTQ only: quantize columns in order of decreasing Hessian diagonal,
            with static groups (every group's scale and offset computed from the
            unquantized weights first), so groups stay contiguous and aligned with the
            adapter's pooling. Off by default.
        quantize_embeddings: also quantize the token embedding (the model's
            ``get_input_embeddings()``) with ``bits`` / ``group_size`` (RTN, whatever the
            ``quantizer``) as a frozen :class:`qalora.layers.QuantEmbedding`, and an output
            head tied to it as a :class:`qalora.QuantLinear` sharing the very same tensors
            (the tie is kept; the table is stored once). Neither gets an adapter. An untied
            head is not touched (name it in ``target_modules`` to quantize and adapt it).
            Off by default: the embedding/head is the most sensitive matrix of a small model
            (see README, Configuration).
        train_scales: also train every quantized layer's per-group scales (a relative
            change ``s·(1 + delta)`` per group, float32 while training). The deployed format
            stores the scales, so the merge stays exact: the trained values rounded once to
            the scale dtype.
        train_offsets: also train the per-group offsets at full rank (``m + s·delta`` per
            group, in steps of the group's code grid), beside the pooled adapter, whose
            update is the rank-r part of the same offsets. Exact after the merge likewise.
        train_norms: also train the weights (and biases) of the model's normalization
            layers, which every deployed format stores as they are.
        offset_lr_scale: the learning rate of trained offsets relative to the adapters'
            (their unit is one step of the group's code grid).
        scale_lr_scale: the learning rate of trained scales relative to the adapters'
            (their unit is a relative change of the scale).
        fixed_offset_layers: layers imported from a GGUF type whose offset is fixed by its
            scale and which has no offset-holding sibling of the same codes (Q3_K, Q6_K,
            Q8_0): "skip" (default: left without adapters, so the exported file keeps
            their bytes and its size) or "adapt" (adapted; a merged one can only be written
            by re-quantizing it, as Q8_0 by default, which the export reports). Q4_0 / Q5_0
            layers are adapted either way: a merged one is written as Q4_1 / Q5_1 exactly.
        version: format version of this config.
    """

    bits: int = 4
    group_size: int = 32
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    scale_dtype: str = "float16"
    on_indivisible: str = "raise"
    adapter: str = "qalora"
    quantizer: str = "rtn"
    damp_percent: float = 0.01
    act_order: bool = False
    quantize_embeddings: bool = False
    train_scales: bool = defaults.TRAIN_SCALES
    train_offsets: bool = defaults.TRAIN_OFFSETS
    train_norms: bool = defaults.TRAIN_NORMS
    offset_lr_scale: float = defaults.OFFSET_LR_SCALE
    scale_lr_scale: float = defaults.SCALE_LR_SCALE
    fixed_offset_layers: str = "skip"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        self.validate()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first bad field."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.bits):
            raise ConfigError(f"bits: got {self.bits!r}, expected an int")
        if not is_int(self.group_size) or self.group_size <= 0:
            raise ConfigError(f"group_size: got {self.group_size!r}, it must be a positive int")
        # The kernels own the bit widths and the layout rules: ask them, on a K that every
        # valid group size divides, so only bits and the group's own rules can fail.
        try:
            check_layout(8 * self.group_size, self.bits, self.group_size)
        except UnsupportedBitsError as e:
            raise ConfigError(str(e)) from None
        except QALoRAError:
            raise ConfigError(
                f"group_size: got {self.group_size}, at {self.bits} bits a group must start on a byte boundary "
                f"(a multiple of 8 at 3 and 5 bits, of 4 at 6 bits)"
            ) from None
        if not is_int(self.rank) or not 0 < self.rank <= defaults.MAX_RANK:
            raise ConfigError(f"rank: got {self.rank!r}, it must be an int in 1..{defaults.MAX_RANK}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha: got {self.alpha!r}, it must be a finite number")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout: got {self.dropout!r}, it must be in [0, 1)")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ConfigError(f"{name}: {value!r} is not a valid regular expression ({e})") from None
            elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{name}: got {value!r}, expected None, a regex string or a list of module names")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"scale_dtype: got {self.scale_dtype!r}, allowed: {', '.join(_SCALE_DTYPES)}")
        if self.on_indivisible not in _ON_INDIVISIBLE:
            raise ConfigError(f"on_indivisible: got {self.on_indivisible!r}, allowed: 'raise', 'skip'")
        if self.fixed_offset_layers not in _FIXED_OFFSET_LAYERS:
            raise ConfigError(
                f"fixed_offset_layers: got {self.fixed_offset_layers!r}, allowed: {', '.join(map(repr, _FIXED_OFFSET_LAYERS))}"
            )
        if self.adapter not in _ADAPTERS:
            raise ConfigError(f"adapter: got {self.adapter!r}, allowed: 'qalora', 'lora'")
        if self.quantizer not in _QUANTIZERS:
            raise ConfigError(f"quantizer: got {self.quantizer!r}, allowed: 'rtn', 'gptq'")
        if (
            isinstance(self.damp_percent, bool)
            or not isinstance(self.damp_percent, (int, float))
            or not 0.0 < self.damp_percent <= 1.0
        ):
            raise ConfigError(f"damp_percent: got {self.damp_percent!r}, it must be in (0, 1] (0.01 = 1%)")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order: got {self.act_order!r}, it must be True or False")
        if not isinstance(self.quantize_embeddings, bool):
            raise ConfigError(f"quantize_embeddings: got {self.quantize_embeddings!r}, it must be True or False")
        for name in ("train_scales", "train_offsets", "train_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: got {getattr(self, name)!r}, it must be True or False")
        for name in ("offset_lr_scale", "scale_lr_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"{name}: got {v!r}, it must be a finite positive number")
        if not is_int(self.version) or not 1 <= self.version <= CONFIG_VERSION:
            raise ConfigError(
                f"version: got {self.version!r}; this qalora reads config versions 1..{CONFIG_VERSION} (upgrade qalora for newer files)"
            )

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Fields added after the first release are left out at the values older releases
        # behave as (see _LATER_FIELDS), so files that do not use them stay readable there.
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QALoRAConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object for QALoRAConfig, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown QALoRAConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{**_LATER_FIELDS, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QALoRAConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        """Writes the config as JSON, atomically."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> QALoRAConfig:
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
