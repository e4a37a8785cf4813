"""A safetensors file read as untrusted input: its header parsed and checked
(:func:`_read_header`: every tensor's dtype, shape and byte span, spans tiling the data area
without overlap) and compared with what the checkpoint's JSON declares
(:func:`_check_declared`) before any tensor is read; then the tensors, checked again against
the header and for finite values (:func:`_load_tensors`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct

import torch

from ..errors import CheckpointError
from ..untrusted import open_regular
from .schema import _Fields, _short

#: Cap that keeps a hostile header from exhausting memory before it is validated.
MAX_HEADER_BYTES = 100 << 20

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


def _read_header(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parses a safetensors header without reading any tensor: name -> (dtype, shape).
    Offsets must tile the data area exactly as the dtypes and shapes say."""
    with open_regular(path, "safetensors") as f:
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
