"""GGUF in: a llama.cpp model file straight into a PyTorch model whose linear layers are
:class:`qalora.QuantLinear`, without a dense copy of the quantized weights.

The model skeleton is built from the file's config on the meta device (no memory; see
:mod:`qalora.hf_skeleton`), the config and tokenizer come from transformers' GGUF support
(cached after the first load), and every quantized linear weight goes from the file's
blocks into a QuantLinear's packed codes, scales and offsets a slice of rows at a time (see
:mod:`.gguf_blocks` for the exactness argument). Embeddings, norms, biases and F32/F16/BF16
linear weights are dense.

The file is untrusted: its header is checked by :mod:`.gguf_validate` before transformers
or the skeleton see it, and dense tensors holding NaN or Inf are refused as they are read.
The config cache is keyed by a hash of the header's bytes, and a refused file leaves no
cache entry behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import hf_skeleton, ops
from ..errors import ConfigError, FormatError, ModelLoadError, QALoRAError
from ..hf_skeleton import apply_rope_freqs, restore_from_source  # noqa: F401  (both were defined here)
from ..layers import QuantEmbedding, QuantLinear
from ..loaded import LoadedModel, cache_root
from ..optional import require
from ..progress import progress
from ..state import QALoRAState, attach_state
from ..targets import replace_module
from . import gguf_arch, gguf_blocks, gguf_validate
from .gguf_file import GGUFHeader, TensorEntry, TensorReader, read_header

#: Weights decoded per slice of rows (bounds the import's temporary memory).
CHUNK_WEIGHTS = 1 << 21

_TORCH = {np.float16: torch.float16, np.float32: torch.float32}
# Types whose group parameters a layer holds factored, as the file does.
_K_TYPES = (gguf_blocks.Q2_K, gguf_blocks.Q3_K, gguf_blocks.Q4_K, gguf_blocks.Q5_K, gguf_blocks.Q6_K)


@dataclass
class ImportedLayer:
    """How one GGUF tensor became a qalora layer (for reports and the exporter)."""

    gguf_name: str
    module: str
    ggml_type: str
    bits: int  # code width of the GGUF type
    stored_bits: int  # bits of the QuantLinear's packed codes
    group_size: int
    rope_heads: int | None


#: Bumped when :func:`family_config` changes what it sets, so no cached config predates it.
CONFIG_RULES = 3


def _cache_key(header: GGUFHeader) -> str:
    """What the cached config and tokenizer are made from: the header's bytes (metadata and
    tensor directory, hashed by :func:`read_header`), the transformers that read them and
    qalora's own settings on top (:data:`CONFIG_RULES`). A file replaced in place, same size
    and time stamp or not, gets a new key."""
    version = getattr(_transformers(), "__version__", "")
    return hashlib.sha256(f"{header.digest}|{version}|{CONFIG_RULES}".encode()).hexdigest()[:16]


def cache_dir(header: GGUFHeader) -> str:
    stem = os.path.splitext(os.path.basename(header.path))[0].lower()
    return os.path.join(cache_root(), "gguf-meta", f"{stem}-{_cache_key(header)}")


def _same_header(header: GGUFHeader) -> bool:
    """Whether the file still starts with the header that was checked (transformers reads
    the file itself, after the check)."""
    try:
        with open(header.path, "rb") as f:
            data = f.read(header.header_size)
    except OSError:
        return False
    return len(data) == header.header_size and hashlib.sha256(data).hexdigest() == header.digest


def _transformers():
    return require(
        "transformers", "loading a GGUF file", needs="transformers and gguf", install="'transformers>=5' gguf"
    )


def config_and_tokenizer(path: str, header: GGUFHeader | None = None, shape=None):
    """The Hugging Face config and tokenizer of a GGUF file (transformers' GGUF support),
    cached as a small directory (config + tokenizer files) so later loads skip the parse.
    The header is validated first (pass ``header`` and ``shape`` when done already), and a
    file is cached only once transformers' config agrees with it.
    Returns (config, tokenizer, whether the cache already held them)."""
    transformers = _transformers()
    if header is None:
        header = read_header(path)
    if shape is None:
        shape = gguf_validate.validate(header, check_memory=False)
    cache = cache_dir(header)
    cached = os.path.isfile(os.path.join(cache, "config.json"))
    if not cached:
        directory, name = os.path.split(os.path.abspath(path))
        try:
            config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        except (QALoRAError, MemoryError):
            raise
        except Exception as e:  # what the checks missed is still refused, by name
            raise FormatError(
                f"{path}: transformers could not read the file's config or tokenizer ({type(e).__name__}: "
                f"{str(e)[:300]})"
            ) from e
        if not _same_header(header):
            raise FormatError(f"{path}: the file changed while it was being read")
        family_config(config, header, shape)
        gguf_validate.check_config(config, shape, path)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".meta-", dir=os.path.dirname(cache))
        try:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if os.path.exists(cache):
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    config = transformers.AutoConfig.from_pretrained(cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache)
    gguf_validate.check_config(config, shape, path)
    return config, tokenizer, cached


#: Gemma block counts llama.cpp takes for the 27B models, whose attention scale it takes from
#: hidden / heads instead of the head dimension (as the released configs'
#: query_pre_attn_scalar does).
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def family_config(config, header: GGUFHeader, shape) -> None:
    """Sets what the file says and transformers' GGUF reader leaves at its config class's
    defaults, as llama.cpp reads it, so qalora computes what llama.cpp computes: the head
    dimension (Qwen3's reader ignores attention.key_length and keeps 128; Gemma's default is
    256), rope scaling (:func:`_rope_scaling`, :func:`_longrope`, partial rotary), and Gemma's
    attention scale and soft-capping."""
    a = shape.arch.gguf_name
    _rope_scaling(config, header, a)
    if a in ("llama", "qwen2"):
        return
    config.head_dim = shape.head_dim
    if a in _GEMMA_27B_BLOCKS:
        big = shape.n_layers == _GEMMA_27B_BLOCKS[a]
        config.query_pre_attn_scalar = shape.hidden // shape.n_head if big else shape.head_dim
    if a == "phi3" and "rope_factors_short.weight" in header.tensors:
        _longrope(config, header)
    if a == "phi3" and shape.rope_dim != shape.head_dim:  # transformers' reader skips rope.dimension_count
        config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": shape.rope_dim / shape.head_dim}
    if a == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = header.get(f"gemma2.{key}")
            if value is not None:
                setattr(config, key, float(value))


def _rope_scaling(config, header: GGUFHeader, a: str) -> None:
    """The file's rope.scaling.type, which transformers' GGUF readers skip: linear scaling
    (its factor divides the rotary frequencies, as in llama.cpp) goes into the config; Phi-3's
    LongRoPE comes with its factor tensors (:func:`_longrope`); any other type (yarn, ...)
    is refused by name rather than computed differently from llama.cpp."""
    kind = header.get(f"{a}.rope.scaling.type")
    factor = header.get(f"{a}.rope.scaling.factor", header.get(f"{a}.rope.scale_linear"))
    if kind is None and factor not in (None, 1.0):
        kind = "linear"  # llama.cpp's default type for a factor given alone (older files: rope.scale_linear)
    if kind in (None, "none") or (kind == "longrope" and a == "phi3" and "rope_factors_short.weight" in header.tensors):
        return
    if kind != "linear" or factor is None or a == "phi3":  # transformers' Phi-3 has LongRoPE only
        raise FormatError(
            f"{header.path}: {a}.rope.scaling.type = {kind!r}"
            + (" without rope.scaling.factor" if kind == "linear" and factor is None else "")
            + f" is not supported for {a}; qalora reads linear rope scaling with its factor"
            + (" and Phi-3's LongRoPE factors" if a == "phi3" else "")
        )
    linear = {"rope_type": "linear", "factor": float(factor)}
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if a == "gemma3":  # llama.cpp scales the global layers' rope only (Gemma 3 4B and up)
        rope["full_attention"] = {**rope["full_attention"], **linear}
    else:
        rope.update(linear)
    config.rope_parameters = rope


def _longrope(config, header: GGUFHeader) -> None:
    """Phi-3 LongRoPE (the 128k-context Phi-3 / 3.5 / 4-mini files): the converter stores the
    per-frequency divisors as rope_factors_short / rope_factors_long, the pretraining context
    and the cos/sin scale as rope.scaling.original_context_length / attn_factor. transformers'
    GGUF reader drops all of them; its Phi-3 computes LongRoPE from this config: the short
    factors up to the original context, the long ones beyond (llama.cpp picks by its context
    size instead: short up to the original context)."""
    original = header.get("phi3.rope.scaling.original_context_length")
    if original is None:
        raise FormatError(
            f"{header.path}: rope_factors_short.weight needs phi3.rope.scaling.original_context_length "
            "(the context the short factors apply to)"
        )
    with TensorReader(header.path) as reader:
        short, long = (_divisors(reader, header.tensors[f"rope_factors_{k}.weight"]) for k in ("short", "long"))
    rope = dict(config.rope_parameters)
    rope.update(
        rope_type="longrope",
        short_factor=[float(v) for v in short],
        long_factor=[float(v) for v in long],
        original_max_position_embeddings=int(original),
        # llama.cpp scales cos/sin by the file's factor, 1 when absent (transformers would derive one)
        attention_factor=float(header.get("phi3.rope.scaling.attn_factor", 1.0)),
    )
    config.rope_parameters = rope
    config.original_max_position_embeddings = int(original)


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory);
    buffers (rotary frequencies) are real."""
    return hf_skeleton.meta_model(_transformers().AutoModelForCausalLM, config, dtype=dtype)


def _row_slices(rows: int, k: int):
    step = max(1, CHUNK_WEIGHTS // max(k, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _check_finite(values: torch.Tensor, entry: TensorEntry, path: str, first_row: int = 0) -> None:
    """Refuses NaN / Inf in a slice of a dense tensor's values (rows from ``first_row``), as
    the model will hold them (a large float32 value can overflow a float16 model)."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    local = tuple(int(i) for i in torch.nonzero(~finite)[0])
    where = (local[0] + first_row, *local[1:]) if values.dim() > 1 else local
    held = "" if values.dtype == torch.float32 else f" as {str(values.dtype).removeprefix('torch.')}"
    raise FormatError(
        f"{path}: tensor {entry.name!r} ({gguf_blocks.type_name(entry.ggml_type)}) holds a non-finite value "
        f"({float(values[local])}{held}) at index {where}; pass allow_nonfinite=True to load it anyway"
    )


def _dense_rows(
    reader: TensorReader,
    entry: TensorEntry,
    out: torch.Tensor,
    order: np.ndarray | None,
    allow_nonfinite: bool = False,
) -> None:
    """Decodes a tensor into the preallocated float tensor ``out`` (rows, ne0), slice by slice."""
    k = entry.shape[0]
    for a, b in _row_slices(entry.rows, k):
        raw = reader.rows(entry, a, b)
        values = torch.from_numpy(gguf_blocks.decode_dense(entry.ggml_type, raw, entry.name).reshape(b - a, k))
        values = values.to(out.dtype)
        if not allow_nonfinite:
            _check_finite(values, entry, reader.path, a)
        dst = slice(a, b) if order is None else torch.from_numpy(order[a:b])
        out[dst] = values


def _quant_layer(
    reader: TensorReader,
    entry: TensorEntry,
    bias: bool,
    order: np.ndarray | None,
    module: str,
    factor: bool = True,
) -> tuple[QuantLinear, ImportedLayer]:
    """A QuantLinear holding a quantized GGUF tensor, filled a slice of rows at a time; a
    K-quant's group parameters stay factored as the file stores them (QuantLinear.factor_)
    unless ``factor`` is False.

    The buffers are numpy arrays handed to torch without a copy: numpy fills them on one
    thread, which is as fast as a memory copy gets and does not compete with torch's pool."""
    fmt = gguf_blocks.format_of(entry.ggml_type, entry.name)
    k, n = entry.shape[0], entry.rows
    stored = fmt.bits if fmt.bits in ops.SUPPORTED_BITS else 8
    groups = k // fmt.group_size
    packed = np.empty((n, k * stored // 8), dtype=np.uint8)
    factored = _FactoredBuffers(n, groups, k // fmt.block_weights) if factor and entry.ggml_type in _K_TYPES else None
    if factored is None:
        scales = np.empty((n, groups), dtype=fmt.param_dtype)
        offsets = np.empty((n, groups), dtype=np.float32)
    offset_dtype = fmt.param_dtype
    for a, b in _row_slices(n, k):
        dec = gguf_blocks.decode_rows(entry.ggml_type, reader.rows(entry, a, b), k, entry.name)
        if gguf_blocks.storage_dtypes(entry.ggml_type, dec)[1] is np.float32:
            offset_dtype = np.float32  # an implied -8d overflowed float16
        dst = slice(a, b) if order is None else order[a:b]
        packed[dst] = dec.codes if stored == 8 else ops.pack(dec.codes, stored)
        if factored is None:
            scales[dst] = dec.scales
            offsets[dst] = dec.offsets
        elif dec.factored is not None:
            factored.fill(dst, dec.factored)
        else:
            # An implied minimum's factor overflows float16 (no real file): the tensor is
            # read again into float32 parameters.
            return _quant_layer(reader, entry, bias, order, module, factor=False)
    # Built on the meta device, then given the filled buffers: nothing is allocated twice.
    layer = QuantLinear(
        k, n, stored, fmt.group_size, False, _TORCH[fmt.param_dtype], "meta", module, offset_dtype=_TORCH[offset_dtype]
    )
    layer.packed = torch.from_numpy(packed)
    if factored is not None:
        layer.factor_(*factored.tensors())
    else:
        layer.scales = torch.from_numpy(scales)
        layer.offsets = torch.from_numpy(offsets if offset_dtype is np.float32 else offsets.astype(np.float16))
    if bias:
        layer.bias = nn.Parameter(torch.zeros(n), requires_grad=False)
    info = ImportedLayer(entry.name, module, fmt.name, fmt.bits, stored, fmt.group_size, None)
    return layer, info


class _FactoredBuffers:
    """A K-quant layer's factored group parameters (gguf_blocks.FactoredParams), filled a
    slice of rows at a time."""

    def __init__(self, n: int, groups: int, blocks: int) -> None:
        self.shape = (n, groups)
        self.scale_ints = self.offset_ints = None
        self.scale_factors = np.empty((n, blocks), dtype=np.float16)
        self.offset_factors = np.empty((n, blocks), dtype=np.float16)

    def fill(self, dst, part: gguf_blocks.FactoredParams) -> None:
        n, groups = self.shape
        if self.scale_ints is None:  # dtypes from the first slice: uint8, or int8 (Q3_K/Q6_K)
            self.scale_ints = np.empty((n, groups), dtype=part.scale_ints.dtype)
            if part.offset_ints is not None:
                self.offset_ints = np.empty((n, groups), dtype=part.offset_ints.dtype)
        self.scale_ints[dst] = part.scale_ints
        if self.offset_ints is not None:
            self.offset_ints[dst] = part.offset_ints
        self.scale_factors[dst] = part.scale_factors
        self.offset_factors[dst] = part.offset_factors

    def tensors(self) -> tuple:
        t = torch.from_numpy
        offsets = None if self.offset_ints is None else t(self.offset_ints)
        return t(self.scale_ints), t(self.scale_factors), offsets, t(self.offset_factors)


def _set_dense(
    module: nn.Module,
    attr: str,
    reader: TensorReader,
    entry: TensorEntry,
    order,
    what: str,
    allow_nonfinite: bool = False,
    shift: float = 0.0,
) -> None:
    """Fills a dense parameter of ``module`` (embedding, norm, bias, F32/F16/BF16 weight) from
    the tensor, in the module's dtype, rows in Hugging Face order, less ``shift`` (what the
    converter added to a 1-D tensor)."""
    old = getattr(module, attr, None)
    if not isinstance(old, torch.Tensor):
        raise FormatError(f"{what}: the model has no such parameter for tensor {entry.name!r}")
    shape = tuple(reversed(entry.shape)) if len(entry.shape) > 1 else (entry.shape[0],)
    if tuple(old.shape) != shape:
        raise FormatError(f"{what} has shape {tuple(old.shape)} in the config, the file holds {shape}")
    value = torch.empty(shape, dtype=old.dtype)
    if len(shape) == 1:
        raw = gguf_blocks.decode_dense(entry.ggml_type, reader.raw(entry), entry.name)
        if shift:
            raw = (raw.astype(np.float32) - np.float32(shift)).astype(np.float32)  # Gemma's norms: llama.cpp adds 1
        value.copy_(torch.from_numpy(raw if order is None else raw[order_inverse(order)]))
        if not allow_nonfinite:
            _check_finite(value, entry, reader.path)
    else:
        _dense_rows(reader, entry, value, order, allow_nonfinite)
    if isinstance(module, QuantLinear):
        module.bias = nn.Parameter(value.to(torch.float32), requires_grad=False)  # a quantized layer's bias
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))


@dataclass
class Imported:
    model: nn.Module
    tokenizer: object
    header: GGUFHeader
    layers: list[ImportedLayer]
    cached: bool  # the config and tokenizer came from the cache
    rope_freqs: np.ndarray | None


def import_gguf(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    show_progress: bool | None = None,
    allow_nonfinite: bool = False,
    quantized_embedding: bool = False,
) -> Imported:
    """Reads a GGUF file into a model and its tokenizer; see :func:`load_gguf`."""
    for name, value in (("allow_nonfinite", allow_nonfinite), ("quantized_embedding", quantized_embedding)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: got {value!r}, it must be True or False")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    header = read_header(path)
    shape = gguf_validate.validate(header, itemsize=torch.empty((), dtype=dtype).element_size())
    config, tokenizer, cached = config_and_tokenizer(path, header, shape)
    try:
        model, layers, rope_freqs = _fill(
            path, header, shape, config, dtype, show_progress, allow_nonfinite, quantized_embedding
        )
    except BaseException:
        if not cached:  # a refused file leaves no cache entry behind
            shutil.rmtree(cache_dir(header), ignore_errors=True)
        raise
    return Imported(model, tokenizer, header, layers, cached, rope_freqs)


def _divisors(reader: TensorReader, entry: TensorEntry) -> np.ndarray:
    """A rotary-divisor tensor (rope_freqs, rope_factors_*): finite and positive, or refused."""
    values = gguf_blocks.decode_dense(entry.ggml_type, reader.raw(entry), entry.name).astype(np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise FormatError(
            f"{reader.path}: tensor {entry.name!r} must hold finite positive divisors; it holds {values[bad][0]}"
        )
    return values


def _quant_embedding(layer: QuantLinear, embedding: nn.Embedding, dtype: torch.dtype, name: str) -> QuantEmbedding:
    """A quantized token_embd held as it is in the file (a QuantLinear(D, V)'s buffers) as a
    :class:`QuantEmbedding` looking rows up: no dense copy of the table. (A K-quant table
    holds float32 group parameters: the lookup does not read the factored form.)"""
    layer.unfactor_()
    table = QuantEmbedding(
        layer.out_features,
        layer.in_features,
        layer.bits,
        layer.group_size,
        layer.scales.dtype,
        "meta",
        name,
        offset_dtype=layer.offsets.dtype,
        dtype=dtype,
        padding_idx=embedding.padding_idx,
    )
    for key in ("packed", "scales", "offsets"):
        table._buffers[key] = layer._buffers[key]
    return table


def _fill(path, header, shape, config, dtype, show_progress, allow_nonfinite, quantized_embedding=False):
    """The skeleton of ``config`` with the file's tensors in it."""
    arch = shape.arch
    model = build_skeleton(config, dtype)
    n_head, n_head_kv = shape.n_head, shape.n_head_kv
    modules = dict(model.named_modules())
    layers: list[ImportedLayer] = []
    rope_freqs = None
    # Weights first, so a bias (Qwen2) finds its layer already converted.
    entries = sorted(header.tensors.values(), key=lambda e: (not e.name.endswith(".weight"), e.offset))
    with TensorReader(path) as reader:
        for entry in progress(entries, desc="qalora: importing GGUF tensors", enabled=show_progress, min_items=20):
            heads = gguf_arch.rope_heads(entry.name, arch, n_head, n_head_kv)
            rows = entry.rows if len(entry.shape) > 1 else entry.shape[0]
            order = None if heads is None else gguf_arch.rope_order(rows, heads)
            name = arch.hf_name(entry.name)
            if name is None:
                if entry.name not in arch.auxiliary:
                    raise FormatError(f"{path}: tensor {entry.name!r} has no place in a {arch.gguf_name} model")
                if entry.name == "rope_freqs.weight":
                    rope_freqs = _divisors(reader, entry)
                    apply_rope_freqs(model, config, rope_freqs, path)
                continue  # Phi-3's rope_factors_* are in the config already (family_config)
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if module is None:
                raise FormatError(
                    f"{path}: tensor {entry.name!r} maps to {module_name!r}, which this model's config does not have"
                )
            if isinstance(module, nn.Linear) and attr == "weight" and entry.ggml_type in gguf_blocks.FORMATS:
                if (entry.shape[0], entry.rows) != (module.in_features, module.out_features):
                    raise FormatError(
                        f"{path}: {entry.name} is {entry.shape[0]} x {entry.rows} (in x out), the config makes "
                        f"{module_name} {module.in_features} x {module.out_features}"
                    )
                layer, info = _quant_layer(reader, entry, module.bias is not None, order, module_name)
                info.rope_heads = heads
                replace_module(model, module_name, layer)
                modules[module_name] = layer
                layers.append(info)
            elif (
                quantized_embedding
                and type(module) is nn.Embedding  # a subclass (Gemma's scaled one) does more than look up
                and module.max_norm is None
                and attr == "weight"
                and entry.ggml_type in gguf_blocks.FORMATS
                and entry.shape[0] % gguf_blocks.FORMATS[entry.ggml_type].group_size == 0
            ):
                if (entry.rows, entry.shape[0]) != tuple(module.weight.shape):
                    raise FormatError(
                        f"{path}: {entry.name} is {entry.rows} x {entry.shape[0]}, the config makes {module_name} "
                        f"{tuple(module.weight.shape)}"
                    )
                layer, _ = _quant_layer(reader, entry, False, order, module_name)
                table = _quant_embedding(layer, module, dtype, module_name)
                replace_module(model, module_name, table)
                modules[module_name] = table
            else:
                shift = arch.shift(entry.name)
                _set_dense(module, attr, reader, entry, order, f"{path}: {name}", allow_nonfinite, shift)
    if getattr(config, "tie_word_embeddings", False) and "output.weight" not in header.tensors:
        table = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if isinstance(table, QuantEmbedding) and isinstance(head, nn.Linear):
            # the head computes the logits from the table's own tensors (one copy, still tied)
            names = [n for n, m in model.named_modules() if m is head]
            replace_module(model, names[0], table.tied_head(head.bias if head.bias is not None else None))
        else:
            model.tie_weights()
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if leftover:
        raise FormatError(
            f"{path}: the file has no tensor for {', '.join(leftover[:8])}{' ...' if len(leftover) > 8 else ''}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, layers, rope_freqs


def load_gguf(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    show_progress: bool | None = None,
    allow_nonfinite: bool = False,
    quantized_embedding: bool = False,
) -> LoadedModel:
    """Load a llama.cpp GGUF model: its quantized linear layers become :class:`qalora.QuantLinear`
    straight from the file's blocks, with no dense copy of them ever made.

    Each imported layer keeps the file's code width and group size (Q4_0/Q4_1/Q4_K: 4 bits,
    Q5_x: 5, Q6_K: 6, Q8_0: 8, Q2_K: 2, Q3_K: 3; groups of 32, or 16 for Q2_K/Q3_K/Q6_K), and
    ``layer.dequantize()`` in float32 equals ``gguf.quants.dequantize`` of the tensor (after
    undoing llama.cpp's rope row order of attn_q / attn_k). :func:`qalora.wrap` then puts
    adapters on these layers without re-quantizing them, each pooling over its own groups;
    ``config.bits`` / ``group_size`` apply only to layers the file stores dense
    (F32/F16/BF16). The model remembers the file (``model.qalora_state.source``), so
    :func:`qalora.export_gguf` can copy unchanged tensors from it byte for byte.

    Args:
        path: a ``.gguf`` file of a supported architecture (llama family: Llama 2/3.x,
            TinyLlama, SmolLM2, Mistral; Qwen2/2.5; Qwen3; Phi-3/Phi-4; Gemma 2; Gemma 3).
        dtype: dtype of the dense tensors (embeddings, norms, F32/F16/BF16 layers).
        show_progress: progress bar over tensors (default: for files of 20 tensors or more).
        allow_nonfinite: load F32/F16/BF16 tensors that hold NaN or Inf (refused by default:
            such a model computes NaN logits).
        quantized_embedding: keep a quantized ``token_embd`` as it is in the file, a frozen
            :class:`qalora.layers.QuantEmbedding` that dequantizes only the rows looked up
            (a head tied to it holds the same tensors), instead of a dense table: 1/5 of
            the memory of a float32 table for Q4_K (0.4 instead of 2.0 GiB at Llama-3-8B's
            vocabulary). Off by default; embeddings that scale their output (Gemma's) stay dense.

    Returns:
        :class:`qalora.LoadedModel` with ``.model`` (in eval mode, every parameter frozen)
        and ``.tokenizer``.

    Raises:
        ModelLoadError: the file does not exist, transformers / gguf are missing, or the
            model needs more memory than this process has.
        FormatError: not a GGUF file, an unsupported architecture or tensor type (named), a
            header field of the wrong type, out of range or inconsistent (named, with its
            allowed range; see :mod:`qalora.formats.gguf_validate`), tensors that do not fit
            the file's own config, or a dense tensor holding NaN / Inf.
        InvalidValueError: a quantized block with a non-finite scale.
    """
    start = time.perf_counter()
    got = import_gguf(
        path,
        dtype=dtype,
        show_progress=show_progress,
        allow_nonfinite=allow_nonfinite,
        quantized_embedding=quantized_embedding,
    )
    source = source_record(got.header, got.layers, got.rope_freqs)
    tokenizer_dir = getattr(got.tokenizer, "name_or_path", None)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        source["tokenizer"] = tokenizer_dir  # the cached copy, saved with the model by save_pretrained
    attach_state(got.model, QALoRAState(config=None, source=source))
    return LoadedModel(got.model, got.tokenizer, got.header.path, time.perf_counter() - start, from_cache=got.cached)


def order_inverse(order: np.ndarray) -> np.ndarray:
    return np.argsort(order, kind="stable")


def source_record(header: GGUFHeader, layers: list[ImportedLayer], rope_freqs=None) -> dict:
    """What a model remembers about the GGUF file it came from (JSON-serializable)."""
    st = os.stat(header.path)
    record = {
        "format": "gguf",
        "path": header.path,
        "size": st.st_size,
        "mtime": int(st.st_mtime),
        "architecture": header.architecture,
        "layers": {
            info.module: {
                "tensor": info.gguf_name,
                "type": info.ggml_type,
                "bits": info.bits,
                "stored_bits": info.stored_bits,
                "group_size": info.group_size,
            }
            for info in layers
        },
    }
    if rope_freqs is not None:
        record["rope_freqs"] = [float(v) for v in rope_freqs]
    return record
