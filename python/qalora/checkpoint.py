"""Checkpoints: a whole quantized model, or its adapters alone (safetensors + JSON, no pickle).

* :func:`save_pretrained` / :func:`from_pretrained`: a self-contained model directory:
  ``model.safetensors`` + ``qalora_config.json`` (qalora's config, the per-layer layout, a
  manifest of every file with its size and SHA-256), plus, for a Hugging Face model, its
  ``config.json`` / ``generation_config.json`` and the tokenizer files, so that
  ``from_pretrained(directory)`` alone rebuilds a ready model.
* :func:`save_adapter` / :func:`load_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json``.

Saves are atomic as a whole: the directory is written beside the target and swapped in
(:func:`qalora.io.atomic_directory`), so a crash leaves the complete old or the complete new
checkpoint. Loads treat the directory as untrusted input: regular files only, no symlink
out of the directory, size-capped JSON, every field checked against the schema below and
every tensor's declared dtype and shape checked before any tensor is read, files checked
against the manifest, float tensors checked finite. Every failure is a
:class:`~qalora.CheckpointError` naming the file and the field. Loaders check everything
before they change the caller's model, so a refused load leaves it as it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import QALoRAConfig
from .embeddings import quantized_embeddings, tied_heads
from .errors import AdapterMismatchError, CheckpointError, ConfigError, QALoRAError, QALoRAWarning
from .io import DirectoryError, atomic_directory, recover_directory
from .layers import QALoRALinear, QuantEmbedding, QuantLinear, check_group_size, scale_dtype_of
from .state import QALoRAState, attach_state, config_of, require_state, state_of
from .targets import dense_weight, linear_like_modules, quantized_layers, replace_module
from .wrapping import norm_parameters

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

#: Caps that keep a hostile file from exhausting memory before it is validated.
MAX_JSON_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20
MAX_FEATURES = 1 << 31

_FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_LAYER_TYPES = ("QuantLinear", "QALoRALinear", "QuantEmbedding")
_ADAPTERS = ("qalora", "lora")
# safetensors dtype names -> torch dtypes (the ones a qalora model can hold).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _version() -> str:
    from . import _core

    return _core.__version__


def _supported_bits() -> tuple[int, ...]:
    from .ops import SUPPORTED_BITS

    return tuple(SUPPORTED_BITS)


# ---------------------------------------------------------------- reading untrusted files


def _checkpoint_dir(directory) -> str:
    directory = recover_directory(os.path.realpath(os.fspath(directory)))
    if not os.path.exists(directory):
        raise CheckpointError(f"{directory} does not exist")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    return directory


def _safe_file(directory: str, name: str, what: str) -> str:
    """The real path of ``directory/name``, which must be a regular file inside
    ``directory`` (a symlink may point elsewhere inside it, never out of it)."""
    path = os.path.join(directory, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} ({what}) does not exist; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{path} ({what}): cannot read it: {e.strerror}") from None
    real = path
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)
        if os.path.commonpath([real, directory]) != directory:
            raise CheckpointError(f"{path} ({what}) is a symlink out of the checkpoint directory (to {real})")
        try:
            st = os.stat(real)
        except OSError as e:
            raise CheckpointError(f"{path} ({what}) is a dangling symlink: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} ({what}) is not a regular file")
    return real


@contextmanager
def _open_regular(path: str, what: str) -> Iterator[Any]:
    # O_NONBLOCK: a FIFO swapped in after the check does not block the open; fstat then
    # refuses it.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path} ({what}): cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} ({what}) is not a regular file")
        yield f


def _read_json_file(directory: str, name: str, what: str) -> dict:
    path = _safe_file(directory, name, what)
    with _open_regular(path, what) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} ({what}) is larger than {MAX_JSON_BYTES >> 20} MiB; not a qalora file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}): expected a JSON object, got {type(data).__name__}")
    return data


def _scan_directory(directory: str) -> None:
    """Refuses special files (FIFOs, devices, sockets) and symlinks out of the directory
    anywhere at its top level: other readers (e.g. a tokenizer loader) would follow them."""
    try:
        entries = os.listdir(directory)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot list it: {e.strerror}") from None
    for entry in entries:
        path = os.path.join(directory, entry)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            _safe_file(directory, entry, "checkpoint entry")


def _sha256(path: str, what: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with _open_regular(path, what) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _manifest(directory: str) -> dict[str, dict]:
    files = {}
    for name in sorted(os.listdir(directory)):
        size, digest = _sha256(os.path.join(directory, name), name)
        files[name] = {"bytes": size, "sha256": digest}
    return files


def _verify_manifest(directory: str, files: dict[str, dict], config_name: str) -> None:
    for name, entry in files.items():
        path = _safe_file(directory, name, f"listed in {config_name}")
        size, digest = _sha256(path, name)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: {size} bytes with sha256 {digest[:16]}..., but {config_name} field 'files.{name}' "
                f"records {entry['bytes']} bytes with sha256 {entry['sha256'][:16]}...: the file is damaged "
                f"or was changed after the save"
            )


# ---------------------------------------------------------------- schema of the JSON files


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
        if "tied_to" in meta:
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


# ---------------------------------------------------------------- safetensors, checked first


def _read_header(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parses a safetensors header without reading any tensor: name -> (dtype, shape).
    Offsets must tile the data area exactly as the dtypes and shapes say."""
    with _open_regular(path, "safetensors") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    spans = []
    f_ = _Fields(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        field = f"tensor {name}"
        entry = f_.dict(entry, field)
        dtype_name = f_.get(entry, "dtype", field + ".dtype")
        if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
            raise f_.fail(field + ".dtype", f"got {_short(dtype_name)}, allowed: {', '.join(_ST_DTYPES)}")
        shape = f_.get(entry, "shape", field + ".shape")
        if not isinstance(shape, list) or len(shape) > 8:
            raise f_.fail(field + ".shape", f"expected a list of at most 8 sizes, got {_short(shape)}")
        shape = tuple(f_.int(d, field + ".shape", 0, 1 << 40) for d in shape)
        offsets = f_.get(entry, "data_offsets", field + ".data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise f_.fail(field + ".data_offsets", "expected [begin, end]")
        begin, end = (f_.int(o, field + ".data_offsets", 0, data_len) for o in offsets)
        dtype = _ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise f_.fail(field + ".data_offsets", f"spans {end - begin} bytes; dtype and shape need {nbytes}")
        spans.append((begin, end))
        out[name] = (dtype, shape)
    spans.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        raise CheckpointError(f"{path}: tensors overlap in the data area")
    return out


def _layer_tensor_specs(name: str, meta: dict) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Tensors a layer holds: key -> (dtype or "float", shape)."""
    in_f, out_f, g = meta["in_features"], meta["out_features"], meta["group_size"]
    prefix = f"{name}.base_layer." if meta["type"] == "QALoRALinear" else f"{name}."
    if "tied_to" in meta:  # its codes are the embedding's, stored (and checked) under that name
        return {prefix + "bias": ("float", (out_f,))} if meta["bias"] else {}
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {
        prefix + "packed": (torch.uint8, (out_f, in_f * meta["bits"] // 8)),
        prefix + "scales": (scale_dtype_of(meta["scale_dtype"]), (out_f, in_f // g)),
        prefix + "offsets": (scale_dtype_of(meta["offset_dtype"]), (out_f, in_f // g)),
    }
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


def _check_declared(header: dict, specs: dict, path: str, config_name: str) -> None:
    for key, (dtype, shape) in specs.items():
        if key not in header:
            raise CheckpointError(f"{path}: tensor {key!r} (a layer {config_name} describes) is missing")
        got_dtype, got_shape = header[key]
        ok_dtype = got_dtype.is_floating_point if dtype == "float" else got_dtype == dtype
        if not ok_dtype or got_shape != shape:
            want = "a float dtype" if dtype == "float" else str(dtype)
            raise CheckpointError(
                f"{path}: tensor {key!r} is declared {got_dtype} of shape {got_shape}; {config_name} "
                f"implies {want} of shape {shape}"
            )


def _load_tensors(path: str, header: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{path}: cannot read it as safetensors: {e}") from None
    if set(tensors) != set(header):
        raise CheckpointError(f"{path}: the tensors read differ from those its header declares")
    for key, t in tensors.items():
        if (t.dtype, tuple(t.shape)) != header[key]:
            raise CheckpointError(f"{path}: tensor {key!r} read as {t.dtype} {tuple(t.shape)}, declared {header[key]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values (NaN or Inf)")
    return tensors


# ---------------------------------------------------------------- saving


def _layer_meta(layer: nn.Module) -> dict:
    base = layer.base_layer if isinstance(layer, QALoRALinear) else layer
    meta = {
        "type": type(layer).__name__,
        "in_features": base.in_features,
        "out_features": base.out_features,
        "bits": base.bits,
        "group_size": base.group_size,
        "bias": getattr(base, "bias", None) is not None,
        "scale_dtype": str(base.scales.dtype).replace("torch.", ""),
        "offset_dtype": str(base.offsets.dtype).replace("torch.", ""),
    }
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


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (tied embeddings / LM head), as
    contiguous CPU tensors that share no memory, and {dropped name: kept name}."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages = set()
    for key, t in model.state_dict().items():
        ident = (t.device, t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.device)
        if t.numel() and storage in storages:
            t = t.clone()  # another view of a stored tensor's memory
        storages.add(storage)
        kept[key] = t
    return kept, tied


def _architecture_of(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_json_string"):
        return {"library": "transformers", "class": type(model).__name__}
    return None


def _remembered_tokenizer(model: nn.Module):
    """The tokenizer a loader recorded in the model's state (a directory), if still there."""
    state = state_of(model)
    path = state.source.get("tokenizer") if state is not None else None
    if not isinstance(path, str) or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        warnings.warn(
            f"could not reload the tokenizer from {path} ({e}); saving without it", QALoRAWarning, stacklevel=3
        )
        return None


def _old_manifest_files(directory: str, config_name: str) -> set[str]:
    """Files the checkpoint already in ``directory`` lists (they are replaced, not kept)."""
    try:
        data = _read_json_file(os.path.realpath(directory), config_name, "previous checkpoint")
    except (CheckpointError, OSError):
        return set()
    files = data.get("files")
    return set(files) if isinstance(files, dict) else set()


def _save_directory(directory, owned: set[str], write) -> None:
    try:
        with atomic_directory(directory, keep=lambda name: name not in owned) as tmp:
            write(tmp)
    except DirectoryError as e:
        raise CheckpointError(f"cannot save into {os.fspath(directory)}: {e}") from None


def save_pretrained(model: nn.Module, directory, *, tokenizer=None) -> None:
    """Save the whole quantized model (merged or with adapters) as a self-contained directory.

    Writes ``model.safetensors`` (tied tensors once) and ``qalora_config.json`` (qalora's
    config, each quantized layer's layout, a manifest of every file with its size and
    SHA-256), and for a Hugging Face model its ``config.json`` (and
    ``generation_config.json``) plus the tokenizer files: those of ``tokenizer`` or, without
    it, of the tokenizer the model was loaded with through :func:`qalora.load_model`.
    Dense tensors (embeddings, norms, an unquantized head) are stored in the dtype the model
    holds them in.

    The directory is written beside ``directory`` and swapped in as a whole: a crash leaves
    the complete old or the complete new checkpoint. Files in an existing ``directory`` that
    are not part of a model checkpoint (an adapter saved there, say) are kept.

    Restore it with :func:`from_pretrained` (``from_pretrained(directory)`` alone for a
    Hugging Face model). Raises :class:`CheckpointError` if ``directory`` cannot be
    replaced (a file, or a directory holding subdirectories).
    """
    state = require_state(model)
    layers = _model_layer_metas(model)
    arch = _architecture_of(model)
    tok = tokenizer if tokenizer is not None else _remembered_tokenizer(model)
    tensors, tied = _unique_state(model)
    _table_first(tensors, tied, model)
    owned = set(MODEL_FILES) | _old_manifest_files(directory, MODEL_CONFIG)

    def write(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, MODEL_WEIGHTS), metadata={"format": "qalora"})
        if arch is not None:
            model.config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(model, "can_generate", lambda: False)():
                gen.save_pretrained(tmp)
        tokenizer_files: list[str] = []
        if tok is not None:
            before = set(os.listdir(tmp))
            tok.save_pretrained(tmp)
            tokenizer_files = sorted(set(os.listdir(tmp)) - before)
        source = dict(state.source)
        source.pop("tokenizer", None)  # a loader's local path: the saved copy replaces it
        data = {
            "format": "qalora",
            "format_version": FORMAT_VERSION,
            "qalora_version": _version(),
            "config": config_of(model).to_dict(),
            "merged": state.merged,
            "skipped": list(state.skipped),
            "source": source,
            "architecture": arch,
            "tied": tied,
            "tokenizer_files": tokenizer_files,
            "layers": layers,
            "files": _manifest(tmp),
        }
        with open(os.path.join(tmp, MODEL_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    _save_directory(directory, owned, write)


# ---------------------------------------------------------------- loading a model


def _build_layer(meta: dict, device) -> nn.Module:
    if meta["type"] == "QuantEmbedding":
        return QuantEmbedding(
            meta["out_features"],
            meta["in_features"],
            meta["bits"],
            meta["group_size"],
            scale_dtype_of(meta["scale_dtype"]),
            device,
            offset_dtype=scale_dtype_of(meta["offset_dtype"]),
            dtype=scale_dtype_of(meta["dtype"]),
            padding_idx=meta["padding_idx"],
        )
    base = QuantLinear(
        meta["in_features"],
        meta["out_features"],
        meta["bits"],
        meta["group_size"],
        meta["bias"],
        scale_dtype_of(meta["scale_dtype"]),
        device,
        offset_dtype=scale_dtype_of(meta["offset_dtype"]),
    )
    if meta["type"] == "QALoRALinear":
        return QALoRALinear(
            base,
            meta["rank"],
            meta["alpha"],
            0.0,
            meta["adapter"],
            train_scales=meta.get("train_scales", False),
            train_offsets=meta.get("train_offsets", False),
        )
    return base


def _layer_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Where a checkpoint's layers may go: the linear-like modules and the embeddings."""
    sites = dict(linear_like_modules(model))
    sites.update((n, m) for n, m in model.named_modules() if n and isinstance(m, (nn.Embedding, QuantEmbedding)))
    return sites


def _site_kind(meta: dict) -> str:
    return "token embedding" if meta["type"] == "QuantEmbedding" else "linear layer"


def _site(sites: dict[str, nn.Module], name: str, meta: dict) -> nn.Module | None:
    module = sites.get(name)
    is_table = isinstance(module, (nn.Embedding, QuantEmbedding))
    return module if module is not None and is_table == (meta["type"] == "QuantEmbedding") else None


def _fitting_site(sites: dict[str, nn.Module], name: str, meta: dict, error) -> nn.Module:
    """The module a checkpoint layer goes to, checked for kind and (in, out); ``error(msg)``
    makes the exception each caller raises (the one-argument form blames the file, the
    two-argument form the model)."""
    module = _site(sites, name, meta)
    if module is None:
        raise error(f"the model has no {_site_kind(meta)} there")
    out_f, in_f = _site_shape(module)
    if (in_f, out_f) != (meta["in_features"], meta["out_features"]):
        raise error(
            f"(in, out) = ({meta['in_features']}, {meta['out_features']}) in the checkpoint, ({in_f}, {out_f}) in the model"
        )
    return module


def _site_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer site; an embedding's (vocabulary, dimension)."""
    if isinstance(module, QuantEmbedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Embedding):
        return tuple(module.weight.shape)
    return tuple(dense_weight(module)[0].shape)


def _tie_heads(model: nn.Module, layers: dict[str, dict]) -> None:
    """Makes each head recorded as tied hold its embedding's tensors (the same objects)."""
    for name, meta in layers.items():
        if "tied_to" in meta:
            model.get_submodule(meta["tied_to"]).share_into(model.get_submodule(name))


def _table_first(tensors: dict[str, torch.Tensor], tied: dict[str, str], model: nn.Module) -> None:
    """Stores a tied head's codes under the embedding's name (where the loader looks)."""
    for head, table in tied_heads(model).items():
        for part in ("packed", "scales", "offsets"):
            h, t = f"{head}.{part}", f"{table}.{part}"
            if h in tensors and tied.get(t) == h:
                tensors[t] = tensors.pop(h)
                del tied[t]
                tied[h] = t


def _storage_groups(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """For each state-dict name, every name sharing its storage (tied weights such as the
    embeddings and LM head: a safetensors file holds only one of them)."""
    by_storage: dict[tuple, list] = {}
    for key, t in state.items():
        by_storage.setdefault((t.device, t.data_ptr(), t.numel(), t.dtype), []).append(key)
    return {key: names for names in by_storage.values() for key in names}


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
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


#: Largest integer a Hugging Face config.json may hold here (sizes, ids, lengths): a hostile
#: config must not make the architecture allocate a huge buffer while it is built.
MAX_CONFIG_INT = 1 << 24


def _bound_config_ints(value: Any, path: str, field: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _bound_config_ints(v, path, f"{field}.{k}" if field else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _bound_config_ints(v, path, f"{field}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        raise CheckpointError(f"{path}: field {field!r}: got {value}, larger than any real model's ({MAX_CONFIG_INT})")


def _layer_count_bound(hf_config: dict, n_tensors: int, path: str) -> None:
    # A hostile config asking for 10**6 layers would take long to build even on the meta
    # device; a real model stores at least one tensor per layer.
    _bound_config_ints(hf_config, path)
    for cfg in (hf_config, hf_config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= n_tensors:
                raise CheckpointError(f"{path}: field {key!r}: got {v}, but the weights hold only {n_tensors} tensors")


def _build_architecture(directory: str, meta: dict, n_tensors: int) -> nn.Module:
    cfg_path = os.path.join(directory, HF_CONFIG)
    arch = meta["architecture"]
    if arch is None and os.path.lexists(cfg_path):  # format 1: the class is in config.json
        archs = _read_json_file(directory, HF_CONFIG, "Hugging Face config").get("architectures")
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
    hf_config = _read_json_file(directory, HF_CONFIG, "Hugging Face config")
    _layer_count_bound(hf_config, n_tensors, cfg_path)
    try:
        config = cls.config_class.from_dict(hf_config)
        with _parameters_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls._from_config(config)
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


def _set_trainable(model: nn.Module, config: QALoRAConfig | None = None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in quantized_layers(model, QALoRALinear):
        for p in _adapter_parameters(layer).values():
            p.requires_grad_(True)
    if config is not None and config.train_norms and any(True for _ in quantized_layers(model, QALoRALinear)):
        for p in norm_parameters(model):
            p.requires_grad_(True)


def from_pretrained(directory, base_model: nn.Module | None = None, *, dropout: float | None = None) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`.

    ``from_pretrained(directory)`` rebuilds a Hugging Face model from the directory alone
    (its ``config.json``; parameters are created on the meta device and replaced by the
    checkpoint's tensors, so no dense random initialisation happens) and returns it in eval
    mode, bit-exact to the model saved. ``from_pretrained(directory, base_model)`` loads into
    a fresh instance of the same architecture (any ``nn.Module``; its weights are replaced).

    Every file is checked first (see the module docs): a refused load raises before
    ``base_model`` changes. ``dropout`` sets the adapters' dropout for further training.

    Raises:
        CheckpointError: a file is missing, damaged, of another format, or fails validation.
        AdapterMismatchError: the checkpoint does not fit ``base_model``.
    """
    directory = _checkpoint_dir(directory)
    _scan_directory(directory)
    cfg_path = os.path.join(directory, MODEL_CONFIG)
    meta = _validate_model_config(_read_json_file(directory, MODEL_CONFIG, "qalora model config"), cfg_path)
    if meta["files"] is not None:
        _verify_manifest(directory, meta["files"], MODEL_CONFIG)
    weights = _safe_file(directory, MODEL_WEIGHTS, "model weights")
    header = _read_header(weights)
    for name, layer_meta in meta["layers"].items():
        _check_declared(header, _layer_tensor_specs(name, layer_meta), weights, MODEL_CONFIG)
    if base_model is None:
        model = _build_architecture(directory, meta, len(header))
        present = _layer_sites(model)
        for name, layer_meta in meta["layers"].items():
            _fitting_site(
                present,
                name,
                layer_meta,
                lambda msg, name=name: CheckpointError(f"{cfg_path}: field 'layers.{name}': {msg}"),
            )
        tensors = _load_tensors(weights, header)
        for name, layer_meta in meta["layers"].items():
            layer = _build_layer(layer_meta, "meta")
            if dropout and isinstance(layer, QALoRALinear):
                layer.lora_dropout = nn.Dropout(dropout)
            replace_module(model, name, layer)
        _tie_heads(model, meta["layers"])
        _assign_tensors(model, tensors, meta["tied"], weights)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise CheckpointError(f"{weights}: no value for {leftover[:10]}")
        gen_path = os.path.join(directory, GENERATION_CONFIG)
        if os.path.lexists(gen_path) and hasattr(model, "generation_config"):
            from transformers import GenerationConfig

            try:
                model.generation_config = GenerationConfig.from_dict(
                    _read_json_file(directory, GENERATION_CONFIG, "generation config")
                )
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{gen_path}: not a generation config: {e}") from None
        model.eval()
    else:
        tensors = _load_tensors(weights, header)
        model = _load_into(base_model, meta, tensors, weights, dropout)
    _set_trainable(model, meta["config"])
    source = dict(meta["source"])
    if meta["tokenizer_files"]:
        source["tokenizer"] = directory
    attach_state(
        model, QALoRAState(config=meta["config"], merged=meta["merged"], skipped=meta["skipped"], source=source)
    )
    if base_model is None and source.get("rope_freqs"):
        from .formats.gguf import restore_from_source  # a GGUF's rotary divisors: not in config.json

        restore_from_source(model)
    return model


def _load_into(base_model: nn.Module, meta: dict, tensors: dict, weights: str, dropout) -> nn.Module:
    """The two-argument form: swap the layers into the caller's model, check every tensor
    name and shape, swap the old layers back if anything does not fit, then copy."""
    present = _layer_sites(base_model)
    params = list(base_model.parameters())
    device = params[0].device if params else torch.device("cpu")
    new_layers = {}
    for name, layer_meta in meta["layers"].items():
        _fitting_site(
            present,
            name,
            layer_meta,
            lambda msg, name=name: AdapterMismatchError(
                f"layer {name!r} of the checkpoint: {msg}; is it the same architecture? "
                f"(layer sites here: {', '.join(list(present)[:20])} ...)"
            ),
        )
        layer = _build_layer(layer_meta, device)
        if dropout and isinstance(layer, QALoRALinear):
            layer.lora_dropout = nn.Dropout(dropout)
        new_layers[name] = layer
    for name, layer_meta in meta["layers"].items():
        if "tied_to" in layer_meta:
            new_layers[layer_meta["tied_to"]].share_into(new_layers[name])
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
    return base_model


# ---------------------------------------------------------------- adapters


def save_adapter(model: nn.Module, directory) -> None:
    """Save only the adapters: ``adapter_model.safetensors`` + ``adapter_config.json``
    (with a manifest of both files' sizes and SHA-256). Atomic as a whole, like
    :func:`save_pretrained`; other files in ``directory`` (a model saved there) are kept."""
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
            "files": _manifest(tmp),
        }
        if norms:
            data["norms"] = {k: list(v.shape) for k, v in norms.items()}
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    _save_directory(directory, owned, write)


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into a wrapped model, in place.

    The adapter config is validated like a model checkpoint's (schema, manifest, declared
    tensor dtypes and shapes, finite values). Every layer's shape, bits, group size, adapter
    kind and rank must match the model's; the model's adapter layers and the file's must be
    the same set; every tensor is checked before any is copied. Otherwise
    AdapterMismatchError (CheckpointError for missing, damaged or invalid files), and the
    model is unchanged.
    """
    config_of(model)
    directory = _checkpoint_dir(directory)
    _scan_directory(directory)
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    meta = _validate_adapter_config(_read_json_file(directory, ADAPTER_CONFIG, "adapter config"), cfg_path)
    if meta["files"] is not None:
        _verify_manifest(directory, meta["files"], ADAPTER_CONFIG)
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
    weights = _safe_file(directory, ADAPTER_WEIGHTS, "adapter weights")
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
