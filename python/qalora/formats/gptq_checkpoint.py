"""GPTQ checkpoints (the layout AutoGPTQ, GPTQModel and transformers read and write), in and out.

(The GPTQ *quantizer*, which calibrates a dense model, is :mod:`qalora.gptq_quantizer`.)

A quantized linear layer ``P`` of shape (N, K) = (out_features, in_features), group size g,
b bits, is stored as

* ``P.qweight`` int32 (K·b/32, N): for each output n, the codes of inputs k = 0, 1, ... form
  one little-endian bitstream (code k at bits [k·b, (k+1)·b)) cut into 32-bit words, word 0
  first. At 2/4/8 bits a word holds 16/8/4 whole codes; at 3 bits 32 codes fill 3 words,
  codes 10 and 21 straddling word boundaries;
* ``P.qzeros`` int32 (K/g, N·b/32): each group's integer zero points, packed the same way
  along N. ``checkpoint_format`` "gptq" (v1, what transformers and AutoGPTQ write) stores
  z − 1, "gptq_v2" stores z;
* ``P.scales`` float16 (K/g, N), ``P.g_idx`` int32 (K) (the group of each input), ``P.bias``;

and ``W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])``.

qalora's packed rows are the same kind of little-endian bitstream, so a column of
``qweight`` read as little-endian bytes *is* a qalora packed row: import and export move
words, never a dense weight. The zero-point form becomes the offset form with
``offset = −scale · z``, exact in float32 (a float16 scale times an integer below 2^9), so
imported layers keep float32 offsets and dequantize to exactly ``s · (q − z)``.

Act-order checkpoints whose ``g_idx`` assigns inputs to groups out of column order are
refused: QA-LoRA pools contiguous groups, and its merge needs the pooling groups to be the
quantization groups. (Act-order with static groups keeps ``g_idx[k] = k // g`` and loads.)

Export stores integer zero points, so the float offsets a QA-LoRA merge produces are
rounded: :func:`export_gptq` measures what that costs (each layer's output error on
held-out text, the perplexity change) and refuses above a threshold unless forced.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .. import hf_skeleton, ops
from ..config_check import check_config, check_layer_tensors
from ..errors import CheckpointError, ConfigError, InvalidValueError, MergeError, QALoRAError
from ..io import atomic_save_safetensors, atomic_write_json, check_output_directory, make_output_directory
from ..layers import QALoRALinear, QuantLinear, check_group_size
from ..optional import require
from ..state import QALoRAState, attach_state
from ..targets import dense_weight, is_linear_like, quantized_layers, replace_module
from ..untrusted import read_json_file, safe_file, scan_directory

#: ``checkpoint_format`` values read and written: v1 stores z − 1, v2 stores z.
FORMATS = ("gptq", "gptq_v2")
#: Bit widths a GPTQ checkpoint stores (codes packed into 32-bit words; at 3 bits 32 codes
#: fill 3 words): a subset of the kernels' :data:`qalora.ops.SUPPORTED_BITS`.
GPTQ_BITS = (2, 3, 4, 8)
#: The name :data:`GPTQ_BITS` had (it is not the kernels' ``ops.SUPPORTED_BITS``).
SUPPORTED_BITS = GPTQ_BITS
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GPTQFormat:
    """The parts of a ``quantization_config`` that decide how tensors are read."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool = False
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    @property
    def zero_shift(self) -> int:
        """What is added to a stored zero point to get z."""
        return 1 if self.checkpoint_format == "gptq" else 0


def parse_config(data: dict, where: str = "quantization_config") -> GPTQFormat:
    """Validates a GPTQ ``quantization_config`` (or AutoGPTQ ``quantize_config.json``)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    method = data.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{where}: quant_method is {method!r}; qalora reads GPTQ checkpoints ('gptq') only")
    fmt = data.get("checkpoint_format", data.get("format", "gptq"))
    if data.get("is_marlin_format") or fmt not in FORMATS:
        raise CheckpointError(
            f"{where}: checkpoint format {('marlin' if data.get('is_marlin_format') else fmt)!r} is not supported; "
            f"allowed: {', '.join(FORMATS)}"
        )
    bits = data.get("bits")
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"{where}: bits = {bits!r}; qalora reads 2, 3, 4 and 8-bit GPTQ checkpoints")
    group_size = data.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"{where}: group_size = {group_size!r}; expected a positive int or -1")
    return GPTQFormat(bits, group_size, bool(data.get("sym", True)), bool(data.get("desc_act", False)), fmt)


# --------------------------------------------------------------------------- words <-> rows


def words_to_streams(words: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 words -> (C, 4R) uint8: each column's words as little-endian bytes, i.e.
    the column's bitstream in qalora's packed layout."""
    a = np.ascontiguousarray(words.detach().cpu().numpy().T).astype("<i4", copy=False)
    return torch.from_numpy(a.view(np.uint8).reshape(a.shape[0], 4 * a.shape[1]).copy())


def streams_to_words(streams: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`words_to_streams`: (C, 4R) uint8 -> (R, C) int32."""
    a = np.ascontiguousarray(streams.detach().cpu().numpy())
    words = a.view("<i4").astype(np.int32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(words.T))


def _require(tensors: dict, key: str, name: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"layer {name!r}: tensor {name}.{key} is missing")
    return tensors[key]


def _contiguous_groups(g_idx: torch.Tensor, k: int, group_size: int, name: str) -> None:
    want = torch.arange(k, dtype=torch.int64) // group_size
    got = g_idx.to(torch.int64)
    if got.shape != (k,):
        raise CheckpointError(f"layer {name!r}: g_idx has shape {tuple(g_idx.shape)}, expected ({k},)")
    if not torch.equal(got, want):
        bad = int((got != want).nonzero()[0])
        raise CheckpointError(
            f"layer {name!r}: g_idx puts input column {bad} in group {int(got[bad])}, not {bad // group_size}: "
            f"this is an act-order (desc_act) checkpoint whose groups are not contiguous runs of {group_size} "
            f"columns. QA-LoRA pools contiguous groups, so its adapter could not merge into these groups; "
            f"use a checkpoint quantized without act-order, or with static groups (static_groups=True)"
        )


def layer_from_gptq(tensors: dict[str, torch.Tensor], fmt: GPTQFormat, name: str = "", device=None) -> QuantLinear:
    """A :class:`QuantLinear` from one layer's GPTQ tensors (keys ``qweight``, ``qzeros``,
    ``scales``, optional ``g_idx`` and ``bias``), without forming the dense weight.

    Raises:
        CheckpointError: a tensor is missing or malformed, or ``g_idx`` is not contiguous.
        GroupSizeError: the layer cannot be stored in qalora's layout at these settings.
    """
    qweight = _require(tensors, "qweight", name)
    qzeros = _require(tensors, "qzeros", name)
    scales = _require(tensors, "scales", name)
    bits = fmt.bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise CheckpointError(
            f"layer {name!r}: qweight and qzeros must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)} "
            f"and {qzeros.dtype} {tuple(qzeros.shape)}"
        )
    if (qweight.shape[0] * 32) % bits:
        raise CheckpointError(
            f"layer {name!r}: qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit codes"
        )
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = k if fmt.group_size == -1 else fmt.group_size
    if k % g:
        raise CheckpointError(f"layer {name!r}: in_features {k} is not divisible by group_size {g}")
    groups = k // g
    if tuple(scales.shape) != (groups, n) or scales.dtype not in _SCALE_DTYPES:
        raise CheckpointError(
            f"layer {name!r}: scales is {scales.dtype} {tuple(scales.shape)}, expected float16 ({groups}, {n})"
        )
    if (n * bits) % 32 or tuple(qzeros.shape) != (groups, n * bits // 32):
        raise CheckpointError(
            f"layer {name!r}: qzeros has shape {tuple(qzeros.shape)}, expected ({groups}, {n * bits / 32:g})"
        )
    if not bool(torch.isfinite(scales).all()):
        raise CheckpointError(f"layer {name!r}: scales holds non-finite values (NaN or Inf)")
    if "g_idx" in tensors:
        if tensors["g_idx"].is_floating_point() or tensors["g_idx"].dtype == torch.bool:
            raise CheckpointError(f"layer {name!r}: g_idx is {tensors['g_idx'].dtype}, expected int32")
        _contiguous_groups(tensors["g_idx"], k, g, name)
    check_group_size(k, bits, g, name)
    bias = tensors.get("bias")
    if bias is not None:
        # A bias of another length would broadcast (a (1,) bias shifts every output) or fail later.
        if tuple(bias.shape) != (n,) or not bias.is_floating_point():
            raise CheckpointError(
                f"layer {name!r}: bias is {bias.dtype} {tuple(bias.shape)}, expected a float vector of "
                f"out_features ({n},)"
            )
        if not bool(torch.isfinite(bias).all()):
            raise CheckpointError(f"layer {name!r}: bias holds non-finite values (NaN or Inf)")
    layer = QuantLinear(k, n, bits, g, bias is not None, scales.dtype, device, name, offset_dtype=torch.float32)
    with torch.no_grad():
        layer.packed.copy_(words_to_streams(qweight))
        # qzeros packs along its rows: its transpose's columns are the bitstreams.
        z = ops.unpack(words_to_streams(qzeros.t()), bits, n).to(torch.float32) + fmt.zero_shift
        s = scales.t().contiguous()
        layer.scales.copy_(s)
        layer.offsets.copy_(-s.to(torch.float32) * z.t())
        if bias is not None:
            layer.bias.data = bias.detach().to(torch.float32).clone()
    return layer


@dataclass
class LayerExport:
    """What writing one layer with integer zero points changed.

    ``weight_error``: ‖W_gptq − W‖_F / ‖W‖_F. ``output_error``: the same ratio for the
    layer's outputs on held-out activations (``None`` without held-out data).
    ``clamped_groups``: zero points outside the storable range (the nearest one is used).
    """

    name: str
    weight_error: float
    output_error: float | None = None
    clamped_groups: int = 0


def layer_to_gptq(
    layer: QuantLinear, checkpoint_format: str = "gptq"
) -> tuple[dict[str, torch.Tensor], QuantLinear, LayerExport]:
    """One layer's GPTQ tensors; the :class:`QuantLinear` those tensors decode to (float16
    scales, offsets −s·z); and the weight-space change.

    Codes are written as they are. Scales become float16; each offset m becomes the
    integer zero point z = round(−m / s), clamped to the storable range ([1, 2^b − 1] in
    the v1 format, [0, 2^b − 1] in v2).
    """
    if checkpoint_format not in FORMATS:
        raise ConfigError(f"checkpoint_format: got {checkpoint_format!r}, allowed: {', '.join(FORMATS)}")
    n, k, bits, g = layer.out_features, layer.in_features, layer.bits, layer.group_size
    if (k * bits) % 32 or (n * bits) % 32:
        raise InvalidValueError(
            f"a GPTQ checkpoint packs codes into 32-bit words: in_features ({k}) and out_features ({n}) times "
            f"{bits} bits must be multiples of 32"
        )
    scales16 = layer.scales.detach().cpu().to(torch.float16)
    if not bool(torch.isfinite(scales16).all()):
        raise InvalidValueError("a scale overflows float16, which GPTQ checkpoints store")
    s = scales16.to(torch.float64)
    m = layer.offsets.detach().cpu().to(torch.float64)
    shift = 1 if checkpoint_format == "gptq" else 0
    zmin, zmax = shift, (1 << bits) - 1
    z_float = torch.where(s > 0, -m / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    z = torch.round(z_float)
    clamped = int(((z < zmin) | (z > zmax)).sum())
    z = z.clamp(zmin, zmax)
    stored = (z - shift).to(torch.uint8).t().contiguous()  # (L, N)
    bias = layer.bias
    tensors = {
        "qweight": streams_to_words(layer.packed),
        "qzeros": streams_to_words(ops.pack(stored, bits)).t().contiguous(),
        "scales": scales16.t().contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g).to(torch.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().clone()
    exported = QuantLinear(
        k, n, bits, g, bias is not None, torch.float16, layer.packed.device, offset_dtype=torch.float32
    )
    with torch.no_grad():
        exported.packed.copy_(layer.packed)
        exported.scales.copy_(scales16)
        exported.offsets.copy_((-s * z).to(torch.float32))
        if bias is not None:
            exported.bias.data = bias.detach().clone()
    w = layer.dequantize(torch.float32)
    delta = exported.dequantize(torch.float32) - w
    rel = float(delta.norm() / w.norm()) if float(w.norm()) > 0 else float(delta.norm())
    return tensors, exported, LayerExport("", rel, None, clamped)


# --------------------------------------------------------------------------- whole models


#: The index a sharded checkpoint names its weights files in.
INDEX = "model.safetensors.index.json"


def quantization_config_of(directory: str) -> dict | None:
    """The GPTQ ``quantization_config`` of a Hugging Face directory (``config.json``, or
    AutoGPTQ's ``quantize_config.json``), or None when it is not a GPTQ checkpoint. Both
    files are read as untrusted (:func:`qalora.untrusted.read_json_file`)."""
    directory = os.path.realpath(os.fspath(directory))
    data = {}
    if os.path.lexists(os.path.join(directory, "config.json")):
        data = read_json_file(directory, "config.json", "Hugging Face config")
    q = data.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method", "gptq") == "gptq":
        return q
    if q is None and os.path.lexists(os.path.join(directory, "quantize_config.json")):
        return read_json_file(directory, "quantize_config.json", "AutoGPTQ quantize config")
    return None


def _weight_files(directory: str) -> list[str]:
    """The weights files of a GPTQ directory: those its index names (each a plain file name
    inside the directory), or every ``*.safetensors`` file in it."""
    if not os.path.lexists(os.path.join(directory, INDEX)):
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{directory} holds no .safetensors weights")
        return files
    path = os.path.join(directory, INDEX)
    index = read_json_file(directory, INDEX, "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{path}: field 'weight_map': expected a non-empty JSON object of tensor name -> file name, got "
            f"{type(weight_map).__name__}"
        )
    for key, name in weight_map.items():
        field = f"weight_map.{key}"
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise CheckpointError(f"{path}: field {field!r}: got {name!r}, expected the name of a .safetensors file")
        if name != os.path.basename(name) or name in (".", "..") or "\0" in name or name.startswith("/"):
            raise CheckpointError(
                f"{path}: field {field!r}: {name!r} is not a plain file name; the weights must be files inside "
                f"{directory}"
            )
    return sorted(set(weight_map.values()))


def _read_headers(directory: str) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """{tensor: file} and {tensor: (dtype, shape)} from the weights files' headers, each file
    a regular file inside the directory, each header validated, before any tensor is read."""
    from ..checkpoint.safetensors_header import _read_header

    where: dict[str, str] = {}
    table: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name in _weight_files(directory):
        path = safe_file(directory, name, "weights file")
        for key, entry in _read_header(path).items():
            if key in where:
                raise CheckpointError(f"{path}: tensor {key!r} is also in {where[key]}; which one is meant?")
            where[key] = name
            table[key] = entry
    index = os.path.join(directory, INDEX)
    if os.path.lexists(index):
        weight_map = read_json_file(directory, INDEX, "weights index")["weight_map"]
        for key, name in weight_map.items():
            if where.get(key) != name:
                raise CheckpointError(
                    f"{index}: field 'weight_map.{key}': names {name}, which does not hold that tensor"
                )
    return where, table


def _read_tensors(directory: str, files: dict[str, str], table: dict) -> dict[str, torch.Tensor]:
    from ..checkpoint.safetensors_header import _load_tensors

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(files.values())):
        path = safe_file(directory, name, "weights file")
        tensors.update(_load_tensors(path, {k: table[k] for k, f in files.items() if f == name}))
    return tensors


def _hf_config(transformers, data: dict, path: str):
    """The transformers config of a ``config.json`` already read (transformers would read
    the file again, without the size cap or the regular-file check)."""
    model_type = data.get("model_type")
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise CheckpointError(f"{path}: field 'model_type': got {model_type!r}, not a model type transformers knows")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mapping[model_type].from_dict(data)
    except Exception as e:  # transformers validates configs with many exception types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: transformers cannot read it as a {model_type} config: {first}") from None


def _load_bytes(table: dict, quantized: set[str], dtype: torch.dtype) -> int:
    """Memory a load needs: every tensor as read, plus the dense ones cast to ``dtype`` and
    the offsets (float32, one per group) the quantized layers gain."""
    total = 0
    for key, (t_dtype, shape) in table.items():
        n = math.prod(shape)
        total += n * t_dtype.itemsize
        owner, _, part = key.rpartition(".")
        if owner in quantized:
            if part == "scales":
                total += n * 4
        elif t_dtype.is_floating_point:
            total += n * dtype.itemsize
    return total


def load_gptq_model(directory, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Builds a Hugging Face causal LM from a GPTQ checkpoint directory, its quantized
    layers as :class:`QuantLinear` (codes moved, never dequantized) and its other weights
    in ``dtype``. ``qalora.wrap`` then adapts those layers as they are (their own bits and
    group size).

    The directory is untrusted input: every file it names (``config.json``,
    ``quantize_config.json``, the index and the weights it lists) must be a regular file
    inside it, JSON is size-capped, safetensors headers are validated, the architecture
    fields of ``config.json`` are checked (:mod:`qalora.config_check`) against each other and
    against the tensors present, and the memory the load needs against what is available,
    all before the model is built; scales must be finite and biases of the layer's length.

    Raises:
        CheckpointError: not a GPTQ checkpoint, an unsupported variant (act-order groups,
            marlin, other bit widths), a hostile or damaged file, or tensors that do not fit
            the architecture.
        ModelLoadError: transformers is not installed.
    """
    transformers = require("transformers", "loading a GPTQ checkpoint", install="'transformers>=5'")
    directory = os.path.realpath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    scan_directory(directory)
    q = quantization_config_of(directory)
    if q is None:
        raise CheckpointError(f"{directory} is not a GPTQ checkpoint (no GPTQ quantization_config)")
    fmt = parse_config(q, f"{directory}: quantization_config")
    cfg_path = os.path.join(directory, "config.json")
    data = read_json_file(directory, "config.json", "Hugging Face config")
    arch = check_config(data, cfg_path)
    files, table = _read_headers(directory)
    check_layer_tensors(arch, {k: shape for k, (_, shape) in table.items()}, cfg_path, f"the weights of {directory}")
    prefixes = sorted({key[: -len(".qweight")] for key in table if key.endswith(".qweight")})
    if not prefixes:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors; is it a GPTQ checkpoint?")
    config = _hf_config(transformers, data, cfg_path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a plain model; qalora supplies the quantized layers
    try:
        model = hf_skeleton.bounded_meta_model(
            transformers.AutoModelForCausalLM,
            config,
            tensor_bytes=_load_bytes(table, set(prefixes), dtype),
            where=cfg_path,
            dtype=dtype,
        )
    except QALoRAError:
        raise
    except Exception as e:  # transformers refuses configs with many exception types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{cfg_path}: transformers cannot build a causal LM from it: {first}") from None
    modules = dict(model.named_modules())
    for prefix in prefixes:
        if prefix not in modules or not is_linear_like(modules[prefix]):
            raise CheckpointError(
                f"{directory}: {prefix}.qweight does not belong to a linear layer of {type(model).__name__}"
            )
    tensors = _read_tensors(directory, files, table)
    for prefix in prefixes:
        own = {key[len(prefix) + 1 :]: t for key, t in tensors.items() if key.startswith(prefix + ".")}
        layer = layer_from_gptq(own, fmt, prefix)
        out_f, in_f = dense_weight(modules[prefix])[0].shape
        if (layer.out_features, layer.in_features) != (out_f, in_f):
            raise CheckpointError(
                f"layer {prefix!r}: the checkpoint holds ({layer.out_features}, {layer.in_features}), "
                f"the architecture expects ({out_f}, {in_f})"
            )
        replace_module(model, prefix, layer)
    quantized = set(prefixes)
    rest = {
        key: (t.to(dtype) if t.is_floating_point() else t)
        for key, t in tensors.items()
        if key.rpartition(".")[0] not in quantized
    }
    expected = model.state_dict()
    unexpected = sorted(k for k in rest if k not in expected and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(f"{directory}: tensors {unexpected[:10]} do not belong to {type(model).__name__}")
    for key, t in rest.items():
        want = expected.get(key)
        if want is not None and (
            tuple(t.shape) != tuple(want.shape) or t.is_floating_point() != want.is_floating_point()
        ):
            raise CheckpointError(
                f"{os.path.join(directory, files[key])}: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)}; "
                f"{type(model).__name__} expects {want.dtype} of shape {tuple(want.shape)}"
            )
    model.load_state_dict({k: v for k, v in rest.items() if k in expected}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_empty = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_empty:
        raise CheckpointError(f"{directory}: no tensor for {still_empty[:10]}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    attach_state(
        model,
        QALoRAState(
            config=None,
            source={
                "format": "gptq",
                "path": os.path.abspath(directory),
                "bits": fmt.bits,
                "group_size": fmt.group_size,
                "sym": fmt.sym,
                "checkpoint_format": fmt.checkpoint_format,
            },
        ),
    )
    return model


@dataclass
class GPTQExportReport:
    """What :func:`export_gptq` wrote and what the integer zero points cost."""

    directory: str
    checkpoint_format: str
    bits: int
    group_size: int
    layers: list[LayerExport] = field(default_factory=list)
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    @property
    def perplexity_change(self) -> float | None:
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1

    @property
    def worst_layer(self) -> LayerExport:
        return max(self.layers, key=lambda r: r.output_error if r.output_error is not None else r.weight_error)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["perplexity_change"] = self.perplexity_change
        return d


#: The name :class:`GPTQExportReport` had (:mod:`qalora.formats.gguf_export` has its own).
ExportReport = GPTQExportReport


def _layer_output_errors(
    model, pairs: dict[str, tuple[QuantLinear, QuantLinear]], heldout, batch_size
) -> tuple[dict, float]:
    """Per-layer relative output error on the activations of held-out text (the model as
    it is), and the model's perplexity on that text."""
    from ..train import perplexity

    sums = {name: [0.0, 0.0] for name in pairs}
    handles = []
    for name, (layer, exported) in pairs.items():

        def hook(mod, args, out, name=name, exported=exported):
            y = exported(args[0])
            sums[name][0] += float((y - out).double().pow(2).sum())
            sums[name][1] += float(out.double().pow(2).sum())

        handles.append(layer.register_forward_hook(hook))
    try:
        ppl = perplexity(model, heldout, batch_size=batch_size, desc="qalora: export, held-out perplexity")
    finally:
        for h in handles:
            h.remove()
    return {name: math.sqrt(e / b) if b > 0 else math.sqrt(e) for name, (e, b) in sums.items()}, ppl


def export_gptq(
    model: nn.Module,
    directory,
    *,
    tokenizer=None,
    heldout: torch.Tensor | None = None,
    checkpoint_format: str = "gptq",
    max_layer_error: float = 0.05,
    max_perplexity_increase: float = 0.01,
    force: bool = False,
    batch_size: int = 4,
) -> GPTQExportReport:
    """Writes a merged qalora model as a GPTQ checkpoint (``model.safetensors`` +
    ``config.json`` with its ``quantization_config`` + AutoGPTQ's ``quantize_config.json``).

    Codes and (float16) scales are written as they are; GPTQ stores integer zero points,
    so each float offset m becomes z = round(−m / s), which moves every weight of a group
    by the same amount (at most s/2, unless clamped). The report gives each layer's
    relative weight change and, with ``heldout`` token blocks, its relative output change
    on held-out activations and the model's held-out perplexity before and after rounding.

    Args:
        heldout: (blocks, seq) token ids for the output errors and the perplexity check.
        checkpoint_format: "gptq" (v1: z − 1 stored; what transformers and AutoGPTQ read)
            or "gptq_v2" (z stored; GPTQModel).
        max_layer_error: refuse if a layer's relative output error (weight error without
            ``heldout``) exceeds this.
        max_perplexity_increase: refuse if held-out perplexity grows by more than this
            fraction (0.01 = 1%).
        force: write anyway, whatever the errors.

    Raises:
        MergeError: the model still holds adapters (merge it first).
        InvalidValueError: the layers do not fit one GPTQ config, or rounding the zero
            points costs more than allowed (nothing is written then).
        OutputError: ``directory`` is not a directory, or a file cannot be written there.
    """
    directory = check_output_directory(directory)  # a file or device there: refused before any work
    layers = list(quantized_layers(model))
    if not layers:
        raise ConfigError("the model holds no qalora layer to export")
    adapters = [name for name, layer in layers if isinstance(layer, QALoRALinear)]
    if adapters:
        raise MergeError(
            f"layers {adapters[:5]} still hold adapters; merge them first (qalora.merge(model)) so that the "
            f"checkpoint carries the fine-tuned weights"
        )
    settings = {(layer.bits, layer.group_size) for _, layer in layers}
    if len(settings) != 1:
        raise InvalidValueError(f"a GPTQ config has one bit width and group size; this model mixes {sorted(settings)}")
    bits, group_size = settings.pop()
    report = GPTQExportReport(os.path.abspath(directory), checkpoint_format, bits, group_size)
    written: dict[str, torch.Tensor] = {}
    pairs: dict[str, tuple[QuantLinear, QuantLinear]] = {}
    for name, layer in layers:
        tensors, exported, stats = layer_to_gptq(layer, checkpoint_format)
        stats.name = name
        report.layers.append(stats)
        pairs[name] = (layer, exported)
        written.update({f"{name}.{key}": t for key, t in tensors.items()})
    if heldout is not None:
        errors, report.perplexity_before = _layer_output_errors(model, pairs, heldout, batch_size)
        for stats in report.layers:
            stats.output_error = errors[stats.name]
        from ..train import perplexity

        for name, (_, exported) in pairs.items():
            replace_module(model, name, exported)
        try:
            report.perplexity_after = perplexity(model, heldout, batch_size=batch_size, desc="qalora: export, rounded")
        finally:
            for name, (layer, _) in pairs.items():
                replace_module(model, name, layer)
    worst = report.worst_layer
    worst_error = worst.output_error if worst.output_error is not None else worst.weight_error
    change = report.perplexity_change
    problems = []
    if worst_error > max_layer_error:
        kind = "output" if worst.output_error is not None else "weight"
        problems.append(f"layer {worst.name!r} changes its {kind} by {worst_error:.2%} (allowed {max_layer_error:.2%})")
    if change is not None and change > max_perplexity_increase:
        problems.append(
            f"held-out perplexity rises {change:+.2%} ({report.perplexity_before:.3f} -> {report.perplexity_after:.3f}, "
            f"allowed {max_perplexity_increase:+.2%})"
        )
    if problems and not force:
        raise InvalidValueError(
            "GPTQ stores integer zero points; rounding this model's offsets to them: "
            + "; ".join(problems)
            + ". Nothing was written; pass force=True to write it anyway, or keep qalora's own format "
            "(qalora.save_pretrained) or GGUF Q4_1, which store float offsets"
        )
    quantized = {name for name, _ in layers}
    seen_storage = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quantized or any(key.startswith(q + ".") for q in quantized):
            continue
        storage = (t.device, t.data_ptr(), t.numel())
        if storage in seen_storage:
            continue  # a tied weight (the LM head) is stored once, as transformers does
        seen_storage.add(storage)
        written[key] = t
    config = json.loads(model.config.to_json_string()) if hasattr(model, "config") else {}
    qconfig = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "static_groups": False,
        "sym": False,
        "true_sequential": True,
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": ["qalora"]},
    }
    config["quantization_config"] = qconfig
    make_output_directory(directory)
    atomic_save_safetensors(os.path.join(directory, "model.safetensors"), written, metadata={"format": "pt"})
    atomic_write_json(os.path.join(directory, "config.json"), config)
    atomic_write_json(os.path.join(directory, "quantize_config.json"), qconfig)
    atomic_write_json(os.path.join(directory, "gptq_export_report.json"), report.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return report


__all__: Sequence[str] = [
    "FORMATS",
    "GPTQ_BITS",
    "ExportReport",
    "GPTQExportReport",
    "GPTQFormat",
    "LayerExport",
    "export_gptq",
    "layer_from_gptq",
    "layer_to_gptq",
    "load_gptq_model",
    "parse_config",
    "quantization_config_of",
    "streams_to_words",
    "words_to_streams",
]
