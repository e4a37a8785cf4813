"""A GGUF file's header checked before anything is built from it.

A GGUF file from the internet is hostile until checked. :func:`qalora.load_gguf` hands the
header to transformers (config and tokenizer) and then builds the model's skeleton from that
config; both trust every value. :func:`validate` runs first, on the header alone (no tensor
data), and refuses anything the rest of the import could trip on:

* architecture fields: integer types for sizes, finite floats for the rest, each within a
  range that real models sit far inside (:data:`LIMITS`), and consistent with each other
  (heads divide the hidden size, KV heads divide the heads, a head dimension that is even,
  the rope dimension equal to it);
* tensors: every tensor the block count implies is present, with the shape the metadata
  implies, of a type qalora reads, and no tensor is left unaccounted for;
* tokenizer metadata: a vocabulary with one token per embedding row, token types and
  scores one per token, merges of two tokens of the vocabulary, special token ids inside it;
* memory: what the model will hold, from the tensor table, against what the machine has.

Every refusal is a :class:`~qalora.FormatError` (:class:`~qalora.ModelLoadError` for a file
too large for the machine) naming the file, the field and what is allowed. The check is
linear in the header's size and allocates nothing in proportion to a claimed size.
Non-finite values in dense tensors are refused later, as the tensors are read (see
:mod:`.gguf`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

from .. import ops
from ..errors import FormatError, ModelLoadError
from . import gguf_arch, gguf_blocks
from .gguf_file import (
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    INT8,
    INT16,
    INT32,
    INT64,
    STRING,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    GGUFHeader,
)

_INTEGER_TYPES = {UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64}
_FLOAT_TYPES = {FLOAT32, FLOAT64}
_TYPE_NAMES = {
    UINT8: "uint8",
    INT8: "int8",
    UINT16: "uint16",
    INT16: "int16",
    UINT32: "uint32",
    INT32: "int32",
    FLOAT32: "float32",
    BOOL: "bool",
    STRING: "string",
    ARRAY: "array",
    UINT64: "uint64",
    INT64: "int64",
    FLOAT64: "float64",
}

#: Allowed ranges (inclusive) of the architecture's sizes. The largest open models are far
#: inside them (hidden 16384, 126 blocks, head dimension 256, 256k-token vocabularies).
LIMITS = {
    "block_count": (1, 1024),
    "embedding_length": (1, 1 << 16),
    "attention.head_count": (1, 1 << 12),
    "attention.head_count_kv": (1, 1 << 12),
    "head_dim": (2, 1 << 12),
    "feed_forward_length": (1, 1 << 20),
    "context_length": (1, 1 << 26),
    "vocab": (1, 1 << 22),
    "rope.scaling.original_context_length": (1, 1 << 26),
}
#: Open intervals of the float fields (rms epsilon, rope base, rope scaling factor).
FLOAT_LIMITS = {
    "attention.layer_norm_rms_epsilon": (0.0, 1.0),
    "rope.freq_base": (1.0, 1e12),
    "rope.scaling.factor": (0.0, 1024.0),
    "rope.scaling.attn_factor": (0.0, 1024.0),
    "attn_logit_softcapping": (0.0, 1e6),  # Gemma 2: logits capped at +-cap (tanh(x / cap) * cap)
    "final_logit_softcapping": (0.0, 1e6),
}
#: rope scaling types llama.cpp knows.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
#: tokenizer.ggml.model values transformers can build a tokenizer for (byte-level BPE, SentencePiece).
TOKENIZER_MODELS = ("gpt2", "llama")
#: llama.cpp token types: 0 (undefined) to 6 (byte).
TOKEN_TYPES = range(0, 7)
#: Extra bytes beyond the tensors' own the import may hold at once (decoded slices, the
#: tokenizer, the interpreter's growth), as a fraction of the model plus a floor.
MEMORY_MARGIN = 0.10
MEMORY_FLOOR = 256 << 20


@dataclass(frozen=True)
class ModelShape:
    """The architecture a validated file describes (what the built config must agree with)."""

    arch: gguf_arch.Architecture
    n_layers: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ffn: int
    n_vocab: int
    context: int
    tied: bool
    memory: int  # bytes the imported model and the import's temporaries need
    rope_dim: int = 0  # dimensions of each head the rope rotates (Phi-4-mini: fewer than all)


class _Checker:
    def __init__(self, header: GGUFHeader) -> None:
        self.header = header
        self.path = header.path
        self.arch_name = ""

    def fail(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: {message}")

    def _describe(self, key: str) -> str:
        entry = self.header.metadata[key]
        kind = _TYPE_NAMES.get(entry.type, str(entry.type))
        if entry.type == ARRAY:
            kind = f"array of {_TYPE_NAMES.get(entry.element_type, entry.element_type)}"
            return f"{key} is an {kind} of {len(entry.value)} elements"
        value = entry.value if entry.type != STRING else entry.value[:60]
        return f"{key} = {value!r} ({kind})"

    def integer(self, key: str, lo: int, hi: int, default: int | None = None, required: bool = True) -> int | None:
        """An integer-typed scalar in [lo, hi] (or ``default`` when absent and not required)."""
        entry = self.header.metadata.get(key)
        if entry is None:
            if required:
                raise self.fail(f"metadata key {key!r} is missing; it must be an integer in [{lo}, {hi}]")
            return default
        if entry.type not in _INTEGER_TYPES:
            raise self.fail(f"{self._describe(key)}: it must be an integer in [{lo}, {hi}]")
        if not lo <= entry.value <= hi:
            raise self.fail(f"{key} = {entry.value} is outside the allowed range [{lo}, {hi}]")
        return int(entry.value)

    def number(self, key: str, lo: float, hi: float, required: bool = False) -> float | None:
        """A float-typed scalar, finite and inside the open interval (lo, hi)."""
        entry = self.header.metadata.get(key)
        if entry is None:
            if required:
                raise self.fail(f"metadata key {key!r} is missing; it must be a finite float in ({lo:g}, {hi:g})")
            return None
        if entry.type not in _FLOAT_TYPES:
            raise self.fail(f"{self._describe(key)}: it must be a finite float in ({lo:g}, {hi:g})")
        value = float(entry.value)
        if not (math.isfinite(value) and lo < value < hi):
            raise self.fail(
                f"{key} = {value!r} is outside the allowed range ({lo:g}, {hi:g}); it must be a finite float"
            )
        return value

    def typed(self, key: str, vtype: int, element_type: int | set[int] | None = None) -> object:
        """The value of ``key`` if present, which must be of ``vtype`` (arrays: of ``element_type``)."""
        entry = self.header.metadata.get(key)
        if entry is None:
            return None
        elements = {element_type} if isinstance(element_type, int) else element_type
        ok = entry.type == vtype and (vtype != ARRAY or elements is None or entry.element_type in elements)
        if not ok:
            want = _TYPE_NAMES[vtype]
            if vtype == ARRAY and elements:
                want += " of " + " or ".join(sorted(_TYPE_NAMES[e] for e in elements))
            raise self.fail(f"{self._describe(key)}: it must be of type {want}")
        return entry.value

    # ------------------------------------------------------------------ architecture

    def architecture(self) -> gguf_arch.Architecture:
        name = self.typed("general.architecture", STRING)
        if name is None:
            raise self.fail("metadata key 'general.architecture' is missing")
        self.typed("general.name", STRING)
        arch = gguf_arch.architecture(name, self.path)
        self.arch_name = name
        return arch

    def sizes(self) -> dict:
        a = self.arch_name
        n_layers = self.integer(f"{a}.block_count", *LIMITS["block_count"])
        hidden = self.integer(f"{a}.embedding_length", *LIMITS["embedding_length"])
        n_head = self.integer(f"{a}.attention.head_count", *LIMITS["attention.head_count"])
        if hidden % n_head:
            raise self.fail(
                f"{a}.attention.head_count = {n_head} does not divide {a}.embedding_length = {hidden} "
                "(the heads must split the hidden size evenly)"
            )
        n_head_kv = self.integer(
            f"{a}.attention.head_count_kv", 1, n_head, default=n_head, required=False
        )  # at most the heads, and dividing them
        if n_head % n_head_kv:
            raise self.fail(
                f"{a}.attention.head_count_kv = {n_head_kv} does not divide {a}.attention.head_count = {n_head}"
            )
        lo, hi = LIMITS["head_dim"]
        key_length = self.integer(f"{a}.attention.key_length", lo, hi, required=False)
        value_length = self.integer(f"{a}.attention.value_length", lo, hi, required=False)
        rope_dim = self.integer(f"{a}.rope.dimension_count", lo, hi, required=False)
        # llama.cpp's head dimension: key_length, by default the hidden size over the heads.
        head_dim = key_length if key_length is not None else hidden // n_head
        if not lo <= head_dim <= hi or head_dim % 2:
            raise self.fail(
                f"the head dimension ({a}.embedding_length / {a}.attention.head_count = {hidden} / {n_head}) "
                f"is {head_dim}; it must be even and in [{lo}, {hi}] (rotary embeddings pair its halves)"
            )
        if value_length is not None and value_length != head_dim:
            raise self.fail(f"{a}.attention.value_length = {value_length} must equal the head dimension {head_dim}")
        # transformers' llama takes its head dimension from rope.dimension_count, its qwen2
        # from the hidden size over the heads: either must agree with llama.cpp's. (For the
        # other architectures qalora sets the config's head_dim from the file itself.)
        if (
            a in ("llama", "qwen2")
            and key_length is not None
            and key_length != hidden // n_head
            and not (a == "llama" and rope_dim == key_length)
        ):
            raise self.fail(
                f"{a}.attention.key_length = {key_length} is not the head dimension transformers builds "
                f"({a}.embedding_length / {a}.attention.head_count = {hidden // n_head}"
                + (f", or {a}.rope.dimension_count when it is given)" if a == "llama" else ")")
            )
        # Phi-3's transformers model rotates a leading part of each head (Phi-4-mini: 3/4).
        partial = a == "phi3" and rope_dim is not None and rope_dim < head_dim and rope_dim % 2 == 0
        if rope_dim is not None and rope_dim != head_dim and not partial:
            raise self.fail(
                f"{a}.rope.dimension_count = {rope_dim} must equal the head dimension {head_dim}: "
                "qalora's models rotate the whole head"
            )
        ffn = self.integer(f"{a}.feed_forward_length", *LIMITS["feed_forward_length"])
        context = self.integer(f"{a}.context_length", *LIMITS["context_length"])
        self.number(f"{a}.attention.layer_norm_rms_epsilon", *FLOAT_LIMITS["attention.layer_norm_rms_epsilon"], True)
        self.number(f"{a}.rope.freq_base", *FLOAT_LIMITS["rope.freq_base"])
        self.rope_scaling(a)
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            self.number(f"{a}.{field}", *FLOAT_LIMITS[field])
        for key, entry in self.header.metadata.items():  # any other float of the model: finite
            if key.startswith(f"{a}.") and entry.type in _FLOAT_TYPES and not math.isfinite(entry.value):
                raise self.fail(f"{key} = {entry.value!r} is not finite")
        return {
            "n_layers": n_layers,
            "hidden": hidden,
            "n_head": n_head,
            "n_head_kv": n_head_kv,
            "head_dim": head_dim,
            "ffn": ffn,
            "context": context,
            "rope_dim": rope_dim if rope_dim is not None else head_dim,
        }

    def rope_scaling(self, a: str) -> None:
        kind = self.typed(f"{a}.rope.scaling.type", STRING)
        if kind is not None and kind not in ROPE_SCALING_TYPES:
            raise self.fail(f"{a}.rope.scaling.type = {kind!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
        for field in ("rope.scaling.factor", "rope.scaling.attn_factor"):
            self.number(f"{a}.{field}", *FLOAT_LIMITS[field])
        self.number(f"{a}.rope.scale_linear", *FLOAT_LIMITS["rope.scaling.factor"])
        field = "rope.scaling.original_context_length"
        self.integer(f"{a}.{field}", *LIMITS[field], required=False)
        self.typed(f"{a}.rope.scaling.finetuned", BOOL)

    # ------------------------------------------------------------------ tokenizer

    def tokenizer(self, n_vocab_rows: int) -> int:
        h = self.header
        model = self.typed("tokenizer.ggml.model", STRING)
        if model is None:
            raise self.fail("metadata key 'tokenizer.ggml.model' is missing (the file has no tokenizer)")
        if model not in TOKENIZER_MODELS:
            raise self.fail(f"tokenizer.ggml.model = {model!r} is not one of {', '.join(TOKENIZER_MODELS)}")
        tokens = self.typed("tokenizer.ggml.tokens", ARRAY, STRING)
        if tokens is None:
            raise self.fail("metadata key 'tokenizer.ggml.tokens' is missing (the file has no vocabulary)")
        n = len(tokens)
        lo, hi = LIMITS["vocab"]
        if not lo <= n <= hi:
            raise self.fail(f"tokenizer.ggml.tokens has {n} tokens; the allowed range is [{lo}, {hi}]")
        if n != n_vocab_rows:
            raise self.fail(
                f"tokenizer.ggml.tokens has {n} tokens but token_embd.weight has {n_vocab_rows} rows; "
                "there must be one token per embedding row"
            )
        size = self.integer(f"{self.arch_name}.vocab_size", lo, hi, required=False)
        if size is not None and size != n:
            raise self.fail(f"{self.arch_name}.vocab_size = {size} but tokenizer.ggml.tokens has {n} tokens")
        types = self.typed("tokenizer.ggml.token_type", ARRAY, _INTEGER_TYPES)
        if types is not None:
            if len(types) != n:
                raise self.fail(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens (one per token)")
            bad = next((i for i, t in enumerate(types) if t not in TOKEN_TYPES), None)
            if bad is not None:
                raise self.fail(
                    f"tokenizer.ggml.token_type[{bad}] = {types[bad]} is not a llama.cpp token type (0 to 6)"
                )
        scores = self.typed("tokenizer.ggml.scores", ARRAY, _FLOAT_TYPES)
        if scores is not None:
            if len(scores) != n:
                raise self.fail(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens (one per token)")
            bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
            if bad is not None:
                raise self.fail(f"tokenizer.ggml.scores[{bad}] = {scores[bad]!r} is not finite")
        merges = self.typed("tokenizer.ggml.merges", ARRAY, STRING)
        if merges is None and scores is None:
            raise self.fail("the tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
        if merges is not None:
            self.merges(merges, tokens, model)
        for key, entry in h.metadata.items():
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
                if entry.type not in _INTEGER_TYPES or not 0 <= entry.value < n:
                    raise self.fail(f"{self._describe(key)}: it must be a token id, an integer in [0, {n - 1}]")
        for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"):
            self.typed(key, BOOL)
        for key in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
            self.typed(key, STRING)
        return n

    def merges(self, merges: list[str], tokens: list[str], model: str) -> None:
        """Each merge is two tokens of the vocabulary separated by one space, and joins into one."""
        if model == "gpt2":  # transformers respells a token outside the byte alphabet, as here
            spelling = byte_alphabet()
            alphabet = set(spelling)
            vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens}
        else:
            vocab = set(tokens)
        for i, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise self.fail(f"tokenizer.ggml.merges[{i}] = {merge[:60]!r} is not two tokens separated by one space")
            for token in (parts[0], parts[1], parts[0] + parts[1]):
                if token not in vocab:
                    raise self.fail(
                        f"tokenizer.ggml.merges[{i}] = {merge[:60]!r}: {token[:60]!r} is not in the vocabulary"
                    )

    # ------------------------------------------------------------------ tensors

    def tensors(self, arch: gguf_arch.Architecture, s: dict, n_vocab: int) -> bool:
        """Checks the tensor table against the shapes the metadata implies; returns whether
        the output head is tied to the embedding (no output.weight)."""
        h = self.header
        for name, entry in h.tensors.items():
            if entry.ggml_type not in gguf_blocks.FORMATS and entry.ggml_type not in gguf_blocks.DENSE_TYPES:
                raise self.fail(
                    f"tensor {name!r} has GGUF type {gguf_blocks.type_name(entry.ggml_type)}, which qalora cannot "
                    f"read; supported: {gguf_blocks.supported_types()}"
                )
        expected = expected_tensors(arch, s, n_vocab)
        optional = {"output.weight", *arch.auxiliary}
        factors = [name for name in ("rope_factors_short.weight", "rope_factors_long.weight") if name in h.tensors]
        if len(factors) == 1:
            raise self.fail(f"tensor {factors[0]!r} comes without its LongRoPE pair (short and long factors)")
        for name, entry in h.tensors.items():
            shape = expected.get(name)
            if shape is None:
                block, _ = gguf_arch.split_block_name(name)
                if block is not None and block >= s["n_layers"]:
                    raise self.fail(
                        f"tensor {name!r} belongs to block {block}, but {self.arch_name}.block_count = "
                        f"{s['n_layers']} (blocks 0 to {s['n_layers'] - 1})"
                    )
                raise self.fail(f"tensor {name!r} has no place in a {arch.gguf_name} model")
            if entry.shape != shape:
                raise self.fail(f"tensor {name!r} has shape {entry.shape} (ne0 first); the metadata implies {shape}")
        missing = [name for name in expected if name not in h.tensors and name not in optional]
        if missing:
            block, _ = gguf_arch.split_block_name(missing[0])
            why = (
                f" ({self.arch_name}.block_count = {s['n_layers']} implies blocks 0 to {s['n_layers'] - 1})"
                if block is not None
                else ""
            )
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise self.fail(f"tensor {missing[0]!r}{more} is missing{why}")
        return "output.weight" not in h.tensors


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level spelling: the character that stands for each byte value. Bytes
    that print as one visible character keep it; the rest take code points 256, 257, ...
    in byte order."""
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def expected_tensors(arch: gguf_arch.Architecture, s: dict, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a file of this shape may hold, with its GGUF shape (ne0 first)."""
    hidden, head_dim, ffn = s["hidden"], s["head_dim"], s["ffn"]
    q, kv = s["n_head"] * head_dim, s["n_head_kv"] * head_dim
    out: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (hidden, n_vocab),
        "output_norm.weight": (hidden,),
        "output.weight": (hidden, n_vocab),
    }
    for name in arch.auxiliary:  # rotary divisors, one per frequency
        out[name] = (s.get("rope_dim", head_dim) // 2,)
    shapes = {
        "attn_q": (hidden, q),
        "attn_k": (hidden, kv),
        "attn_v": (hidden, kv),
        "attn_qkv": (hidden, q + 2 * kv),
        "attn_output": (q, hidden),
        "attn_q_norm": (head_dim,),
        "attn_k_norm": (head_dim,),
        "ffn_gate": (hidden, ffn),
        # Phi-3 has no ffn_gate: its ffn_up holds the gate rows, then the up rows.
        "ffn_up": (hidden, ffn if "ffn_gate" in arch.block else 2 * ffn),
        "ffn_down": (ffn, hidden),
    }
    per_block = {f"{part}.weight": shapes.get(part, (hidden,)) for part in arch.block}  # the rest: norms
    if arch.attention_bias:
        per_block |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
    for i in range(s["n_layers"]):
        for part, shape in per_block.items():
            out[f"blk.{i}.{part}"] = shape
    return out


def memory_needed(header: GGUFHeader, itemsize: int) -> int:
    """Bytes of the imported model (quantized linear layers as packed codes with float32
    scales and offsets, everything else dense in a dtype of ``itemsize`` bytes), plus the
    largest temporary of the import (a dense weight the skeleton makes before its move to
    the meta device)."""
    total, transient = 0, 0
    for name, entry in header.tensors.items():
        count = math.prod(entry.shape)
        fmt = gguf_blocks.FORMATS.get(entry.ggml_type)
        if fmt is not None and len(entry.shape) > 1 and name != "token_embd.weight":
            stored = fmt.bits if fmt.bits in ops.SUPPORTED_BITS else 8
            total += count * stored // 8 + 2 * (count // fmt.group_size) * 4
        else:
            total += count * itemsize
        transient = max(transient, count * itemsize)
    return total + transient


def available_memory() -> int | None:
    """Bytes this process can still use: the machine's available memory and swap (or its
    physical memory), and no more than the address-space limit leaves; None if unknown."""
    budget = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        budget = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            budget = None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    if soft >= 0 and soft != resource.RLIM_INFINITY:
        used = 0
        try:
            with open("/proc/self/status") as f:
                used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        except (OSError, StopIteration, ValueError):
            pass
        headroom = max(soft - used, 0)
        budget = headroom if budget is None else min(budget, headroom)
    return budget


def validate(header: GGUFHeader, *, itemsize: int = 4, check_memory: bool = True) -> ModelShape:
    """Checks a GGUF header before anything is built from it (see the module docstring).

    Args:
        header: from :func:`~.gguf_file.read_header` (which already checked the file's
            structure: counts, string lengths, tensor byte ranges).
        itemsize: bytes per element of the dense tensors the import makes (the ``dtype``
            of :func:`qalora.load_gguf`).
        check_memory: compare the memory the model needs with :func:`available_memory`.

    Raises:
        FormatError: a field of the wrong type, out of range or inconsistent (named, with
            what is allowed), a missing, misshapen, unknown or unreadable tensor, or bad
            tokenizer metadata.
        ModelLoadError: the model needs more memory than this process has.
    """
    c = _Checker(header)
    arch = c.architecture()
    s = c.sizes()
    embd = header.tensors.get("token_embd.weight")
    if embd is None:
        raise c.fail("tensor 'token_embd.weight' is missing")
    if len(embd.shape) != 2 or embd.shape[0] != s["hidden"]:
        raise c.fail(
            f"tensor 'token_embd.weight' has shape {embd.shape} (ne0 first); the metadata implies "
            f"({s['hidden']}, n_vocab)"
        )
    n_vocab = c.tokenizer(embd.shape[1])
    tied = c.tensors(arch, s, n_vocab)
    need = memory_needed(header, itemsize)
    need += max(int(need * MEMORY_MARGIN), MEMORY_FLOOR)
    if check_memory:
        have = available_memory()
        if have is not None and need > have:
            raise ModelLoadError(
                f"{header.path}: the model needs about {need / 2**30:.2f} GiB of memory to load "
                f"(its tensors as qalora holds them), but this process has about {have / 2**30:.2f} GiB available"
            )
    return ModelShape(arch=arch, n_vocab=n_vocab, tied=tied, memory=need, **s)


def check_config(config, shape: ModelShape, path: str) -> None:
    """The config transformers built from the file describes the validated shape (the
    skeleton is built from the config, the checks were made on the metadata)."""
    want = {
        "num_hidden_layers": shape.n_layers,
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head_kv,
        "intermediate_size": shape.ffn,
        "vocab_size": shape.n_vocab,
        "tie_word_embeddings": shape.tied,
    }
    got = {key: getattr(config, key, None) for key in want}
    head_dim = getattr(config, "head_dim", None) or shape.hidden // shape.n_head
    got["head_dim"], want["head_dim"] = head_dim, shape.head_dim
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if wrong:
        detail = ", ".join(f"{k} = {g!r} (the file says {w!r})" for k, (g, w) in wrong.items())
        raise FormatError(f"{path}: transformers read the file's config differently: {detail}")
