"""What a checkpoint's JSON files say (``qalora_config.json``, ``adapter_config.json``):
the file names and format versions, every field checked on reading (:class:`_Fields`; each
failure a :class:`~qalora.CheckpointError` naming the file and the field), the per-layer
description written on saving (:func:`_layer_meta`), and the tensors a layer description
implies (:func:`_layer_tensor_specs`), which are checked against the safetensors header
before any tensor is read.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..config import QALoRAConfig
from ..embeddings import quantized_embeddings, tied_heads
from ..errors import CheckpointError, ConfigError, QALoRAError
from ..layers import QALoRALinear, QuantEmbedding, QuantLinear, check_group_size, scale_dtype_of
from ..targets import quantized_layers

#: Version written; files of versions in READABLE_VERSIONS load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "qalora_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_FILES = frozenset({MODEL_WEIGHTS, MODEL_CONFIG, HF_CONFIG, GENERATION_CONFIG})
ADAPTER_FILES = frozenset({ADAPTER_WEIGHTS, ADAPTER_CONFIG})

#: Cap that keeps a hostile file from exhausting memory before it is validated (the largest
#: in_features / out_features a layer description may give).
MAX_FEATURES = 1 << 31

_FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_LAYER_TYPES = ("QuantLinear", "QALoRALinear", "QuantEmbedding")
# Factored group parameters (QuantLinear.factor_): the integers' dtypes ("shared": the
# offsets reuse the scales' integers).
_INT_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}
_ADAPTERS = ("qalora", "lora")


def _version() -> str:
    from .. import _core

    return _core.__version__


def _supported_bits() -> tuple[int, ...]:
    from ..ops import SUPPORTED_BITS

    return tuple(SUPPORTED_BITS)


class _Fields:
    """Validates fields of one JSON file; every failure names the file and the field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: field {field!r}: {message}")

    def get(self, obj: dict, key: str, field: str, default: Any = ...) -> Any:
        if key not in obj:
            if default is ...:
                raise self.fail(field, "missing")
            return default
        return obj[key]

    def int(self, value: Any, field: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"expected an integer, got {type(value).__name__} {_short(value)}")
        if not lo <= value <= hi:
            raise self.fail(field, f"got {value}, allowed: {lo}..{hi}")
        return value

    def bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {_short(value)}")
        return value

    def choice(self, value: Any, field: str, allowed) -> Any:
        if isinstance(value, bool) or value not in allowed or type(value) not in {type(a) for a in allowed}:
            raise self.fail(field, f"got {_short(value)}, allowed: {', '.join(map(repr, allowed))}")
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"expected a finite number, got {_short(value)}")
        return float(value)

    def str(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {type(value).__name__} {_short(value)}")
        return value

    def dict(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected a JSON object, got {type(value).__name__}")
        return value

    def header(self, data: dict, fmt: str) -> int:
        got = self.get(data, "format", "format")
        if got != fmt:
            raise self.fail("format", f"got {_short(got)}, expected {fmt!r} (is this a {fmt} file?)")
        version = self.get(data, "format_version", "format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_VERSIONS):
            raise self.fail(
                "format_version", f"got {version}; this qalora reads versions {READABLE_VERSIONS} (upgrade qalora)"
            )
        return self.choice(version, "format_version", READABLE_VERSIONS)

    def config(self, data: dict) -> QALoRAConfig:
        raw = self.dict(self.get(data, "config", "config"), "config")
        try:
            return QALoRAConfig.from_dict(raw)
        except (ConfigError, TypeError) as e:
            raise self.fail("config", str(e)) from None

    def files(self, data: dict) -> dict[str, dict]:
        files = self.dict(self.get(data, "files", "files"), "files")
        for name, entry in files.items():
            field = f"files.{name}"
            if not name or name != os.path.basename(name) or name in (".", ".."):
                raise self.fail(field, "a file name must be a plain name inside the directory")
            entry = self.dict(entry, field)
            self.int(self.get(entry, "bytes", field + ".bytes"), field + ".bytes", 0, 1 << 62)
            digest = self.str(self.get(entry, "sha256", field + ".sha256"), field + ".sha256")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise self.fail(field + ".sha256", "expected 64 lowercase hex digits")
        return files

    def layer(self, name: Any, meta: Any) -> dict:
        field = f"layers.{name}"
        if not isinstance(name, str) or not name or any(not part for part in name.split(".")):
            raise self.fail(field, "a layer name must be a dotted module path")
        meta = self.dict(meta, field)
        out = {"type": self.choice(self.get(meta, "type", field + ".type"), field + ".type", _LAYER_TYPES)}
        for key in ("in_features", "out_features"):
            out[key] = self.int(self.get(meta, key, f"{field}.{key}"), f"{field}.{key}", 1, MAX_FEATURES)
        out["bits"] = self.choice(self.get(meta, "bits", field + ".bits"), field + ".bits", _supported_bits())
        out["group_size"] = self.int(
            self.get(meta, "group_size", field + ".group_size"), field + ".group_size", 1, out["in_features"]
        )
        try:
            check_group_size(out["in_features"], out["bits"], out["group_size"], name)
        except QALoRAError as e:
            raise self.fail(field + ".group_size", str(e)) from None
        out["bias"] = self.bool(self.get(meta, "bias", field + ".bias"), field + ".bias")
        out["scale_dtype"] = self.choice(
            self.get(meta, "scale_dtype", field + ".scale_dtype"), field + ".scale_dtype", _FLOAT_DTYPES
        )
        out["offset_dtype"] = self.choice(
            self.get(meta, "offset_dtype", field + ".offset_dtype", out["scale_dtype"]),
            field + ".offset_dtype",
            _FLOAT_DTYPES,
        )
        if out["type"] == "QuantEmbedding":
            # in_features = embedding_dim, out_features = vocabulary size (a tied head's view)
            if out["bias"]:
                raise self.fail(field + ".bias", "an embedding has no bias; expected false")
            out["dtype"] = self.choice(self.get(meta, "dtype", field + ".dtype"), field + ".dtype", _FLOAT_DTYPES)
            pad = self.get(meta, "padding_idx", field + ".padding_idx", None)
            out["padding_idx"] = (
                None if pad is None else self.int(pad, field + ".padding_idx", 0, out["out_features"] - 1)
            )
        if "factored" in meta:
            out["factored"] = self.factored(meta["factored"], field + ".factored", out)
        if "tied_to" in meta:
            if "factored" in out:
                raise self.fail(
                    field + ".factored", "a tied head holds the embedding's tensors, which are not factored"
                )
            if out["type"] != "QuantLinear":
                raise self.fail(field + ".tied_to", f"only a QuantLinear head can be tied, this is a {out['type']}")
            out["tied_to"] = self.str(meta["tied_to"], field + ".tied_to")
        if out["type"] == "QALoRALinear":
            out["adapter"] = self.choice(self.get(meta, "adapter", field + ".adapter"), field + ".adapter", _ADAPTERS)
            out["rank"] = self.int(self.get(meta, "rank", field + ".rank"), field + ".rank", 1, MAX_FEATURES)
            out["alpha"] = self.number(self.get(meta, "alpha", field + ".alpha"), field + ".alpha")
            for key in ("train_scales", "train_offsets"):  # absent in files of earlier releases
                out[key] = self.bool(self.get(meta, key, f"{field}.{key}", False), f"{field}.{key}")
        return out

    def factored(self, value: Any, field: str, layer: dict) -> dict:
        """A factored layer's description: groups per float16 factor (dividing a row's
        groups) and the dtypes of the scale and offset integers."""
        if layer["type"] == "QuantEmbedding":
            raise self.fail(field, "an embedding table is not held factored")
        value = self.dict(value, field)
        groups = layer["in_features"] // layer["group_size"]
        per_field = field + ".groups_per_factor"
        per = self.int(self.get(value, "groups_per_factor", per_field), per_field, 1, groups)
        if groups % per:
            raise self.fail(
                field + ".groups_per_factor", f"got {per}, which does not divide the {groups} groups of a row"
            )
        scale_ints = self.choice(
            self.get(value, "scale_ints", field + ".scale_ints"), field + ".scale_ints", tuple(_INT_DTYPES)
        )
        offset_ints = self.choice(
            self.get(value, "offset_ints", field + ".offset_ints"), field + ".offset_ints", (*_INT_DTYPES, "shared")
        )
        return {"groups_per_factor": per, "scale_ints": scale_ints, "offset_ints": offset_ints}

    def layers(self, data: dict) -> dict[str, dict]:
        raw = self.dict(self.get(data, "layers", "layers"), "layers")
        layers = {name: self.layer(name, meta) for name, meta in raw.items()}
        for name, meta in layers.items():
            if "tied_to" in meta:
                self.tie(name, meta, layers)
        return layers

    def tie(self, name: str, meta: dict, layers: dict) -> None:
        """A head tied to a quantized embedding holds the table's tensors: same layout."""
        field = f"layers.{name}.tied_to"
        table = layers.get(meta["tied_to"])
        if table is None or table["type"] != "QuantEmbedding":
            raise self.fail(field, f"{_short(meta['tied_to'])} is not a QuantEmbedding layer of this file")
        for key in ("in_features", "out_features", "bits", "group_size", "scale_dtype", "offset_dtype"):
            if meta[key] != table[key]:
                raise self.fail(
                    field, f"the head has {key} = {meta[key]!r}, the embedding {meta['tied_to']!r} has {table[key]!r}"
                )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validate_model_config(data: dict, path: str) -> dict:
    f = _Fields(path)
    version = f.header(data, "qalora")
    out = {
        "version": version,
        "config": f.config(data),
        "merged": f.bool(f.get(data, "merged", "merged", False), "merged"),
        "layers": f.layers(data),
        "files": f.files(data) if version >= 2 else None,
    }
    skipped = f.get(data, "skipped", "skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(s, str) for s in skipped):
        raise f.fail("skipped", "expected a list of layer names")
    out["skipped"] = list(skipped)
    source = f.get(data, "source", "source", {})
    out["source"] = f.dict(source if source is not None else {}, "source")
    if out["merged"] and any(m["type"] == "QALoRALinear" for m in out["layers"].values()):
        raise f.fail("merged", "true, but layers still hold adapters")
    tied = f.dict(f.get(data, "tied", "tied", {}), "tied")
    for k, v in tied.items():
        f.str(v, f"tied.{k}")
    out["tied"] = tied
    arch = f.get(data, "architecture", "architecture", None)
    if arch is not None:
        arch = f.dict(arch, "architecture")
        f.choice(f.get(arch, "library", "architecture.library"), "architecture.library", ("transformers",))
        f.str(f.get(arch, "class", "architecture.class"), "architecture.class")
    out["architecture"] = arch
    tok = f.get(data, "tokenizer_files", "tokenizer_files", [])
    if not isinstance(tok, list) or not all(isinstance(t, str) for t in tok):
        raise f.fail("tokenizer_files", "expected a list of file names")
    if out["files"] is not None and any(t not in out["files"] for t in tok):
        raise f.fail("tokenizer_files", "names a file the manifest ('files') does not list")
    out["tokenizer_files"] = tok
    return out


def _validate_adapter_config(data: dict, path: str) -> dict:
    f = _Fields(path)
    version = f.header(data, "qalora-adapter")
    layers = f.layers(data)
    for name, meta in layers.items():
        if meta["type"] != "QALoRALinear":
            raise f.fail(f"layers.{name}.type", f"got {meta['type']!r}; an adapter file describes QALoRALinear layers")
    norms = f.dict(f.get(data, "norms", "norms", {}), "norms")
    for key, shape in norms.items():
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_FEATURES for d in shape)
        ):
            raise f.fail(f"norms.{key}", f"got {_short(shape)}, expected a list of positive sizes")
    return {
        "config": f.config(data),
        "layers": layers,
        "files": f.files(data) if version >= 2 else None,
        "norms": list(norms),
    }


def _layer_tensor_specs(name: str, meta: dict) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Tensors a layer holds: key -> (dtype or "float", shape)."""
    in_f, out_f, g = meta["in_features"], meta["out_features"], meta["group_size"]
    prefix = f"{name}.base_layer." if meta["type"] == "QALoRALinear" else f"{name}."
    if "tied_to" in meta:  # its codes are the embedding's, stored (and checked) under that name
        return {prefix + "bias": ("float", (out_f,))} if meta["bias"] else {}
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {
        prefix + "packed": (torch.uint8, (out_f, in_f * meta["bits"] // 8))
    }
    factored = meta.get("factored")
    if factored is None:
        specs[prefix + "scales"] = (scale_dtype_of(meta["scale_dtype"]), (out_f, in_f // g))
        specs[prefix + "offsets"] = (scale_dtype_of(meta["offset_dtype"]), (out_f, in_f // g))
    else:
        factors = (out_f, in_f // g // factored["groups_per_factor"])
        specs[prefix + "sub_scales"] = (_INT_DTYPES[factored["scale_ints"]], (out_f, in_f // g))
        specs[prefix + "super_scales"] = (torch.float16, factors)
        if factored["offset_ints"] != "shared":
            specs[prefix + "sub_offsets"] = (_INT_DTYPES[factored["offset_ints"]], (out_f, in_f // g))
        specs[prefix + "super_offsets"] = (torch.float16, factors)
    if meta["bias"]:
        specs[prefix + "bias"] = ("float", (out_f,))
    if meta["type"] == "QALoRALinear":
        adapter_in = in_f // g if meta["adapter"] == "qalora" else in_f
        specs[f"{name}.lora_A.weight"] = ("float", (meta["rank"], adapter_in))
        specs[f"{name}.lora_B.weight"] = ("float", (out_f, meta["rank"]))
        for key in ("scales", "offsets"):  # trained group parameters
            if meta.get(f"train_{key}"):
                specs[f"{name}.delta_{key}"] = ("float", (out_f, in_f // g))
    return specs


def factored_meta(layer: QuantLinear) -> dict:
    """How a factored layer's parameters are held (the "factored" entry of its description)."""
    _, scale_ints, offset_ints, scale_factors, _ = layer.kernel_weight()
    dtype_name = {v: k for k, v in _INT_DTYPES.items()}
    return {
        "groups_per_factor": scale_ints.shape[1] // scale_factors.shape[1],
        "scale_ints": dtype_name[scale_ints.dtype],
        "offset_ints": "shared" if offset_ints is scale_ints else dtype_name[offset_ints.dtype],
    }


def factored_buffers(meta: dict, device=None) -> tuple:
    """Empty tensors for QuantLinear.factor_ as a layer description's "factored" entry says."""
    out_f, groups = meta["out_features"], meta["in_features"] // meta["group_size"]
    factored = meta["factored"]
    factors = (out_f, groups // factored["groups_per_factor"])

    def ints(name):
        return torch.empty(out_f, groups, dtype=_INT_DTYPES[name], device=device)

    offsets = None if factored["offset_ints"] == "shared" else ints(factored["offset_ints"])
    half = dict(dtype=torch.float16, device=device)
    return ints(factored["scale_ints"]), torch.empty(factors, **half), offsets, torch.empty(factors, **half)


def _layer_meta(layer: nn.Module) -> dict:
    base = layer.base_layer if isinstance(layer, QALoRALinear) else layer
    meta = {
        "type": type(layer).__name__,
        "in_features": base.in_features,
        "out_features": base.out_features,
        "bits": base.bits,
        "group_size": base.group_size,
        "bias": getattr(base, "bias", None) is not None,
        "scale_dtype": str(base.param_dtypes[0]).replace("torch.", ""),
        "offset_dtype": str(base.param_dtypes[1]).replace("torch.", ""),
    }
    if isinstance(base, QuantLinear) and base.is_factored:
        meta["factored"] = factored_meta(base)
    if isinstance(layer, QALoRALinear):
        meta.update(adapter=layer.adapter, rank=layer.rank, alpha=layer.alpha)
        # Written only when set, so files without trained group parameters stay readable by
        # releases that predate them.
        if layer.delta_scales is not None:
            meta["train_scales"] = True
        if layer.delta_offsets is not None:
            meta["train_offsets"] = True
    if isinstance(layer, QuantEmbedding):
        meta.update(dtype=str(layer.dtype).replace("torch.", ""), padding_idx=layer.padding_idx)
    return meta


def _model_layer_metas(model: nn.Module) -> dict[str, dict]:
    """Every quantized layer's metadata, quantized embeddings and tied heads included."""
    layers = {name: _layer_meta(layer) for name, layer in quantized_layers(model)}
    layers.update({name: _layer_meta(table) for name, table in quantized_embeddings(model)})
    for head, table in tied_heads(model).items():
        layers[head]["tied_to"] = table
    return layers
