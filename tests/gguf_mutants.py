"""Hostile GGUF files made from a valid one, and a worker that loads them.

:func:`parse` splits a GGUF file into its metadata (in order, with GGUF value types), its
tensor directory and its data section; :func:`serialize` writes them back, byte for byte for
an unchanged file, and writes whatever a mutation put there (a size typed as a string, a
count that lies, a tensor range that overlaps another) without judging it.
:func:`catalogue` lists one mutation per hostile-value class found by fuzzing, each with
the fragment its refusal must carry; :func:`random_cases` adds seeded truncations and byte
flips in the header.

Run as a script (``python gguf_mutants.py cases.json``), it is the worker of
tests/test_gguf_hostile.py: it limits its own address space, loads each case with
:func:`qalora.load_gguf` under a per-case alarm, and prints one JSON line per case.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30

#: The base file: a tiny llama with every dense type (F32 norms, F16 embedding, a BF16
#: linear layer) beside quantized ones.
BASE_SPEC = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=128,
    vocab=272,
    context=256,
    tied=True,
    types={"default": "Q4_1", "ffn_down": "Q8_0", "attn_output": "BF16", "token_embd": "F16"},
)


@dataclass
class Raw:
    """Bytes written as a metadata value as they are (after the value type)."""

    data: bytes


@dataclass
class Parsed:
    version: int
    metadata: list[list[Any]]  # [key, value type, value, element type]
    tensors: list[list[Any]]  # [name, shape (ne0 first), ggml type, offset in the data section]
    alignment: int
    data: bytes  # the data section
    n_tensors: int | None = None  # what the header claims, when it should lie
    n_kv: int | None = None
    extra: dict = field(default_factory=dict)

    def meta(self, key: str) -> list[Any]:
        return next(m for m in self.metadata if m[0] == key)

    def set(self, key: str, vtype: int, value: Any, etype: int | None = None) -> None:
        for m in self.metadata:
            if m[0] == key:
                m[1:] = [vtype, value, etype]
                return
        self.metadata.append([key, vtype, value, etype])

    def drop(self, key: str) -> None:
        self.metadata = [m for m in self.metadata if m[0] != key]

    def tensor(self, name: str) -> list[Any]:
        return next(t for t in self.tensors if t[0] == name)


def parse(path) -> Parsed:
    from qalora.formats.gguf_file import read_header

    h = read_header(path)
    with open(path, "rb") as f:
        blob = f.read()
    metadata = [[k, v.type, copy.deepcopy(v.value), v.element_type] for k, v in h.metadata.items()]
    tensors = [[e.name, e.shape, e.ggml_type, e.offset - h.data_offset] for e in h.tensors.values()]
    return Parsed(h.version, metadata, tensors, h.alignment, blob[h.data_offset :])


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any, etype: int | None) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], value)
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        head = struct.pack("<IQ", etype, len(value))
        if etype == STRING:
            return head + b"".join(_string(v) for v in value)
        return head + np.asarray(value, dtype=np.dtype(_SCALAR[etype])).tobytes()
    raise ValueError(vtype)


def serialize(p: Parsed) -> bytes:
    out = [b"GGUF", struct.pack("<I", p.version)]
    n_tensors = len(p.tensors) if p.n_tensors is None else p.n_tensors
    n_kv = len(p.metadata) if p.n_kv is None else p.n_kv
    out.append(struct.pack("<QQ", n_tensors, n_kv))
    for key, vtype, value, etype in p.metadata:
        out += [_string(key), struct.pack("<I", vtype), _value(vtype, value, etype)]
    for name, shape, ggml_type, offset in p.tensors:
        out += [_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *shape)]
        out.append(struct.pack("<IQ", ggml_type, offset))
    head = b"".join(out)
    head += b"\0" * (-len(head) % p.alignment)
    return head + p.data


def header_size(blob: bytes) -> int:
    """Bytes before the data section of a valid file (the region byte flips aim at)."""
    import tempfile

    from qalora.formats.gguf_file import read_header

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(blob)
        f.flush()
        return read_header(f.name).header_size


# --------------------------------------------------------------------------- the catalogue


@dataclass
class Case:
    name: str
    blob: bytes
    expect: str  # "refused" (a typed error whose message holds `fragment`), "loads", "either"
    fragment: str = ""
    # run alone in its own worker (a case that could take the worker down with it)
    alone: bool = False


def _tensor_data(p: Parsed, name: str) -> tuple[int, int]:
    """(start, end) of a tensor's bytes in the data section."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, shape, ggml_type, offset = p.tensor(name)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return offset, offset + int(np.prod(shape)) // block * size


def remove_tensor(p: Parsed, name: str) -> None:
    """Drops a tensor with its bytes (and their padding); later tensors move up."""
    start, end = _tensor_data(p, name)
    end += -end % p.alignment
    p.tensors = [t for t in p.tensors if t[0] != name]
    for t in p.tensors:
        if t[3] >= end:
            t[3] -= end - start
    p.data = p.data[:start] + p.data[end:]


def _poke(p: Parsed, name: str, dtype, index: int, value) -> None:
    start, end = _tensor_data(p, name)
    values = np.frombuffer(p.data[start:end], dtype=dtype).copy()
    values[index] = value
    p.data = p.data[:start] + values.tobytes() + p.data[end:]


def catalogue(base: Parsed) -> list[Case]:
    """One mutation per hostile-value class, each refused with a message holding its fragment."""
    cases: list[Case] = []

    def case(name, edit, fragment, expect="refused", alone=False):
        p = copy.deepcopy(base)
        edit(p)
        cases.append(Case(name, serialize(p), expect, fragment, alone))

    a = "llama"
    u32 = UINT32
    # head counts
    case("head_count_0", lambda p: p.set(f"{a}.attention.head_count", u32, 0), "head_count = 0 is outside")
    case("head_count_3", lambda p: p.set(f"{a}.attention.head_count", u32, 3), "does not divide")
    case("head_count_kv_0", lambda p: p.set(f"{a}.attention.head_count_kv", u32, 0), "head_count_kv = 0")
    case("head_count_kv_3", lambda p: p.set(f"{a}.attention.head_count_kv", u32, 3), "head_count_kv = 3")
    case("head_count_2p32", lambda p: p.set(f"{a}.attention.head_count", UINT64, 1 << 32), "outside the allowed")
    case("rope_dim_0", lambda p: p.set(f"{a}.rope.dimension_count", u32, 0), "rope.dimension_count = 0")
    case("rope_dim_odd", lambda p: p.set(f"{a}.rope.dimension_count", u32, 15), "rope.dimension_count = 15")
    case("rope_dim_short", lambda p: p.set(f"{a}.rope.dimension_count", u32, 8), "must equal the head dimension")
    case("key_length", lambda p: p.set(f"{a}.attention.key_length", u32, 32), "key_length")
    # sizes of the wrong type
    case("hidden_string", lambda p: p.set(f"{a}.embedding_length", STRING, "64"), "must be an integer")
    case("blocks_float", lambda p: p.set(f"{a}.block_count", FLOAT32, 2.0), "must be an integer")
    case("ffn_string", lambda p: p.set(f"{a}.feed_forward_length", STRING, "128"), "must be an integer")
    case("heads_bool", lambda p: p.set(f"{a}.attention.head_count", BOOL, True), "must be an integer")
    case("heads_array", lambda p: p.set(f"{a}.attention.head_count", ARRAY, [4, 4], u32), "must be an integer")
    case("context_string", lambda p: p.set(f"{a}.context_length", STRING, "x"), "must be an integer")
    case("arch_int", lambda p: p.set("general.architecture", u32, 7), "general.architecture")
    case("alignment_3", lambda p: p.set("general.alignment", u32, 3), "not a power of two")
    case("hidden_missing", lambda p: p.drop(f"{a}.embedding_length"), "is missing")
    # huge sizes (the skeleton would allocate them for real)
    for bits in (26, 32, 40):
        case(
            f"hidden_2p{bits}", lambda p, b=bits: p.set(f"{a}.embedding_length", UINT64, 1 << b), "outside", alone=True
        )
        case(
            f"ffn_2p{bits}", lambda p, b=bits: p.set(f"{a}.feed_forward_length", UINT64, 1 << b), "outside", alone=True
        )
        case(f"vocab_2p{bits}", lambda p, b=bits: p.set(f"{a}.vocab_size", UINT64, 1 << b), "outside", alone=True)
        case(
            f"context_2p{bits}",
            lambda p, b=bits: p.set(f"{a}.context_length", UINT64, (1 << b) + 1),
            "outside",
            alone=True,
        )
    # huge block counts
    for n in (4000, 20000, 10**9, 2**32 - 1):
        frag = "block_count"
        case(f"blocks_{n}", lambda p, n=n: p.set(f"{a}.block_count", UINT32, n), frag, alone=True)
    case("blocks_3", lambda p: p.set(f"{a}.block_count", u32, 3), "'blk.2.")
    case("blocks_1", lambda p: p.set(f"{a}.block_count", u32, 1), "belongs to block 1")
    # many empty strings: 2,000,000 of them (16 MB)
    many = Raw(struct.pack("<IQ", STRING, 2_000_000) + b"\0" * 16_000_000)
    case("empty_strings_other", lambda p: p.set("general.junk", ARRAY, many), "at most 65536", alone=True)
    case("empty_strings_tokens", lambda p: p.set("tokenizer.ggml.tokens", ARRAY, many), "one token per", alone=True)
    case("array_count_lies", lambda p: p.set("general.tags", ARRAY, Raw(struct.pack("<IQ", u32, 1 << 60))), "past")
    case("kv_count_lies", lambda p: setattr(p, "n_kv", 1 << 50), "past the end")
    case("tensor_count_lies", lambda p: setattr(p, "n_tensors", 1 << 40), "past the end")
    case("duplicate_key", lambda p: p.metadata.append(list(p.meta(f"{a}.block_count"))), "appears twice")
    # a tensor of dims (0, 2^40): no bytes, passes a bounds check, huge rope permutation
    case(
        "dims_0_2p40", lambda p: p.tensor("blk.0.attn_q.weight").__setitem__(1, (0, 1 << 40)), "at least 1", alone=True
    )
    case(
        "dims_2p40_0", lambda p: p.tensor("blk.0.attn_k.weight").__setitem__(1, (1 << 40, 0)), "at least 1", alone=True
    )
    case(
        "dims_huge", lambda p: p.tensor("blk.0.attn_k.weight").__setitem__(1, (64, 1 << 40)), "past the end", alone=True
    )
    # NaN / Inf in dense tensors
    case("nan_f32_norm", lambda p: _poke(p, "blk.0.attn_norm.weight", np.float32, 5, np.nan), "non-finite")
    case("inf_f32_norm", lambda p: _poke(p, "output_norm.weight", np.float32, 0, np.inf), "non-finite")
    case("nan_f16_embd", lambda p: _poke(p, "token_embd.weight", np.float16, 1000, np.nan), "non-finite")
    case("inf_f16_embd", lambda p: _poke(p, "token_embd.weight", np.float16, 7, -np.inf), "non-finite")
    bf16_nan = np.uint16(0x7FC0)
    case("nan_bf16", lambda p: _poke(p, "blk.1.attn_output.weight", np.uint16, 77, bf16_nan), "non-finite")
    # eps and rope base
    for key, label in (("attention.layer_norm_rms_epsilon", "eps"), ("rope.freq_base", "freq_base")):
        for v, tag in ((float("nan"), "nan"), (0.0, "0"), (-1.0, "neg"), (float("inf"), "inf")):
            case(f"{label}_{tag}", lambda p, k=key, v=v: p.set(f"{a}.{k}", FLOAT32, v), key)
    case("eps_string", lambda p: p.set(f"{a}.attention.layer_norm_rms_epsilon", STRING, "1e-5"), "finite float")
    case("rope_scaling_nan", lambda p: p.set(f"{a}.rope.scaling.factor", FLOAT32, float("nan")), "scaling.factor")
    case("rope_scaling_type", lambda p: p.set(f"{a}.rope.scaling.type", STRING, "warp"), "scaling.type")
    # tensor byte ranges
    case("type_smaller", lambda p: p.tensor("blk.0.ffn_down.weight").__setitem__(2, Q4_0), "only padding")
    case("type_larger", lambda p: p.tensor("blk.0.attn_q.weight").__setitem__(2, Q8_0), "overlaps")
    case("norm_as_f16", lambda p: p.tensor("blk.1.ffn_norm.weight").__setitem__(2, F16), "only padding")

    def overlap(p):
        p.tensor("blk.1.ffn_up.weight")[3] = p.tensor("blk.1.ffn_gate.weight")[3]

    case("overlap", overlap, "overlaps")
    case(
        "misaligned",
        lambda p: p.tensor("blk.1.ffn_up.weight").__setitem__(3, p.tensor("blk.1.ffn_up.weight")[3] + 4),
        "alignment",
    )
    # tensors that are not the model's
    case("unknown_tensor", lambda p: p.tensor("blk.0.ffn_up.weight").__setitem__(0, "blk.0.ffn_upx.weight"), "ffn_upx")
    case("extra_block", lambda p: p.tensor("blk.1.ffn_up.weight").__setitem__(0, "blk.7.ffn_up.weight"), "block 7")
    case("wrong_shape", lambda p: p.tensor("blk.0.attn_norm.weight").__setitem__(1, (32, 2)), "metadata implies")
    # tokenizer
    n = len(base.meta("tokenizer.ggml.tokens")[2])
    case("bos_huge", lambda p: p.set("tokenizer.ggml.bos_token_id", u32, 10**6), "bos_token_id")
    case("eos_n", lambda p: p.set("tokenizer.ggml.eos_token_id", u32, n), "eos_token_id")
    case("pad_negative", lambda p: p.set("tokenizer.ggml.padding_token_id", INT32, -1), "padding_token_id")
    case("unk_string", lambda p: p.set("tokenizer.ggml.unknown_token_id", STRING, "0"), "unknown_token_id")
    case("token_type_short", lambda p: p.meta("tokenizer.ggml.token_type")[2].pop(), "token_type has")
    case("token_type_strings", lambda p: p.set("tokenizer.ggml.token_type", ARRAY, ["1"] * n, STRING), "token_type")
    case("scores_short", lambda p: p.set("tokenizer.ggml.scores", ARRAY, [0.0] * (n - 1), FLOAT32), "scores has")
    case("scores_nan", lambda p: p.set("tokenizer.ggml.scores", ARRAY, [float("nan")] * n, FLOAT32), "not finite")
    case("merges_ints", lambda p: p.set("tokenizer.ggml.merges", ARRAY, [1, 2, 3], u32), "merges")
    case("merge_three", lambda p: p.meta("tokenizer.ggml.merges")[2].__setitem__(0, "a b c"), "one space")
    case("merge_unknown", lambda p: p.meta("tokenizer.ggml.merges")[2].__setitem__(1, "\u4e00 b"), "not in the vocab")
    case("tokens_missing", lambda p: p.drop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
    case("tokens_short", lambda p: p.meta("tokenizer.ggml.tokens")[2].pop(), "one token per")
    case("tokenizer_bert", lambda p: p.set("tokenizer.ggml.model", STRING, "bert"), "tokenizer.ggml.model")
    case("template_int", lambda p: p.set("tokenizer.chat_template", u32, 1), "chat_template")
    # harmless changes still load
    case("base", lambda p: None, "", expect="loads")
    case("eps_small", lambda p: p.set(f"{a}.attention.layer_norm_rms_epsilon", FLOAT32, 1e-6), "", expect="loads")
    case("rope_scaling_ok", lambda p: p.set(f"{a}.rope.scaling.type", STRING, "none"), "", expect="loads")
    return cases


def random_cases(blob: bytes, seed: int, n_truncate: int, n_flip: int) -> list[Case]:
    """Seeded truncations (half inside the header) and byte flips inside the header."""
    rng = random.Random(seed)
    head = header_size(blob)
    cases = []
    for i in range(n_truncate):
        cut = rng.randrange(1, head) if i % 2 == 0 else rng.randrange(head, len(blob))
        cases.append(Case(f"truncate_{cut}", blob[:cut], "either"))
    for i in range(n_flip):
        data = bytearray(blob)
        spots = sorted(rng.randrange(0, head) for _ in range(rng.randint(1, 4)))
        for at in spots:  # every other case one bit per byte (a letter stays a letter more often)
            data[at] ^= rng.randrange(1, 256) if i % 2 else 1 << rng.randrange(6)
        cases.append(Case(f"flip{i}_" + "_".join(map(str, spots)), bytes(data), "either"))
    return cases


_INTS = [0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 64, 128, 255, 256, 271, 272, 273]
_INTS += [1 << 15, (1 << 31) - 1, 1 << 32, 1 << 40]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-38, 1e-6, 1e-3, 1e30, float("nan"), float("inf"), float("-inf")]
_INT_RANGES = {
    UINT8: (0, 255),
    INT8: (-128, 127),
    UINT16: (0, 65535),
    INT16: (-32768, 32767),
    UINT32: (0, (1 << 32) - 1),
    INT32: (-(1 << 31), (1 << 31) - 1),
    UINT64: (0, (1 << 64) - 1),
    INT64: (-(1 << 63), (1 << 63) - 1),
}


def _random_element(rng: random.Random, etype: int, old: Any, pool: list) -> Any:
    if etype in _INT_RANGES:
        lo, hi = _INT_RANGES[etype]
        return rng.choice([v for v in [*_INTS, -1, old + 1, old - 1] if lo <= v <= hi])
    if etype in (FLOAT32, FLOAT64):
        return rng.choice([*_FLOATS, old * 2, -old])
    if etype == BOOL:
        return not old
    return rng.choice(["", "a", "a b c", "\u4e00", old[::-1], old + old, rng.choice(pool)])


def random_values(base: Parsed, seed: int, n: int) -> list[Case]:
    """Seeded structured mutations: one metadata value, array element or tensor-directory
    field replaced by an interesting value (a boundary, a wrong type, NaN, a neighbour's
    value); some of these files are still good and must load."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        p = copy.deepcopy(base)
        if rng.random() < 0.75:
            m = rng.choice(p.metadata)
            key, vtype, value, etype = m
            if vtype == ARRAY and value and rng.random() < 0.8:
                at = rng.randrange(len(value))
                value[at] = _random_element(rng, etype, value[at], value)
                what = f"{key}[{at}]"
            elif vtype in _INT_RANGES and rng.random() < 0.8:
                v = rng.choice([*_INTS, -1, value + 1, value - 1, value * 2])
                m[1:3] = [INT64 if v < 0 else (UINT32 if v < 1 << 32 else UINT64), v]
                what = f"{key}={v}"
            elif vtype in (FLOAT32, FLOAT64):
                m[2] = rng.choice(_FLOATS)
                what = f"{key}={m[2]}"
            else:  # another type altogether
                kind = rng.choice([STRING, FLOAT32, BOOL, UINT32])
                m[1:] = [kind, {STRING: "7", FLOAT32: 7.0, BOOL: True, UINT32: 7}[kind], None]
                what = f"{key}:{kind}"
        else:
            t = rng.choice(p.tensors)
            field_ = rng.choice(["type", "dim", "offset"])
            if field_ == "type":
                t[2] = rng.choice([F32, F16, Q4_0, Q4_1, Q8_0, BF16, 12, 14, 99])
            elif field_ == "dim":
                dims = list(t[1])
                dims[rng.randrange(len(dims))] = rng.choice([v for v in _INTS if v >= 0])
                t[1] = tuple(dims)
            else:
                t[3] = rng.choice([0, 32, t[3] + 32, t[3] - 32 if t[3] >= 32 else 0, 1 << 20])
            what = f"{t[0]}.{field_}"
        cases.append(Case(f"value{i}_{what}"[:80], serialize(p), "either"))
    return cases


# --------------------------------------------------------------------------- the worker


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _check_loaded(lm) -> str | None:
    """Why a loaded model is not a correct load (None when it is)."""
    import torch

    model = lm.model
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            return f"{name} holds NaN/Inf"
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(min(8, vocab)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not bool(torch.isfinite(logits).all()):
        return "NaN/Inf logits"
    if logits.shape[-1] != vocab:
        return f"logits of width {logits.shape[-1]} for {vocab} tokens"
    return None


def main(argv: list[str]) -> int:
    import resource
    import signal
    import time

    import gguf as gguf_package  # noqa: F401  (read_header imports it; before the limit)
    import qalora
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from qalora.errors import QALoRAError
    from qalora.formats import gguf  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the limit)

    cases = json.loads(open(argv[1]).read())
    per_case = float(argv[2]) if len(argv) > 2 else 60.0
    limit = max(4 << 30, _vm_size() + (1536 << 20))  # torch alone maps about 3 GiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    class Hang(BaseException):
        pass

    def alarm(*_):
        raise Hang(f"took more than {per_case:.0f} s")

    signal.signal(signal.SIGALRM, alarm)
    print(json.dumps({"ready": True, "address_space_limit": limit}), flush=True)
    for c in cases:
        start = time.perf_counter()
        record: dict[str, Any] = {"case": c["name"]}
        signal.setitimer(signal.ITIMER_REAL, per_case)
        try:
            lm = qalora.load_gguf(c["path"], show_progress=False)
            why = _check_loaded(lm)
            record |= {"outcome": "loaded"} if why is None else {"outcome": "bad_load", "message": why}
            del lm
        except QALoRAError as e:
            record |= {"outcome": "typed", "error": type(e).__name__, "message": str(e)[:400]}
        except Hang as e:
            record |= {"outcome": "hang", "message": str(e)}
        except BaseException as e:  # reported, not hidden: the test fails on it
            record |= {"outcome": "untyped", "error": type(e).__name__, "message": str(e)[:400]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv))
