"""Which GGUF architectures qalora reads and writes, and how their tensors map onto a
Hugging Face model: tensor names, and the rope row order of llama-family attn_q / attn_k.

llama.cpp's converter stores the rows of a llama-family ``q_proj`` / ``k_proj`` weight in a
different order: within each head of ``head_dim`` rows, Hugging Face keeps the two rope
halves apart (rows ``t * head_dim/2 + j``, t = 0, 1) while GGUF interleaves them (row
``2 j + t``). The reorder moves whole rows, so every quantization group (which runs along
a row) stays intact and the change is exact in both directions. NeoX-rope models (Qwen2)
are stored unpermuted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # general.architecture
    rope_permuted: bool  # attn_q / attn_k rows stored in GGUF's interleaved rope order
    attention_bias: bool  # q/k/v projections carry biases


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", rope_permuted=True, attention_bias=False),
    "qwen2": Architecture("qwen2", rope_permuted=False, attention_bias=True),
}
#: Hugging Face ``model_type`` -> GGUF architecture written for it.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def architecture(name: str, where: str) -> Architecture:
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise FormatError(
            f"{where}: GGUF architecture {name!r} is not supported; qalora reads and writes "
            f"{', '.join(sorted(ARCHITECTURES))} (the llama family: Llama 2/3, TinyLlama, SmolLM2, Mistral; and Qwen2)"
        )
    return arch


def architecture_for_hf(model_type: str | None, where: str) -> Architecture:
    gguf = HF_MODEL_TYPES.get(model_type or "")
    if gguf is None:
        raise FormatError(
            f"{where}: a Hugging Face model of type {model_type!r} cannot be written as GGUF by qalora; "
            f"supported model types: {', '.join(sorted(HF_MODEL_TYPES))}"
        )
    return ARCHITECTURES[gguf]


# Per-block tensors: GGUF name part -> Hugging Face module path inside model.layers.{i}.
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
#: Tensors a file may carry that are not parameters of the Hugging Face model.
AUXILIARY = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name of a GGUF tensor, or None if it has none."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m:
        part = _BLOCK.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    part = _GLOBAL.get(base)
    return None if part is None or kind not in ("weight", "bias") else f"{part}.{kind}"


def gguf_name(hf_param: str) -> str | None:
    """GGUF tensor name of a Hugging Face parameter, or None if it has none."""
    m = _HF_BLOCK_RE.fullmatch(hf_param)
    if m:
        part = _HF_BLOCK.get(m.group(2))
        return None if part is None else f"blk.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = hf_param.rpartition(".")
    part = _HF_GLOBAL.get(base)
    return None if part is None else f"{part}.{kind}"


def rope_heads(gguf_tensor: str, arch: Architecture, n_head: int, n_head_kv: int) -> int | None:
    """Number of heads whose rows are stored in rope order, or None if the tensor is not."""
    if not arch.rope_permuted:
        return None
    m = _BLOCK_RE.fullmatch(gguf_tensor)
    if not m:
        return None
    return {"attn_q": n_head, "attn_k": n_head_kv}.get(m.group(2))


def rope_order(rows: int, n_head: int) -> np.ndarray:
    """Row index array P with ``gguf_rows = hf_rows[P]`` for a projection of ``n_head``
    heads (``rows / n_head`` rows each). Its inverse is :func:`rope_order_inverse`."""
    if n_head <= 0 or rows % (2 * n_head):
        raise FormatError(
            f"a rope-ordered projection of {rows} rows cannot be split into {n_head} heads of an even size"
        )
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(0, 2, 1).reshape(-1)


def rope_order_inverse(rows: int, n_head: int) -> np.ndarray:
    """Row index array Q with ``hf_rows = gguf_rows[Q]``."""
    return np.argsort(rope_order(rows, n_head), kind="stable")


def split_block_name(gguf_name: str) -> tuple[int | None, str]:
    """(block index or None, name part) of a GGUF tensor name."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, gguf_name.rpartition(".")[0]
