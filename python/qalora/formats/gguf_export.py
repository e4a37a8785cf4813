"""GGUF out: a qalora model written as a llama.cpp GGUF file.

Per tensor (in the order of the source file when the model came from one):

* unchanged since the model was imported from a GGUF file: the source's bytes, copied;
* a layer imported from a Q2_K / Q4_K / Q5_K tensor: that type again, its codes as they
  are and its (merged) scales and offsets fitted onto the type's grid (float16 super-block
  factors times 6-bit, for Q2_K 4-bit, integers per group); exact where the values lie on
  the grid, otherwise the report gives each tensor's error (a Q4_K_M file so comes back at
  its own size);
* another quantized layer (merged or never adapted) with codes of at most 4 bits (5 bits)
  and a group size that is a multiple of 32 (a merged Q4_0 / Q5_0 layer among them): Q4_1 (Q5_1), whose per-block float16 ``d`` and ``m``
  are the layer's scale and offset, so the codes are written as they are (a layer whose
  scales and offsets are float16 is written exactly; float32 ones are rounded to float16
  and the report gives the largest relative change). A QA-LoRA layer that is not merged yet
  is written as it would be merged (the model itself is not changed);
* any other weight (6- or 8-bit codes, groups of 16, dense layers and embeddings):
  ``other_type`` (Q8_0 or F16), with its measured error in the report;
* norms and biases: F32.

Metadata: from the source GGUF (all of it, tokenizer included) when there is one, but for the
chat template, which is the given tokenizer's when it has one (``tokenizer.chat_template``: a
template set to train chat data travels into the file); otherwise from the Hugging Face config
and the given tokenizer (see :mod:`.gguf_vocab`): its chat template, BOS / EOS / padding ids,
and as ``tokenizer.ggml.eot_token_id`` a stop token of the generation config other than EOS.
llama.cpp, Ollama (which reads the template from the file) and LM Studio format chats and
stop with these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .. import ops
from ..embeddings import quantized_embeddings, tied_heads
from ..errors import FormatError, MergeError
from ..io import atomic_path, check_output_path
from ..layers import QuantEmbedding, QuantLinear
from ..progress import progress
from ..state import state_of
from ..targets import quantized_layers
from . import gguf_arch, gguf_blocks
from .gguf_file import FLOAT32, STRING, UINT32, GGUFHeader, TensorEntry, TensorReader, read_header
from .gguf_vocab import KeyValue, tokenizer_metadata

OTHER_TYPES = {"q8_0": gguf_blocks.Q8_0, "f16": gguf_blocks.F16}
_SKIPPED_KEYS = {"general.architecture", "general.alignment"}  # the writer sets both itself
# llama.cpp's "mostly <type>" file type numbers, for general.file_type.
_FILE_TYPES = {
    gguf_blocks.F32: 0,
    gguf_blocks.F16: 1,
    gguf_blocks.Q4_0: 2,
    gguf_blocks.Q4_1: 3,
    gguf_blocks.Q8_0: 7,
    gguf_blocks.Q5_0: 8,
    gguf_blocks.Q5_1: 9,
    gguf_blocks.Q2_K: 10,
    gguf_blocks.Q3_K: 12,
    gguf_blocks.Q4_K: 15,
    gguf_blocks.Q5_K: 17,
    gguf_blocks.Q6_K: 18,
    gguf_blocks.BF16: 32,
}
_ROWS_PER_SLICE = 1 << 21


@dataclass
class TensorReport:
    """How one tensor was written.

    ``how``: "copied" (the source's bytes), "exact" (codes, scales and offsets written as
    they are), "rounded" (float32 scales/offsets rounded to float16), "fitted" (a layer
    imported from a Q2_K / Q4_K / Q5_K tensor written back in that type: codes as they are,
    scales and offsets fitted onto the type's grid; see the errors), "converted" (written as
    another type; see the errors) or "dense" (norms and biases, float32).
    ``param_rel_change``: largest relative change of a scale by float16 rounding or by the
    K-quant grid, or of an offset by float16 rounding (over values in float16's normal range,
    |x| >= 2^-14, where float16 rounding is at most 2^-11).
    ``offset_change_steps``: "fitted" tensors: largest change of an offset, in steps of its
    group's code grid (its scale).
    ``max_abs_error`` / ``rel_error``: the written weight against the model's float32
    weight: largest absolute difference and ||written - model|| / ||model||."""

    name: str
    type: str
    how: str
    shape: tuple[int, ...]
    param_rel_change: float = 0.0
    offset_change_steps: float = 0.0
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    nbytes: int = 0
    source_type: str | None = None
    source_nbytes: int = 0


@dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote: each tensor's type, how it was written and its error."""

    path: str
    source: str
    architecture: str
    bytes: int = 0
    tensors: list[TensorReport] = field(default_factory=list)

    def count(self, how: str) -> int:
        return sum(1 for t in self.tensors if t.how == how)

    @property
    def source_bytes(self) -> int:
        """Bytes of the source's tensors that were written (0 without a source)."""
        return sum(t.source_nbytes for t in self.tensors)

    @property
    def type_change_bytes(self) -> int:
        """Bytes the tensors written in another type than the source's add (or save)."""
        return sum(t.nbytes - t.source_nbytes for t in self.tensors if t.source_type and t.source_type != t.type)

    def type_changes(self) -> dict[str, int]:
        """ "SOURCE->WRITTEN" type -> number of tensors written in another type than the source's."""
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.source_type and t.source_type != t.type:
                key = f"{t.source_type}->{t.type}"
                out[key] = out.get(key, 0) + 1
        return out

    @property
    def max_param_rel_change(self) -> float:
        return max((t.param_rel_change for t in self.tensors), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((t.rel_error for t in self.tensors), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    def summary(self) -> str:
        types: dict[str, int] = {}
        for t in self.tensors:
            types[t.type] = types.get(t.type, 0) + 1
        kinds = ", ".join(
            f"{n} {k}"
            for k, n in ((k, self.count(k)) for k in ("copied", "exact", "rounded", "fitted", "converted", "dense"))
            if n
        )
        text = (
            f"{self.path}: {len(self.tensors)} tensors ({kinds}); types: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
            + f"; {self.bytes / (1 << 20):.1f} MiB"
        )
        if self.source_bytes:
            tensor_bytes = sum(t.nbytes for t in self.tensors)
            text += f"; tensors {tensor_bytes / self.source_bytes:.4f}x the source's"
            changes = self.type_changes()
            if changes:
                text += (
                    f" ({self.type_change_bytes / (1 << 20):+.2f} MiB from type changes: "
                    + ", ".join(f"{k} x{v}" for k, v in sorted(changes.items()))
                    + ")"
                )
        if self.count("rounded"):
            text += f"; largest relative change of a scale/offset by float16 rounding: {self.max_param_rel_change:.3g}"
        fitted = [t for t in self.tensors if t.how == "fitted"]
        if fitted:
            worst = max(fitted, key=lambda t: t.rel_error)
            text += (
                f"; K-quant tensors fitted to their grid: largest relative error {worst.rel_error:.3g} ({worst.name}, "
                f"{worst.type}), largest offset change {max(t.offset_change_steps for t in fitted):.3g} code steps"
            )
        converted = [t for t in self.tensors if t.how == "converted"]
        if converted:
            worst = max(converted, key=lambda t: t.rel_error)
            text += f"; converted tensors' largest relative error: {worst.rel_error:.3g} ({worst.name}, {worst.type})"
        return text


#: The name :class:`GGUFExportReport` had (``qalora.ExportReport``; :mod:`.gptq_checkpoint` has its own).
ExportReport = GGUFExportReport


# --------------------------------------------------------------------------- what the model holds


@dataclass
class _Item:
    """One tensor to write: a quantized layer's weight, or a dense parameter."""

    gguf: str
    shape: tuple[int, ...]  # GGUF ne (ne0 first)
    layer: QuantLinear | QuantEmbedding | None = None
    tensor: torch.Tensor | None = None
    order: np.ndarray | None = None  # gguf row r = model row order[r]
    shift: float = 0.0  # what llama.cpp adds to the model's values (Gemma's norms: 1)

    @property
    def rows(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1


def _merged_view(name: str, layer: nn.Module) -> QuantLinear | QuantEmbedding:
    if isinstance(layer, (QuantLinear, QuantEmbedding)):
        return layer
    if layer.adapter != "qalora":
        raise MergeError(
            f"layer {name!r} holds a dense LoRA adapter (adapter='lora'), which no GGUF block type can hold exactly; "
            "call qalora.merge_requantize(model) first if a re-quantized model is what you want"
        )
    return layer.merged()


def _model_items(model: nn.Module, arch: gguf_arch.Architecture, n_head: int, n_head_kv: int) -> list[_Item]:
    """Every tensor of the model under its GGUF name, in module order (tied parameters once)."""
    items: list[_Item] = []
    unmapped: list[str] = []
    seen = set()

    def order_for(gname: str, rows: int) -> np.ndarray | None:
        heads = gguf_arch.rope_heads(gname, arch, n_head, n_head_kv)
        return None if heads is None else gguf_arch.rope_order(rows, heads)

    def add(hf: str, shape, **kw) -> None:
        gname = arch.gguf_name_of(hf)
        if gname is None:
            unmapped.append(hf)
        else:
            order = order_for(gname, shape[1] if len(shape) > 1 else shape[0])
            items.append(_Item(gname, shape, order=order, shift=arch.shift(gname), **kw))

    layers = dict(quantized_layers(model))
    # A quantized token embedding is written like a quantized layer (its rows are the
    # layout's rows); a head holding its tensors is not written again: without
    # output.weight, readers use token_embd.weight for the logits.
    layers.update(quantized_embeddings(model))
    heads = tied_heads(model)
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if name in heads:
            if module.bias is not None:
                raise FormatError(f"{name!r}: a head tied to the token embedding with a bias has no GGUF form")
            inside.append(name)
            continue
        if name in layers:
            inside.append(name)
            base = _merged_view(name, module)
            add(name + ".weight", (base.in_features, base.out_features), layer=base)
            if getattr(base, "bias", None) is not None:
                add(name + ".bias", (base.out_features,), tensor=base.bias.detach())
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied to a parameter already listed (the embeddings)
            seen.add(id(param))
            add(f"{name}.{pname}" if name else pname, tuple(reversed(param.shape)), tensor=param.detach())
    if unmapped:
        raise FormatError(
            f"these parameters have no GGUF tensor in a {arch.gguf_name} model: {', '.join(unmapped[:8])}"
        )
    return items


# --------------------------------------------------------------------------- comparing with the source


def _slices(rows: int, k: int) -> Iterator[tuple[int, int]]:
    step = max(1, _ROWS_PER_SLICE // max(k, 1))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _model_rows(item: _Item, a: int, b: int):
    return slice(a, b) if item.order is None else torch.from_numpy(item.order[a:b])


def _dense_values(item: _Item, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of the item's float32 weight in GGUF row order, as the model holds it
    (without the item's ``shift``)."""
    rows = _model_rows(item, a, b)
    if item.layer is not None:
        layer = item.layer
        scales, offsets = layer.row_params(rows)
        return ops.dequantize(
            layer.packed[rows].cpu(), scales.cpu(), offsets.cpu(), layer.bits, layer.group_size
        ).numpy()
    t = item.tensor
    if t.dim() == 1:
        t = t.reshape(1, -1) if item.order is None else t[torch.from_numpy(item.order)].reshape(1, -1)
        return t.detach().float().cpu().numpy()
    return t[rows].detach().float().cpu().numpy()


def _unchanged(reader: TensorReader, entry: TensorEntry, item: _Item) -> bool:
    if tuple(entry.shape) != item.shape:
        return False
    k = entry.shape[0]
    if item.layer is not None:
        fmt = gguf_blocks.FORMATS.get(entry.ggml_type)
        layer = item.layer
        stored = None if fmt is None else (fmt.bits if fmt.bits in ops.SUPPORTED_BITS else 8)
        if fmt is None or (stored, fmt.group_size) != (layer.bits, layer.group_size):
            return False
        for a, b in _slices(entry.rows, k):
            dec = gguf_blocks.decode_rows(entry.ggml_type, reader.rows(entry, a, b), k, entry.name)
            rows = _model_rows(item, a, b)
            packed = dec.codes if stored == 8 else ops.pack(dec.codes, stored)
            scales, offsets = layer.row_params(rows)
            if not (
                np.array_equal(layer.packed[rows].cpu().numpy(), packed)
                and np.array_equal(scales.float().cpu().numpy(), dec.scales)
                and np.array_equal(offsets.float().cpu().numpy(), dec.offsets)
            ):
                return False
        return True
    if entry.ggml_type not in gguf_blocks.FORMATS and entry.ggml_type not in gguf_blocks.DENSE_TYPES:
        return False
    rows = entry.rows if len(entry.shape) > 1 else 1
    for a, b in _slices(rows, k):
        source = gguf_blocks.decode_dense(entry.ggml_type, reader.rows(entry, a, b), entry.name).reshape(b - a, -1)
        if item.shift:
            # Compared as the import made it (source - shift in float32): adding the shift back
            # is not exact for every float32 (below 0.5), subtracting it again is deterministic.
            source = source.astype(np.float32) - np.float32(item.shift)
        if not np.array_equal(_dense_values(item, a, b).reshape(b - a, -1), source):
            return False
    return True


# --------------------------------------------------------------------------- choosing and encoding


def _choose(item: _Item, other: int, entry: TensorEntry | None = None) -> int:
    """The type a changed tensor is written as: a layer imported from a Q2_K / Q4_K / Q5_K
    tensor goes back to its own type (codes as they are, group parameters fitted onto the
    type's grid); another quantized layer of at most 5-bit codes in groups of 32k goes to
    Q4_1 / Q5_1 (exact; this is where a merged Q4_0 / Q5_0 layer goes); the rest to ``other``."""
    if item.layer is not None:
        layer = item.layer
        fmt = gguf_blocks.FORMATS.get(entry.ggml_type) if entry is not None else None
        if (
            fmt is not None
            and fmt.ggml_type in gguf_blocks.K_OFFSET_TYPES
            and (layer.bits, layer.group_size) == (fmt.bits, fmt.group_size)
            and tuple(entry.shape) == item.shape
        ):
            return fmt.ggml_type
        if layer.group_size % 32 == 0 and layer.bits <= 5:
            return gguf_blocks.Q4_1 if layer.bits <= 4 else gguf_blocks.Q5_1
        return other
    if len(item.shape) == 1:
        return gguf_blocks.F32
    return other if (other != gguf_blocks.Q8_0 or item.shape[0] % 32 == 0) else gguf_blocks.F16


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    count = int(np.prod(shape))
    return count // block * size


class _Errors:
    def __init__(self) -> None:
        self.max_abs = 0.0
        self.diff2 = 0.0
        self.ref2 = 0.0
        self.param = 0.0
        self.offset_steps = 0.0

    def add(self, written: np.ndarray, model: np.ndarray) -> None:
        d = written.astype(np.float64) - model.astype(np.float64)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.diff2 += float((d * d).sum())
        self.ref2 += float((model.astype(np.float64) ** 2).sum())

    def add_param(self, rounded: np.ndarray, exact: np.ndarray) -> None:
        # Relative change where float16 keeps its 11 significant bits (at most 2^-11); below
        # 2^-14 it keeps fewer, and the weights' absolute error (also reported) says more.
        nz = np.abs(exact) >= 2.0**-14
        if nz.any():
            rel = np.abs(rounded[nz].astype(np.float64) - exact[nz]) / np.abs(exact[nz].astype(np.float64))
            self.param = max(self.param, float(rel.max()))

    def add_offsets(self, written: np.ndarray, exact: np.ndarray, scales: np.ndarray) -> None:
        # An offset's change in steps of its group's code grid (offsets near zero make a
        # relative change meaningless); a group of scale 0 in steps of its row's largest.
        step = np.abs(scales.astype(np.float64))
        if step.size:
            step = np.where(step > 0, step, step.max(axis=-1, keepdims=True))
        ok = step > 0
        if ok.any():
            d = np.abs(written[ok].astype(np.float64) - exact[ok]) / step[ok]
            self.offset_steps = max(self.offset_steps, float(d.max()))

    @property
    def rel(self) -> float:
        return (self.diff2 / self.ref2) ** 0.5 if self.ref2 > 0 else (0.0 if self.diff2 == 0 else float("inf"))


def _layer_slices(item: _Item) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A quantized item's (codes, float32 scales, float32 offsets), a slice of rows at a time,
    rows in GGUF order."""
    layer, k = item.layer, item.shape[0]
    for a, b in _slices(item.rows, k):
        rows = _model_rows(item, a, b)
        codes = ops.unpack(layer.packed[rows].cpu(), layer.bits, k).numpy()
        scales, offsets = layer.row_params(rows)
        yield codes, scales.float().cpu().numpy(), offsets.float().cpu().numpy()


def _encode(item: _Item, ggml_type: int, errors: _Errors) -> Iterator[np.ndarray]:
    """The item's bytes as ``ggml_type``, a slice of rows at a time."""
    k = item.shape[0]
    if ggml_type in (gguf_blocks.Q4_1, gguf_blocks.Q5_1):
        g = item.layer.group_size
        for codes, s, m in _layer_slices(item):
            d16, m16 = s.astype(np.float16), m.astype(np.float16)
            if not (np.isfinite(d16).all() and np.isfinite(m16).all()):
                raise FormatError(
                    f"{item.gguf}: a scale or offset exceeds float16's range; export with other_type='f16' is not possible either"
                )
            errors.add_param(d16.astype(np.float32), s)
            errors.add_param(m16.astype(np.float32), m)
            written = gguf_blocks.fma_dequantize(codes, d16, m16, g)
            errors.add(written, gguf_blocks.fma_dequantize(codes, s, m, g))
            d32 = np.repeat(d16, g // 32, axis=1)
            m32 = np.repeat(m16, g // 32, axis=1)
            encode = gguf_blocks.encode_q4_1 if ggml_type == gguf_blocks.Q4_1 else gguf_blocks.encode_q5_1
            yield encode(codes, d32, m32, item.gguf)
        return
    if ggml_type in gguf_blocks.K_OFFSET_TYPES:
        g = item.layer.group_size
        for codes, s, m in _layer_slices(item):
            fit = gguf_blocks.fit_k_quant(ggml_type, codes, s, m, item.gguf)
            errors.add_param(fit.scales, s)
            errors.add_offsets(fit.offsets, m, s)
            errors.add(
                gguf_blocks.fma_dequantize(codes, fit.scales, fit.offsets, g),
                gguf_blocks.fma_dequantize(codes, s, m, g),
            )
            yield fit.raw
        return
    rows = item.rows
    for a, b in _slices(rows, k):
        dense = _dense_values(item, a, b).reshape(b - a, -1)
        if item.shift:
            dense = dense + np.float32(item.shift)
        raw = gguf_blocks.encode_dense(dense, ggml_type, item.gguf)
        errors.add(gguf_blocks.decode_dense(ggml_type, raw, item.gguf).reshape(dense.shape), dense)
        yield raw


# --------------------------------------------------------------------------- metadata


def _metadata_from_source(header: GGUFHeader) -> list[KeyValue]:
    return [
        KeyValue(key, v.type, v.value, v.element_type) for key, v in header.metadata.items() if key not in _SKIPPED_KEYS
    ]


def _rope_type(config) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def llama3_rope_freqs(config) -> np.ndarray:
    """Llama 3.1's rope scaling as the divisors of the rotary frequencies llama.cpp reads from
    ``rope_freqs.weight``: 1 for wavelengths below original context / high_freq_factor, the
    factor above original context / low_freq_factor, and in between the reciprocal of the
    interpolation transformers applies to the inverse frequency."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    heads = int(config.num_attention_heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    freqs = 1.0 / _rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid)).astype(np.float32)


def _metadata_from_config(
    model: nn.Module, arch: gguf_arch.Architecture, tokenizer, n_vocab: int, pre_tokenizer
) -> list[KeyValue]:
    config = model.config
    if _rope_type(config) not in ("default", "llama3") or (
        _rope_type(config) == "llama3" and arch.gguf_name != "llama"
    ):
        raise FormatError(
            f"rope type {_rope_type(config)!r} is not written by qalora's GGUF export (the default rope, and "
            "Llama 3.1's 'llama3' as rope_freqs)"
        )
    rope = getattr(config, "rope_parameters", None)
    partial = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) or getattr(
        config, "partial_rotary_factor", None
    )
    if partial not in (None, 1.0):
        raise FormatError(
            f"partial_rotary_factor = {partial}: qalora's GGUF export writes models that rotate the whole head"
        )
    if tokenizer is None:
        raise FormatError(
            "this model did not come from a GGUF file, so its tokenizer must be given: export_gguf(model, path, tokenizer=tok)"
        )
    a = arch.gguf_name
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    name = os.path.basename(str(getattr(config, "_name_or_path", "") or "model").rstrip("/")) or "model"
    kv = [
        KeyValue("general.name", STRING, name),
        KeyValue(f"{a}.context_length", UINT32, int(config.max_position_embeddings)),
        KeyValue(f"{a}.embedding_length", UINT32, int(config.hidden_size)),
        KeyValue(f"{a}.block_count", UINT32, int(config.num_hidden_layers)),
        KeyValue(f"{a}.feed_forward_length", UINT32, int(config.intermediate_size)),
        KeyValue(f"{a}.attention.head_count", UINT32, heads),
        KeyValue(f"{a}.attention.head_count_kv", UINT32, int(getattr(config, "num_key_value_heads", heads) or heads)),
        KeyValue(f"{a}.rope.freq_base", FLOAT32, _rope_theta(config)),
        KeyValue(f"{a}.attention.layer_norm_rms_epsilon", FLOAT32, float(config.rms_norm_eps)),
        KeyValue(f"{a}.rope.dimension_count", UINT32, head_dim),
        KeyValue(f"{a}.vocab_size", UINT32, n_vocab),
    ]
    if head_dim * heads != config.hidden_size:
        kv += [
            KeyValue(f"{a}.attention.key_length", UINT32, head_dim),
            KeyValue(f"{a}.attention.value_length", UINT32, head_dim),
        ]
    kv.append(KeyValue("general.quantization_version", UINT32, 2))
    return kv + tokenizer_metadata(tokenizer, n_vocab, pre_tokenizer) + _end_of_turn(model, tokenizer, n_vocab)


CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
EOT_KEY = "tokenizer.ggml.eot_token_id"


def _with_chat_template(metadata: list[KeyValue], tokenizer) -> list[KeyValue]:
    """The source's metadata with the given tokenizer's chat template, where it has one the
    source lacks or holds differently (a template set on the tokenizer to train chat data
    travels into the file; the same template leaves the metadata, and the file, as they were)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not isinstance(template, str) or not template:
        return metadata
    entry = KeyValue(CHAT_TEMPLATE_KEY, STRING, template)
    for i, kv in enumerate(metadata):
        if kv.key == CHAT_TEMPLATE_KEY:
            return metadata if kv.value == template else [*metadata[:i], entry, *metadata[i + 1 :]]
    return [*metadata, entry]


def _end_of_turn(model: nn.Module, tokenizer, n_vocab: int) -> list[KeyValue]:
    """``tokenizer.ggml.eot_token_id``: a stop token of the model's generation config other
    than the tokenizer's EOS (e.g. an end-of-turn token a chat template closes turns with),
    so llama.cpp stops there too."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids) if isinstance(ids, (list, tuple)) else []
    eos = getattr(tokenizer, "eos_token_id", None)
    for tid in ids:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab and tid != eos:
            return [KeyValue(EOT_KEY, UINT32, tid)]
    return []


# --------------------------------------------------------------------------- export


def _source_header(model: nn.Module, source) -> GGUFHeader | None:
    if source is not None:
        return read_header(source)
    state = state_of(model)
    record = state.source if state is not None else {}
    if record.get("format") != "gguf":
        return None
    path = record.get("path", "")
    try:
        st = os.stat(path)
    except OSError:
        raise FormatError(
            f"the model came from {path}, which no longer exists; pass source= the same file, or tokenizer= to write "
            "the metadata from the model's config"
        ) from None
    if (st.st_size, int(st.st_mtime)) != (record.get("size"), record.get("mtime")):
        raise FormatError(f"{path} has changed since the model was loaded from it; pass source= to use it anyway")
    return read_header(path)


def _prepare(model: nn.Module, tokenizer, source, pre_tokenizer):
    """(source header or None, architecture, tensors to write, metadata): everything the
    export decides before it reads a weight."""
    header = _source_header(model, source)
    config = getattr(model, "config", None)
    if header is not None:
        arch = gguf_arch.architecture(header.architecture, header.path)
        n_head = int(header.require(f"{arch.gguf_name}.attention.head_count"))
        n_head_kv = int(header.get(f"{arch.gguf_name}.attention.head_count_kv", n_head))
    else:
        if config is None:
            raise FormatError(
                "the model has no Hugging Face config and did not come from a GGUF file; qalora writes GGUF for "
                f"models of these architectures loaded with qalora.load_gguf or from a Hugging Face directory: "
                f"{gguf_arch.supported()}"
            )
        arch = gguf_arch.architecture_for_hf(getattr(config, "model_type", None), "export_gguf")
        n_head = int(config.num_attention_heads)
        n_head_kv = int(getattr(config, "num_key_value_heads", n_head) or n_head)
    items = _model_items(model, arch, n_head, n_head_kv)
    if header is None and config is not None and _rope_type(config) == "llama3":
        # llama.cpp's converter writes Llama 3.1's rope scaling as per-frequency divisors, first
        factors = llama3_rope_freqs(config)
        items.insert(0, _Item("rope_freqs.weight", (len(factors),), tensor=torch.from_numpy(factors)))
    if header is not None:
        missing = [i.gguf for i in items if i.gguf not in header.tensors]
        if missing:
            raise FormatError(f"the model has tensors its source {header.path} lacks: {', '.join(missing[:8])}")
        position = {name: i for i, name in enumerate(header.tensors)}
        items.sort(key=lambda i: position[i.gguf])
    embed = next((i for i in items if i.gguf == "token_embd.weight"), None)
    if embed is None:
        raise FormatError("the model has no token embedding (token_embd.weight)")
    n_vocab = embed.shape[1]
    metadata = (
        _with_chat_template(_metadata_from_source(header), tokenizer)
        if header is not None
        else _metadata_from_config(model, arch, tokenizer, n_vocab, pre_tokenizer)
    )
    return header, arch, items, metadata


def check_exportable(model: nn.Module, tokenizer=None, *, source=None, pre_tokenizer: str | None = None) -> None:
    """Raises what :func:`export_gguf` would raise about the model's architecture, names,
    source file or tokenizer, without writing anything (so a run can refuse before it trains)."""
    _prepare(model, tokenizer, source, pre_tokenizer)


def export_gguf(
    model: nn.Module,
    path,
    *,
    tokenizer=None,
    other_type: str = "q8_0",
    source=None,
    pre_tokenizer: str | None = None,
    show_progress: bool | None = None,
) -> GGUFExportReport:
    """Write ``model`` as a llama.cpp GGUF file (atomically), for llama.cpp, Ollama, LM Studio.

    A merged QA-LoRA layer becomes Q4_1 (codes of at most 4 bits) or Q5_1 (5 bits) with the
    layer's own codes and its scales and offsets as the blocks' float16 ``d`` and ``m``: no
    re-quantization, so llama.cpp computes with exactly the weights qalora computed with
    (when the offsets are float16, qalora's default). Tensors that did not change since the
    model was loaded from a GGUF file are copied from it byte for byte; other weights are
    written as ``other_type``. See the module documentation for the rules.

    Args:
        model: a model loaded with :func:`qalora.load_gguf` (wrapped, trained, merged or
            not), or a Hugging Face model of a supported family (llama, Mistral, Qwen2/3,
            Phi-3, Gemma 2/3; e.g. wrapped and merged).
        path: the ``.gguf`` file to write.
        tokenizer: the model's tokenizer, needed when the model did not come from a GGUF
            file (whose tokenizer metadata is copied otherwise; a chat template on this
            tokenizer replaces the file's, or is added where the file has none).
        other_type: "q8_0" (default) or "f16": how weights that Q4_1 / Q5_1 cannot hold
            exactly are written.
        source: a GGUF file to take metadata and unchanged tensors from (default: the file
            the model was loaded from).
        pre_tokenizer: llama.cpp's pre-tokenizer name, when writing a tokenizer qalora does
            not recognise (see :mod:`qalora.formats.gguf_vocab`).
        show_progress: progress bar over tensors.

    Returns:
        :class:`GGUFExportReport`: per tensor its type, how it was written and its error.

    Raises:
        FormatError: unsupported architecture or tokenizer, a missing tokenizer, a parameter
            with no GGUF name, or a source file that changed since the model was loaded.
        MergeError: the model holds dense LoRA adapters (``adapter="lora"``).
        OutputError: ``path`` cannot be written: a directory, a device (e.g. /dev/null), a
            FIFO or a symlink is there, the name is empty or holds a NUL byte, or the file
            system refused (permission, no space, file too large). Nothing is left behind
            but the previous file; temporary files of killed exports are removed.
    """
    from gguf import GGUFWriter

    if other_type not in OTHER_TYPES:
        raise FormatError(f"other_type: got {other_type!r}, allowed: {', '.join(OTHER_TYPES)}")
    other = OTHER_TYPES[other_type]
    path = check_output_path(path)  # a directory, device or symlink there: refused before any work
    header, arch, items, metadata = _prepare(model, tokenizer, source, pre_tokenizer)

    # Decide every tensor's type first: the file's directory precedes the data.
    reader = TensorReader(header.path) if header is not None else None
    plans: list[tuple[_Item, int, bool]] = []  # (item, type, copied)
    try:
        with torch.no_grad():
            for item in progress(items, desc="qalora: planning GGUF tensors", enabled=show_progress, min_items=20):
                entry = header.tensors.get(item.gguf) if header is not None else None
                if entry is not None and _unchanged(reader, entry, item):
                    plans.append((item, entry.ggml_type, True))
                else:
                    plans.append((item, _choose(item, other, entry), False))
            auxiliary = (
                [e for name, e in header.tensors.items() if name in arch.auxiliary] if header is not None else []
            )
            weights: dict[int, int] = {}
            for item, t, _ in plans:
                if len(item.shape) > 1:
                    weights[t] = weights.get(t, 0) + int(np.prod(item.shape))
            mostly = max(weights, key=weights.get) if weights else gguf_blocks.F32
            file_type = _FILE_TYPES.get(mostly, 1024)
            if header is not None and all(copied for _, _, copied in plans):
                file_type = header.get("general.file_type", file_type)

            report = GGUFExportReport(
                os.path.abspath(os.fspath(path)), header.path if header is not None else "config", arch.gguf_name
            )
            with atomic_path(path) as tmp:
                writer = GGUFWriter(tmp, arch.gguf_name)
                try:
                    _write(writer, metadata, file_type, auxiliary, plans, reader, header, report, show_progress)
                finally:
                    writer.close()
                report.bytes = os.path.getsize(tmp)
    finally:
        if reader is not None:
            reader.close()
    return report


def _write(writer, metadata, file_type, auxiliary, plans, reader, header, report, show_progress) -> None:
    # general.file_type keeps the source's place in the metadata (an untouched export is then
    # the source file byte for byte); its value says which type most weights now have.
    for kv in metadata:
        if kv.key == "general.file_type":
            kv = KeyValue(kv.key, UINT32, int(file_type))
        sub = _writer_type(kv.element_type) if kv.element_type is not None else None
        writer.add_key_value(kv.key, kv.value, _writer_type(kv.type), sub)
    if not any(kv.key == "general.file_type" for kv in metadata):
        writer.add_key_value("general.file_type", int(file_type), _writer_type(UINT32))
    # Auxiliary tensors (rope_freqs) keep their place in the source's order, so an untouched
    # export is the source file whatever the converter put first.
    position = {name: i for i, name in enumerate(header.tensors)} if header is not None else {}
    ordered = sorted(
        [(position.get(e.name, -1), e) for e in auxiliary] + [(position.get(p[0].gguf, -1), p) for p in plans],
        key=lambda x: x[0],
    )
    for _, what in ordered:
        if isinstance(what, TensorEntry):
            writer.add_tensor_info(
                what.name, (what.nbytes,), np.dtype(np.uint8), what.nbytes, raw_dtype=_qtype(what.ggml_type)
            )
            continue
        item, t, _ = what
        nbytes = _nbytes(t, item.shape)
        byte_shape = (*reversed(item.shape[1:]), nbytes // max(item.rows, 1))
        writer.add_tensor_info(item.gguf, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, what in progress(ordered, desc="qalora: writing GGUF tensors", enabled=show_progress, min_items=20):
        if isinstance(what, TensorEntry):
            writer.write_tensor_data(reader.raw(what))
            kind = gguf_blocks.type_name(what.ggml_type)
            report.tensors.append(
                TensorReport(
                    what.name,
                    kind,
                    "copied",
                    tuple(what.shape),
                    nbytes=what.nbytes,
                    source_type=kind,
                    source_nbytes=what.nbytes,
                )
            )
            continue
        item, t, copied = what
        tr = TensorReport(item.gguf, gguf_blocks.type_name(t), "copied", item.shape)
        source = header.tensors.get(item.gguf) if header is not None else None
        if source is not None:
            tr.source_type, tr.source_nbytes = gguf_blocks.type_name(source.ggml_type), source.nbytes
        if copied:
            data = reader.raw(header.tensors[item.gguf])
        else:
            errors = _Errors()
            data = np.concatenate([chunk.reshape(-1) for chunk in _encode(item, t, errors)])
            tr.max_abs_error, tr.rel_error, tr.param_rel_change = errors.max_abs, errors.rel, errors.param
            if len(item.shape) == 1 and t == gguf_blocks.F32:
                tr.how = "dense"
            elif t in (gguf_blocks.Q4_1, gguf_blocks.Q5_1):
                tr.how = "rounded" if errors.param > 0 else "exact"
            elif t in gguf_blocks.K_OFFSET_TYPES:
                tr.how = "fitted" if errors.diff2 > 0 else "exact"
                tr.offset_change_steps = errors.offset_steps
            else:
                tr.how = "converted"
        writer.write_tensor_data(data)
        tr.nbytes = int(data.nbytes)
        report.tensors.append(tr)


def _writer_type(t: int):
    from gguf import GGUFValueType

    return GGUFValueType(t)


def _qtype(t: int):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(t)


def save_report(report: GGUFExportReport, path) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
