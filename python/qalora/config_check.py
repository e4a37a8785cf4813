"""The architecture fields of a Hugging Face ``config.json`` checked before a model is built
from it: the file comes from a directory qalora reads (a GPTQ checkpoint, a directory written
by :func:`qalora.save_pretrained`, the config a GGUF file implies) and may be hostile.

* :func:`check_config`: layer count, hidden size, attention heads, key/value heads, head
  dimension, feed-forward size, vocabulary, positions and the rotary settings, each checked
  for type and range, and against each other (the heads divide the hidden size unless a head
  dimension is given, the key/value heads divide the heads, ...). Returns the values read
  (:class:`Architecture`).
* :func:`check_layer_tensors`: the tensor table (name -> shape, from safetensors headers)
  against the layer count: no empty tensor, every layer the config names present and holding
  at least a hidden-size vector, none beyond it. A config cannot then ask for more layers
  than the files hold.
* :func:`check_memory`: bytes a load needs against what the machine has free
  (``MemAvailable``, and the address-space limit of the process where one is set).

Each refusal is an error of the class the caller names (:class:`~qalora.CheckpointError` by
default; a GGUF reader passes :class:`~qalora.FormatError`) whose message names the file,
the field and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError

#: Ranges of the fields (inclusive). Far above any published model, far below what would
#: exhaust a machine before the model exists.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 24

# Each quantity and the names configs give it (first found wins; each present one is checked).
_ALIASES = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
    "positions": ("max_position_embeddings", "n_positions", "n_ctx"),
}
_RANGES = {
    "layers": (1, MAX_LAYERS),
    "hidden": (1, MAX_HIDDEN),
    "heads": (1, MAX_HEADS),
    "kv_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "ffn": (1, MAX_FFN),
    "vocab": (1, MAX_VOCAB),
    "positions": (1, MAX_POSITIONS),
}
# Fields that may be null in a real config (GPT-2's n_inner: 4 x hidden).
_NULLABLE = {
    "n_inner",
    "intermediate_size",
    "ffn_dim",
    "head_dim",
    "num_key_value_heads",
    "n_ctx",
    "rotary_dim",
    "sliding_window",
}
_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
_ROPE_FIELDS = ("rope_scaling", "rope_parameters")


@dataclass(frozen=True)
class Architecture:
    """The values :func:`check_config` read (None where the config does not give one)."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    vocab: int | None = None
    positions: int | None = None


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"expected a config dict or a transformers PretrainedConfig, got {type(config).__name__}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, where: str, error: type[Exception]) -> None:
        self.where = where
        self.error = error

    def fail(self, field: str, message: str) -> Exception:
        return self.error(f"{self.where}: field {field!r}: {message}")

    def int(self, data: dict, key: str, lo: int, hi: int, prefix: str = "") -> int | None:
        value = data.get(key)
        if value is None:
            if key in data and key not in _NULLABLE:
                raise self.fail(prefix + key, f"null; expected an integer in {lo}..{hi}")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(
                prefix + key, f"expected an integer in {lo}..{hi}, got {type(value).__name__} {_short(value)}"
            )
        if not lo <= value <= hi:
            raise self.fail(prefix + key, f"got {value}, allowed: {lo}..{hi}")
        return value

    def number(self, data: dict, key: str, lo: float, hi: float, prefix: str = "", open_lo: bool = False) -> None:
        if key not in data or data[key] is None:
            return
        value = data[key]
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if ok:
            value = float(value)
            ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
        if not ok:
            low = f"({lo:g}" if open_lo else f"[{lo:g}"
            raise self.fail(prefix + key, f"got {_short(data[key])}, expected a finite number in {low}, {hi:g}]")


def _check_rope(c: _Checker, rope: Any, field: str) -> None:
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise c.fail(field, f"expected a JSON object or null, got {type(rope).__name__}")
    if rope and all(isinstance(v, dict) for v in rope.values()):  # one set per attention type (Gemma 3)
        for name, sub in rope.items():
            _check_rope(c, sub, f"{field}.{name}")
        return
    prefix = field + "."
    kind = rope.get("rope_type", rope.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise c.fail(prefix + "rope_type", f"expected a string, got {_short(kind)}")
    c.number(rope, "rope_theta", 0.0, 1e12, prefix, open_lo=True)
    c.number(rope, "factor", 0.0, 1e6, prefix, open_lo=True)
    c.number(rope, "low_freq_factor", 0.0, 1e6, prefix, open_lo=True)
    c.number(rope, "high_freq_factor", 0.0, 1e6, prefix, open_lo=True)
    c.number(rope, "partial_rotary_factor", 0.0, 1.0, prefix, open_lo=True)
    c.int(rope, "original_max_position_embeddings", 1, MAX_POSITIONS, prefix)
    for key in ("short_factor", "long_factor"):  # LongRoPE: one factor per rotary frequency
        factors = rope.get(key)
        if factors is None:
            continue
        if not isinstance(factors, list) or len(factors) > MAX_HEAD_DIM:
            raise c.fail(prefix + key, f"expected a list of at most {MAX_HEAD_DIM} numbers")
        for i, f in enumerate(factors):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise c.fail(f"{prefix}{key}[{i}]", f"got {_short(f)}, expected a finite positive number")


def check_config(config: Any, where: str, *, error: type[Exception] = CheckpointError) -> Architecture:
    """Checks the architecture fields of ``config`` (a ``config.json`` dict or a transformers
    ``PretrainedConfig``) and returns their values; ``where`` (the file) starts each message.
    A ``text_config`` (multimodal models) is checked the same way, and its values are returned
    where the top level gives none."""
    data = _as_dict(config)
    c = _Checker(where, error)
    values: dict[str, int | None] = {}
    names: dict[str, str] = {}
    for quantity, keys in _ALIASES.items():
        values[quantity] = None
        lo, hi = _RANGES[quantity]
        for key in keys:
            if quantity == "ffn" and isinstance(data.get(key), list):  # one size per layer (Gemma 3n)
                sizes = data[key]
                for i in range(len(sizes)):
                    c.int({f"{key}[{i}]": sizes[i]}, f"{key}[{i}]", lo, hi)
                continue
            v = c.int(data, key, lo, hi)
            if v is not None and values[quantity] is None:
                values[quantity], names[quantity] = v, key
    if data.get("multi_query") is True and values["kv_heads"] is None:  # GPT-BigCode
        values["kv_heads"], names["kv_heads"] = 1, "multi_query"
    hidden, heads, kv, head_dim = values["hidden"], values["heads"], values["kv_heads"], values["head_dim"]
    # A config that sizes its heads some other way (MLA's qk_head_dim, Reformer's
    # attention_head_size) need not split the hidden size evenly.
    own_head_size = head_dim is not None or any(
        ("head_dim" in k or "head_size" in k) and data[k] is not None for k in data
    )
    if heads is not None and hidden is not None and not own_head_size:
        if hidden % heads:
            raise c.fail(
                names["heads"],
                f"{heads} heads do not divide {names['hidden']} = {hidden}; allowed: a divisor of {hidden} "
                f"(or a config that gives head_dim)",
            )
        if heads > hidden:
            raise c.fail(names["heads"], f"got {heads}, allowed: 1..{hidden} ({names['hidden']})")
    if kv is not None and heads is not None and (kv > heads or heads % kv):
        raise c.fail(names["kv_heads"], f"got {kv}; allowed: a divisor of {names['heads']} = {heads}")
    rope_used = any(data.get(k) is not None for k in (*_ROPE_FIELDS, "rope_theta"))
    if rope_used:
        dim = head_dim if head_dim is not None else (hidden // heads if hidden and heads else None)
        if dim is not None and dim % 2:
            field = "head_dim" if head_dim is not None else names["heads"]
            raise c.fail(field, f"the head dimension is {dim}; rotary embeddings need an even one")
    c.number(data, "rope_theta", 0.0, 1e12, open_lo=True)
    c.number(data, "partial_rotary_factor", 0.0, 1.0, open_lo=True)
    c.number(data, "rotary_pct", 0.0, 1.0, open_lo=True)
    if head_dim is not None or (hidden and heads):
        c.int(data, "rotary_dim", 1, head_dim if head_dim is not None else hidden // heads)
    for key in _ROPE_FIELDS:
        _check_rope(c, data.get(key), key)
    for key in _EPS_FIELDS:
        c.number(data, key, 0.0, 1.0)
    c.int(data, "sliding_window", 0, MAX_POSITIONS)
    for key in ("attention_layers", "layer_types"):
        kinds = data.get(key)
        if kinds is not None and values["layers"] is not None:
            if not isinstance(kinds, list) or len(kinds) != values["layers"]:
                got = f"{len(kinds)} entries" if isinstance(kinds, list) else type(kinds).__name__
                raise c.fail(key, f"got {got}, expected a list of one entry per layer ({values['layers']})")
    arch = Architecture(**values)
    text = data.get("text_config")
    if isinstance(text, dict):
        inner = check_config(text, f"{where} (text_config)", error=error)
        arch = Architecture(**{k: v if v is not None else getattr(inner, k) for k, v in values.items()})
    return arch


# ------------------------------------------------------------------ tensors against the config

_INDEXED = re.compile(r"^(.*?)\.(\d+)\.")


def layer_container(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, dict[int, list[str]]]:
    """The module list holding the layers (the prefix with the most numbered children, e.g.
    ``model.layers``) and, by layer index, the tensors under each of its layers."""
    by_prefix: dict[str, dict[int, list[str]]] = {}
    for name in shapes:
        m = _INDEXED.match(name)
        if m:
            by_prefix.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(name)
    if not by_prefix:
        return None, {}
    prefix = max(by_prefix, key=lambda p: (len(by_prefix[p]), sum(map(len, by_prefix[p].values()))))
    return prefix, by_prefix[prefix]


def check_layer_tensors(
    arch: Architecture,
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    weights: str,
    *,
    error: type[Exception] = CheckpointError,
) -> None:
    """Checks the tensor table (name -> shape) of the weights against the config: no tensor
    is empty, and the layer list holds exactly the layers the config names, each with at
    least a hidden-size vector's worth of values. ``where`` names the config, ``weights`` the
    weights files."""
    for name, shape in shapes.items():
        if math.prod(shape) == 0:
            raise error(
                f"{weights}: tensor {name!r} has shape {tuple(shape)}, which holds no values; no layer of a real model is empty"
            )
    if arch.layers is None:
        return
    prefix, layers = layer_container(shapes)
    if prefix is None:
        raise error(
            f"{where}: field 'num_hidden_layers': the config names {arch.layers} layers, but {weights} holds no "
            f"numbered layer tensors"
        )
    missing = [i for i in range(arch.layers) if i not in layers]
    extra = sorted(i for i in layers if i >= arch.layers)
    if missing or extra:
        problem = (
            f"layers {missing[:5]}{'...' if len(missing) > 5 else ''} have no tensors"
            if missing
            else f"it also holds layers {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
        raise error(
            f"{where}: field 'num_hidden_layers': the config names {arch.layers} layers, but in {weights} "
            f"{problem} ({prefix}.N); allowed: the layer count of the weights, {len(layers)}"
        )
    if arch.hidden is not None:
        for i in range(arch.layers):
            values = sum(math.prod(shapes[name]) for name in layers[i])
            if values < arch.hidden:
                raise error(
                    f"{weights}: layer {prefix}.{i} holds {values} values in all, fewer than one vector of "
                    f"hidden_size {arch.hidden}: the tensors do not fit the config"
                )


# ------------------------------------------------------------------ memory


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """What an address-space limit (``ulimit -v``) still allows this process to map."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable``, lowered to what an
    address-space limit leaves; None where neither is known."""
    known = [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(known) if known else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(needed: int, where: str, what: str, *, error: type[Exception] = CheckpointError) -> None:
    """Refuses a load that needs more than :func:`available_memory` (``what``: what needs it)."""
    free = available_memory()
    if free is not None and needed > free:
        raise error(
            f"{where}: {what} needs about {_gib(needed)}; this machine has {_gib(free)} available "
            f"(MemAvailable, or the process's address-space limit)"
        )


__all__ = [
    "MAX_FFN",
    "MAX_HEADS",
    "MAX_HEAD_DIM",
    "MAX_HIDDEN",
    "MAX_LAYERS",
    "MAX_POSITIONS",
    "MAX_VOCAB",
    "Architecture",
    "available_memory",
    "check_config",
    "check_layer_tensors",
    "check_memory",
    "layer_container",
]
