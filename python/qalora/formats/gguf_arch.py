"""Which GGUF architectures qalora reads and writes, and how their tensors map onto a
Hugging Face model: tensor names, and the rope row order of llama-family attn_q / attn_k.

llama.cpp's converter stores the rows of a llama-family ``q_proj`` / ``k_proj`` weight in a
different order: within each head of ``head_dim`` rows, Hugging Face keeps the two rope
halves apart (rows ``t * head_dim/2 + j``, t = 0, 1) while GGUF interleaves them (row
``2 j + t``). The reorder moves whole rows, so every quantization group (which runs along
a row) stays intact and the change is exact in both directions. NeoX-rope models (Qwen2/3,
Phi-3, Gemma 2/3) are stored unpermuted.

Other conventions of the converter, per architecture: Gemma's norm weights are stored plus
one (:attr:`Architecture.norm_shift`), Phi-3's q/k/v and gate/up projections are fused, as
in its Hugging Face model, and Qwen3 / Gemma 3 carry per-head q/k norms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError

# Per-block tensors of the llama layout: GGUF name part -> Hugging Face module path inside
# model.layers.{i}.
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Phi-3's Hugging Face model holds q/k/v and gate/up fused too (qkv_proj, gate_up_proj, gate
# rows first), as llama.cpp stores them: one tensor is one module, nothing is split.
_PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 normalise before and after both attention and MLP; llama.cpp's ffn_norm is the
# norm before the MLP there (post_attention_layernorm is the one after attention).
_GEMMA_BLOCK = {
    **{k: v for k, v in _LLAMA_BLOCK.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # general.architecture
    rope_permuted: bool  # attn_q / attn_k rows stored in GGUF's interleaved rope order
    attention_bias: bool  # q/k/v projections carry biases
    families: str  # the model families it covers, for messages
    block: dict = field(default_factory=lambda: dict(_LLAMA_BLOCK), hash=False)  # GGUF part -> HF module path
    #: llama.cpp's converter stores every ``*norm.weight`` plus this (Gemma's RMSNorm scales by
    #: 1 + weight in Hugging Face, by the weight in llama.cpp).
    norm_shift: float = 0.0
    #: file tensors that are no parameter of the model (rotary divisors), copied on export.
    auxiliary: tuple[str, ...] = ("rope_freqs.weight",)

    def hf_name(self, gguf_name: str) -> str | None:
        """Hugging Face parameter name of a GGUF tensor, or None if it has none."""
        return _to_hf(gguf_name, self.block)

    def gguf_name_of(self, hf_param: str) -> str | None:
        """GGUF tensor name of a Hugging Face parameter, or None if it has none."""
        return _to_gguf(hf_param, {v: k for k, v in self.block.items()})

    def shift(self, gguf_name: str) -> float:
        """What llama.cpp adds to this tensor's values relative to Hugging Face's."""
        return self.norm_shift if gguf_name.endswith("norm.weight") else 0.0


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", True, False, "the llama family: Llama 2/3.x, TinyLlama, SmolLM2, Mistral"),
    "qwen2": Architecture("qwen2", False, True, "Qwen2 / Qwen2.5"),
    "qwen3": Architecture("qwen3", False, False, "Qwen3", block=_LLAMA_BLOCK | _QK_NORM),
    "phi3": Architecture(
        "phi3",
        False,
        False,
        "Phi-3 / Phi-3.5 / Phi-4",
        block=_PHI3_BLOCK,
        auxiliary=("rope_factors_long.weight", "rope_factors_short.weight"),  # LongRoPE
    ),
    "gemma2": Architecture("gemma2", False, False, "Gemma 2", block=_GEMMA_BLOCK, norm_shift=1.0, auxiliary=()),
    "gemma3": Architecture(
        "gemma3", False, False, "Gemma 3 (text)", block=_GEMMA_BLOCK | _QK_NORM, norm_shift=1.0, auxiliary=()
    ),
}
#: Hugging Face ``model_type`` -> GGUF architecture written for it, for a model that did not
#: come from a GGUF file (metadata from its config). Gemma is not among them: its files need
#: keys (soft-capping, sliding window) the config export does not write; Gemma models loaded
#: from GGUF files export with their source's metadata.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}


def supported() -> str:
    """The supported architectures and the families each covers, for messages."""
    return "; ".join(f"{name} ({arch.families})" for name, arch in sorted(ARCHITECTURES.items()))


def architecture(name: str, where: str) -> Architecture:
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise FormatError(
            f"{where}: GGUF architecture {name!r} is not supported; qalora reads and writes {supported()}"
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


_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
#: Tensors a file of some supported architecture may carry that are not parameters of the
#: Hugging Face model.
AUXILIARY = {name for arch in ARCHITECTURES.values() for name in arch.auxiliary}


def _to_hf(gguf_name: str, block: dict) -> str | None:
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m:
        part = block.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    part = _GLOBAL.get(base)
    return None if part is None or kind not in ("weight", "bias") else f"{part}.{kind}"


def _to_gguf(hf_param: str, hf_block: dict) -> str | None:
    m = _HF_BLOCK_RE.fullmatch(hf_param)
    if m:
        part = hf_block.get(m.group(2))
        return None if part is None else f"blk.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = hf_param.rpartition(".")
    part = _HF_GLOBAL.get(base)
    return None if part is None else f"{part}.{kind}"


def hf_name(gguf_name: str, arch: Architecture | None = None) -> str | None:
    """Hugging Face parameter name of a GGUF tensor (llama layout by default), or None."""
    return (arch or ARCHITECTURES["llama"]).hf_name(gguf_name)


def gguf_name(hf_param: str, arch: Architecture | None = None) -> str | None:
    """GGUF tensor name of a Hugging Face parameter (llama layout by default), or None."""
    return (arch or ARCHITECTURES["llama"]).gguf_name_of(hf_param)


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
