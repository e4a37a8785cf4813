"""Random-weight GGUF files of a real architecture (llama, qwen2, qwen3, phi3, gemma2,
gemma3), written with the ``gguf`` package's GGUFWriter the way llama.cpp's converter writes
that family (metadata keys, tensor names and shapes, tensor order), one tensor at a time (a
1 B-parameter file never sits in memory). Used by the GGUF tests and by
benches/bench_gguf_import.py.

Quantized tensors are random block bytes (every code and sub-scale pattern occurs) whose
float16 scale fields are overwritten with small finite values, so the weights have a
plausible magnitude. The vocabulary is a byte-level BPE (GPT-2 style): 256 byte tokens,
merges of byte pairs, and three control tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

# Byte offsets of the float16 scale fields inside one block, and their magnitude range.
_SCALE_FIELDS = {
    "Q4_0": ((0,), 2e-3, 6e-3),
    "Q4_1": ((0,), 2e-3, 6e-3),
    "Q5_0": ((0,), 1e-3, 3e-3),
    "Q5_1": ((0,), 1e-3, 3e-3),
    "Q8_0": ((0,), 1e-4, 3e-4),
    "Q2_K": ((80, 82), 1e-3, 3e-3),
    "Q3_K": ((108,), 2e-4, 6e-4),
    "Q4_K": ((0, 2), 2e-4, 6e-4),
    "Q5_K": ((0, 2), 1e-4, 3e-4),
    "Q6_K": ((208,), 1e-5, 3e-5),
}
# Q4_1 / Q5_1 minimum field: centre the weights around zero.
_MIN_FIELD = {"Q4_1": (2, 8.0), "Q5_1": (2, 16.0)}
# K-quant sub-block scale/min bytes set to their top value in every super-block, as ggml's
# quantizers leave them (the largest sub-scale and sub-min of a block are 63, for Q2_K 15):
# byte -> bits OR-ed in.
_K_TOP = {"Q4_K": ((4, 63), (8, 63)), "Q5_K": ((4, 63), (8, 63)), "Q2_K": ((0, 0xFF),)}


#: One type per role covering every K-quant and legacy type the importer reads.
EVERY_TYPE = {
    "attn_q": "Q3_K",
    "attn_k": "Q2_K",
    "attn_v": "Q6_K",
    "attn_output": "Q5_K",
    "ffn_gate": "Q4_K",
    "ffn_up": "Q8_0",
    "ffn_down": "Q5_0",
    "token_embd": "Q4_0",
    "output": "Q5_1",
}


def byte_level_alphabet() -> list[str]:
    """The GPT-2 byte-level alphabet: printable bytes stand for themselves, the others are
    shifted to code points from 256 on (token text must be valid, visible unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclass
class SyntheticSpec:
    arch: str = "llama"
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    vocab: int = 512  # at least 259
    context: int = 2048
    tied: bool = True
    #: GGUF type per tensor role ("attn_q", ..., "ffn_down", "token_embd", "output"); "default"
    #: applies to the linear layers not named.
    types: dict[str, str] = field(default_factory=lambda: {"default": "Q4_1", "token_embd": "Q8_0", "output": "Q8_0"})
    name: str = "synthetic"
    #: a rope_freqs.weight tensor (first in the file, as the converter writes it): "random"
    #: divisors, or "llama3" (Llama 3.1's scaling: factor 8, low/high frequency factors 1 and 4,
    #: original context 8192)
    rope_freqs: bool | str = False
    rope_theta: float = 10000.0
    #: Phi-3 LongRoPE: rope_factors_long / rope_factors_short first in the file, the
    #: pretraining context (rope.scaling.original_context_length) and the cos/sin scale
    #: (rope.scaling.attn_factor) as the converter derives it from context / original
    longrope_original: int | None = None
    #: attention.key_length, for a head dimension other than hidden / heads
    key_length: int | None = None
    #: rope.dimension_count below the head dimension (Phi-4-mini rotates 3/4 of each head)
    rope_dim: int | None = None
    #: more metadata: key -> (GGUFWriter add_<kind> method, value)
    extra_metadata: dict[str, tuple] = field(default_factory=dict)
    #: multiplies the scales of attn_q / attn_k / attn_qkv: random weights otherwise give
    #: near-uniform attention, which hides how a reader scales and rotates queries and keys
    attn_scale: float = 1.0
    #: tensors to leave out of the plan, and (name, ne, type name) to add at its end
    omit: tuple[str, ...] = ()
    extra_tensors: tuple[tuple, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim


def _vocab(n: int):
    alphabet = byte_level_alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, types = list(specials), [3, 3, 3]
    tokens += alphabet
    types += [1] * 256
    merges, seen = [], set(tokens)
    i = 0
    # Merges of two printable letters first (so ordinary text merges), then any byte pairs.
    order = [c for c in alphabet if c.isalpha()] + [c for c in alphabet if not c.isalpha()]
    pairs = len(order) ** 2
    first_pair = len(tokens)
    while len(tokens) < n:
        if i < pairs:
            a, b = order[i % len(order)], order[i // len(order)]
        else:  # every byte pair taken (vocabularies of 128 k): a pair token and one more byte
            j = i - pairs
            a, b = tokens[first_pair + j % (pairs // 2)], order[(j // (pairs // 2)) % len(order)]
        i += 1
        if a + b in seen:
            continue
        seen.add(a + b)
        tokens.append(a + b)
        types.append(1)
        merges.append(f"{a} {b}")
    return tokens, types, merges


def _linear_shapes(spec: SyntheticSpec) -> dict[str, tuple]:
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    if spec.arch == "phi3":  # fused: q, k, v rows in one tensor; gate rows, then up rows
        return {
            "attn_qkv": (spec.hidden, q + 2 * kv),
            "attn_output": (q, spec.hidden),
            "ffn_up": (spec.hidden, 2 * spec.ffn),
            "ffn_down": (spec.ffn, spec.hidden),
        }
    return {
        "attn_q": (spec.hidden, q),
        "attn_k": (spec.hidden, kv),
        "attn_v": (spec.hidden, kv),
        "attn_output": (q, spec.hidden),
        "ffn_gate": (spec.hidden, spec.ffn),
        "ffn_up": (spec.hidden, spec.ffn),
        "ffn_down": (spec.ffn, spec.hidden),
    }


def _block_norms(spec: SyntheticSpec) -> tuple[list[str], list[str]]:
    """The norms of a block before and after its linear layers, as llama.cpp names them."""
    if spec.arch in ("gemma2", "gemma3"):
        return ["attn_norm"], ["post_attention_norm", "ffn_norm", "post_ffw_norm"]
    return ["attn_norm"], ["ffn_norm"]


def tensor_plan(spec: SyntheticSpec):
    """[(name, ne (ne0, ne1, ...), type name)] in file order."""
    plan = []
    if spec.rope_freqs:  # the converter yields its generated tensors first
        plan.append(("rope_freqs.weight", (spec.head_dim // 2,), "F32"))
    if spec.longrope_original:
        plan += [(f"rope_factors_{k}.weight", (spec.rotary_dim // 2,), "F32") for k in ("long", "short")]
    plan.append(("token_embd.weight", (spec.hidden, spec.vocab), spec.types.get("token_embd", "Q8_0")))
    before, after = _block_norms(spec)
    for i in range(spec.layers):
        for norm in before:
            plan.append((f"blk.{i}.{norm}.weight", (spec.hidden,), "F32"))
        for part, shape in _linear_shapes(spec).items():
            plan.append((f"blk.{i}.{part}.weight", shape, spec.types.get(part, spec.types.get("default", "Q4_1"))))
            if spec.arch == "qwen2" and part in ("attn_q", "attn_k", "attn_v"):
                plan.append((f"blk.{i}.{part}.bias", (shape[1],), "F32"))
            if spec.arch in ("qwen3", "gemma3") and part in ("attn_q", "attn_k"):
                plan.append((f"blk.{i}.{part}_norm.weight", (spec.head_dim,), "F32"))
        for norm in after:
            plan.append((f"blk.{i}.{norm}.weight", (spec.hidden,), "F32"))
    plan.append(("output_norm.weight", (spec.hidden,), "F32"))
    if not spec.tied:
        plan.append(("output.weight", (spec.hidden, spec.vocab), spec.types.get("output", "Q8_0")))
    return [t for t in plan if t[0] not in spec.omit] + list(spec.extra_tensors)


def llama3_rope_freqs(spec: SyntheticSpec) -> np.ndarray:
    """The divisors llama.cpp's converter computes for Llama 3.1's rope scaling (factor 8,
    low/high frequency factors 1 and 4, original context 8192): 1 for short wavelengths, 8
    for long ones, smoothly in between."""
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    dim = spec.head_dim
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    return out.astype(np.float32)


def _tensor_bytes(rng: np.random.Generator, name: str, ne: tuple, type_name: str, spec: SyntheticSpec) -> np.ndarray:
    qtype = GGMLQuantizationType[type_name]
    count = int(np.prod(ne))
    if type_name == "F32":
        if name.endswith("norm.weight"):  # for Gemma, llama.cpp's (weight + 1)
            return (1.0 + 0.1 * rng.standard_normal(count)).astype(np.float32)
        if name.startswith("rope_factors_"):  # short: near 1; long: up to tens
            return rng.uniform(1.0, 1.5 if "short" in name else 40.0, count).astype(np.float32)
        if name.startswith("rope_freqs"):
            if spec.rope_freqs == "llama3":
                return llama3_rope_freqs(spec)
            return rng.uniform(1.0, 8.0, count).astype(np.float32)
        return (0.02 * rng.standard_normal(count)).astype(np.float32)
    if type_name in ("F16", "BF16"):
        w = (0.02 * rng.standard_normal(count)).astype(np.float32)
        if type_name == "F16":
            return w.astype(np.float16)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(count // block, size), dtype=np.uint8)
    fields, lo, hi = _SCALE_FIELDS.get(type_name, ((0,), 1e-3, 3e-3))  # other types: random bytes, d first
    if any(f".{part}.weight" in name for part in ("attn_q", "attn_k", "attn_qkv")):
        lo, hi = lo * spec.attn_scale, hi * spec.attn_scale
    d = rng.uniform(lo, hi, size=blocks.shape[0]).astype(np.float16)
    for at in fields:
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    for at, bits in _K_TOP.get(type_name, ()):
        blocks[:, at] |= np.uint8(bits)
    if type_name in _MIN_FIELD:
        at, half = _MIN_FIELD[type_name]
        m = (-half * d.astype(np.float32)).astype(np.float16)
        blocks[:, at : at + 2] = m.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def write_synthetic_gguf(path, spec: SyntheticSpec | None = None, seed: int = 0) -> SyntheticSpec:
    """Writes a random-weight GGUF of ``spec`` to ``path``; returns the spec."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(seed)
    w = GGUFWriter(os.fspath(path), spec.arch)
    a = spec.arch
    w.add_name(spec.name)
    w.add_uint32(f"{a}.context_length", spec.context)
    w.add_uint32(f"{a}.embedding_length", spec.hidden)
    w.add_uint32(f"{a}.block_count", spec.layers)
    w.add_uint32(f"{a}.feed_forward_length", spec.ffn)
    w.add_uint32(f"{a}.attention.head_count", spec.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.kv_heads)
    w.add_float32(f"{a}.rope.freq_base", spec.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6 if a.startswith("gemma") else 1e-5)
    if spec.key_length is not None or a.startswith("gemma"):
        w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
        w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    if not a.startswith("gemma"):
        w.add_uint32(f"{a}.rope.dimension_count", spec.rotary_dim)
    w.add_uint32(f"{a}.vocab_size", spec.vocab)
    if a == "phi3":
        original = spec.longrope_original or spec.context
        w.add_uint32(f"{a}.rope.scaling.original_context_length", original)
        if spec.longrope_original:
            scale = spec.context / original
            w.add_float32(f"{a}.rope.scaling.attn_factor", float(np.sqrt(1 + np.log(scale) / np.log(original))))
    if a == "gemma2":  # the values transformers' Gemma2Config assumes (its GGUF reader skips them)
        w.add_float32(f"{a}.attn_logit_softcapping", 50.0)
        w.add_float32(f"{a}.final_logit_softcapping", 30.0)
    if a in ("gemma2", "gemma3"):
        w.add_uint32(f"{a}.attention.sliding_window", 512)
    w.add_uint32("general.file_type", 3)
    tokens, types, merges = _vocab(spec.vocab)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_uint32("general.quantization_version", 2)
    for key, (kind, value) in spec.extra_metadata.items():
        getattr(w, f"add_{kind}")(key, value)
    plan = tensor_plan(spec)
    for name, ne, type_name in plan:
        qtype = GGMLQuantizationType[type_name]
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(ne)) // block * size
        byte_shape = (*tuple(reversed(ne))[:-1], ne[0] // block * size)
        if type_name in ("F32", "F16"):
            w.add_tensor_info(name, tuple(reversed(ne)), np.float32 if type_name == "F32" else np.float16, nbytes)
        else:
            w.add_tensor_info(name, byte_shape, np.uint8, nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, ne, type_name in plan:
        w.write_tensor_data(_tensor_bytes(rng, name, ne, type_name, spec))
    w.close()
    return spec


def gguf_reference(path, name: str, spec: SyntheticSpec) -> np.ndarray:
    """gguf.quants.dequantize of a tensor, as the Hugging Face model holds it: llama's rope
    row order undone, and Gemma's +1 on norm weights taken off."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from qalora.formats import gguf_arch

    reader = GGUFReader(os.fspath(path))
    t = next(t for t in reader.tensors if t.name == name)
    ref = dequantize(t.data, t.tensor_type)
    arch = gguf_arch.ARCHITECTURES[spec.arch]
    heads = gguf_arch.rope_heads(name, arch, spec.heads, spec.kv_heads)
    if heads is not None:
        ref = ref[gguf_arch.rope_order_inverse(ref.shape[0], heads)]
    if arch.shift(name):
        ref = ref.astype(np.float32) - np.float32(arch.shift(name))
    return ref
