"""Quantizing the token embedding, and an output head tied to it
(``QALoRAConfig(quantize_embeddings=True)``).

The embedding table (V, D) becomes a frozen :class:`~qalora.layers.QuantEmbedding` with the
config's bits and group size (groups along D, the layout of a ``QuantLinear(D, V)``). A head
tied to the table (one matrix for lookup and logits, as in SmolLM2, Llama 3.2 1B, Qwen2 0.5B)
becomes a :class:`~qalora.layers.QuantLinear` holding the very same three tensors, so the tie
stays a tie and the table is stored once. Neither gets an adapter: the embedding's rows are
not a matmul the pooled adapter could sit beside, and the head's update would be the
table's. An untied head is a separate decision (name it in ``target_modules``).

Everything is checked (:func:`plan`) and built (:func:`build`) before the model changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import QALoRAConfig
from .errors import ConfigError, GroupSizeError, ShapeError
from .layers import QuantEmbedding, QuantLinear
from .ops import check_layout
from .targets import model_embedding, replace_module


@dataclass
class EmbeddingPlan:
    """What :func:`plan` found: the embedding to quantize and the head tied to it."""

    name: str
    embedding: nn.Embedding
    head_name: str | None = None
    head: nn.Linear | None = None


def _input_embedding(model: nn.Module) -> nn.Module:
    embedding = model_embedding(model, "get_input_embeddings")
    if embedding is None:
        raise ConfigError(
            "quantize_embeddings: the model does not expose its token embedding through get_input_embeddings() "
            "(Hugging Face models do); quantize_embeddings needs to know which table is the embedding"
        )
    return embedding


def plan(model: nn.Module, config: QALoRAConfig, targets: list[tuple[str, nn.Module]]) -> EmbeddingPlan | None:
    """Checks that the model's token embedding (and a head tied to it) can be quantized at
    ``config``'s settings; ``None`` when ``config.quantize_embeddings`` is off or the
    embedding is quantized already. Changes nothing.

    Raises:
        ConfigError: no ``get_input_embeddings()``; the embedding is not a plain
            ``nn.Embedding`` (a subclass may scale or otherwise change what it returns),
            renormalises rows (``max_norm``), is shared with a module other than a linear
            head, or its tied head is also chosen for an adapter by ``target_modules``.
        GroupSizeError: the group size does not divide the embedding dimension (or breaks
            the layout rules at these bits).
    """
    if not config.quantize_embeddings:
        return None
    embedding = _input_embedding(model)
    if isinstance(embedding, QuantEmbedding):
        return None  # imported quantized: its own codes stay, as for a QuantLinear
    if type(embedding) is not nn.Embedding:
        raise ConfigError(
            f"quantize_embeddings: the input embedding is a {type(embedding).__name__}, not a plain "
            f"torch.nn.Embedding; a subclass may do more than look rows up (scale them, say), which a quantized "
            f"lookup would silently drop"
        )
    if embedding.max_norm is not None:
        raise ConfigError(
            "quantize_embeddings: the embedding renormalises the rows it looks up (max_norm is set), which "
            "changes the table in place; a frozen quantized table cannot"
        )
    names = [n for n, m in model.named_modules() if m is embedding]
    if not names:
        raise ConfigError("quantize_embeddings: get_input_embeddings() returned a module that is not part of the model")
    name = names[0]
    vocab, dim = embedding.weight.shape
    try:
        check_layout(dim, config.bits, config.group_size)
    except (GroupSizeError, ShapeError) as e:
        raise GroupSizeError(
            f"quantize_embeddings: embedding {name!r} ({vocab} x {dim}): {e}; choose a group size that divides "
            f"the hidden size {dim}, or leave quantize_embeddings off"
        ) from None
    out = EmbeddingPlan(name, embedding)
    weight = embedding.weight
    for other_name, module in model.named_modules():
        if module is embedding:
            continue
        shared = [p for p in module.parameters(recurse=False) if p is weight or p.data_ptr() == weight.data_ptr()]
        if not shared:
            continue
        if not (isinstance(module, nn.Linear) and module.weight is shared[0] and out.head is None):
            raise ConfigError(
                f"quantize_embeddings: the embedding table {name!r} is shared with {other_name!r} "
                f"({type(module).__name__}), which a quantized table cannot serve; only one torch.nn.Linear "
                f"output head may be tied to it"
            )
        out.head_name, out.head = other_name, module
    if out.head_name is not None and any(n == out.head_name for n, _ in targets):
        raise ConfigError(
            f"quantize_embeddings: the output head {out.head_name!r} is tied to the embedding and is quantized "
            f"with it (without an adapter); remove it from target_modules"
        )
    return out


def build(
    p: EmbeddingPlan, config: QALoRAConfig, scale_dtype: torch.dtype
) -> tuple[QuantEmbedding, QuantLinear | None]:
    """The quantized embedding and its tied head (sharing its tensors), not yet swapped in."""
    table = QuantEmbedding.from_embedding(p.embedding, config.bits, config.group_size, scale_dtype, p.name)
    head = None
    if p.head is not None:
        head = table.tied_head(p.head.bias)
    return table, head


def apply(model: nn.Module, p: EmbeddingPlan, table: QuantEmbedding, head: QuantLinear | None) -> None:
    replace_module(model, p.name, table)
    if head is not None:
        assert p.head_name is not None
        replace_module(model, p.head_name, head)


def quantized_embeddings(model: nn.Module) -> Iterator[tuple[str, QuantEmbedding]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            yield name, module


def tied_heads(model: nn.Module) -> dict[str, str]:
    """{head name: embedding name} for each :class:`QuantLinear` holding a
    :class:`QuantEmbedding`'s tensors."""
    tables = {id(e.packed): name for name, e in quantized_embeddings(model)}
    return {
        name: tables[id(m.packed)]
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and id(m.packed) in tables
    }
