"""Tokenizer metadata for a GGUF written from a Hugging Face tokenizer (a model that did not
come from a GGUF file, whose own metadata would otherwise be copied).

Supported: byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2, ...), written as
llama.cpp's ``gpt2`` tokenizer model: tokens in byte-level text, merges, token types (added
special tokens are control tokens, other added tokens user-defined) and the special token
ids. llama.cpp also needs the name of the pre-tokenizer (how text is split before BPE); it
is recognised from the tokenizer's own description for the two splits qalora checks against
llama.cpp (GPT-2's regex alone: ``gpt-2``; single digits, then GPT-2's regex: ``smollm``), or
given by the caller.
SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral) are refused: their llama.cpp
form needs the SentencePiece scores, which a Hugging Face ``tokenizer.json`` does not hold;
export such a model from its GGUF file instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from .gguf_file import ARRAY, BOOL, INT32, STRING, UINT32

# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class KeyValue:
    key: str
    type: int
    value: Any
    element_type: int | None = None


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise FormatError(
            f"tokenizer of type {type(tokenizer).__name__} has no fast (tokenizers) backend; a GGUF needs its vocabulary "
            "and merges: pass a fast Hugging Face tokenizer"
        )
    return json.loads(backend.to_str())


def _parts(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def detect_pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-split, or None if it is not one qalora knows."""
    parts = _parts(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    return None


def tokenizer_metadata(tokenizer, n_vocab: int, pre_tokenizer: str | None = None) -> list[KeyValue]:
    """The ``tokenizer.*`` metadata of a GGUF for a Hugging Face byte-level BPE tokenizer.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        n_vocab: rows of the model's embedding; ids the tokenizer does not use are written
            as unused ``[PAD<id>]`` tokens so that llama.cpp sees one token per row.
        pre_tokenizer: llama.cpp's pre-tokenizer name, for a split qalora does not recognise.

    Raises:
        FormatError: not a byte-level BPE tokenizer, a vocabulary larger than the embedding,
            or an unrecognised pre-tokenizer without ``pre_tokenizer``.
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FormatError(
            f"a {model.get('type')} tokenizer{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} "
            "cannot be written as GGUF metadata by qalora (byte-level BPE only); export the model from its GGUF file "
            "(qalora.load_gguf keeps the file's tokenizer) instead"
        )
    if not any(p.get("type") == "ByteLevel" for p in _parts(spec.get("pre_tokenizer"))):
        raise FormatError(
            "the tokenizer's BPE is not byte-level (no ByteLevel pre-tokenizer); qalora writes GPT-2-style vocabularies only"
        )
    pre = pre_tokenizer or detect_pre_tokenizer(spec)
    if pre is None:
        raise FormatError(
            f"cannot tell llama.cpp's pre-tokenizer for this tokenizer (pre_tokenizer = {json.dumps(spec.get('pre_tokenizer'))[:300]}); "
            "pass pre_tokenizer= with llama.cpp's name for it (e.g. 'llama-bpe' for Llama 3, 'qwen2' for Qwen2)"
        )
    vocab = dict(model.get("vocab", {}))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    size = max(vocab.values()) + 1 if vocab else 0
    if size > n_vocab:
        raise FormatError(f"the tokenizer has {size} token ids, more than the model's {n_vocab} embedding rows")
    tokens: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [
        KeyValue("tokenizer.ggml.model", STRING, "gpt2"),
        KeyValue("tokenizer.ggml.pre", STRING, pre),
        KeyValue("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
        KeyValue("tokenizer.ggml.token_type", ARRAY, types, INT32),
    ]
    if merges:
        out.append(KeyValue("tokenizer.ggml.merges", ARRAY, merges, STRING))
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
            out.append(KeyValue(f"tokenizer.ggml.{key}_token_id", UINT32, tid))
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    out.append(KeyValue("tokenizer.ggml.add_bos_token", BOOL, bool(bos is not None and ids and ids[0] == bos)))
    eos = getattr(tokenizer, "eos_token_id", None)
    out.append(
        KeyValue(
            "tokenizer.ggml.add_eos_token", BOOL, bool(eos is not None and ids and ids[-1] == eos and len(ids) > 1)
        )
    )
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(KeyValue("tokenizer.chat_template", STRING, template))
    return out
