"""Getting a quantized model ready for fast generation on CPU.

A merged qalora model generates with the usual ``model.generate``. For speed on CPU,
:func:`prepare_for_generation` sets the small-batch route of every quantized layer (by default
int8 activations on the tiled layout, built once per layer: see
:func:`qalora.set_activations`) and can quantize the output head too. On a small model the
head is the largest single read per token: SmolLM2-135M's tied head is 49152 x 576 float32
weights, 113 MB for every generated token, against 66 MB for all 210 quantized projections at
4 bits; quantized at 4 bits in groups of 32 it reads 18 MB.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .layers import QuantLinear, check_activations
from .targets import model_embedding
from .wrapping import set_activations


def quantize_head(model: nn.Module, bits: int = 4, group_size: int = 32) -> QuantLinear:
    """Replace the model's output head (``model.get_output_embeddings()``, an ``nn.Linear``)
    with a :class:`QuantLinear` quantized by min-max RTN, in place; returns the new head.

    For inference: with tied embeddings the input embedding keeps its dense weight (a token
    lookup reads one row of it per step), and the head is no longer tied to it. Save the
    model before calling this, or save it with the head untied in mind.

    Raises:
        ConfigError: the model has no ``get_output_embeddings`` or its head is not an
            ``nn.Linear``.
        GroupSizeError: the head's in_features is not divisible by ``group_size``.
    """
    head = model_embedding(model, "get_output_embeddings")
    if isinstance(head, QuantLinear):
        return head
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"quantize_head: the model's output head must be an nn.Linear reached by get_output_embeddings(), "
            f"got {type(head).__name__}"
        )
    quant = QuantLinear.from_weight(head.weight.detach(), head.bias, bits, group_size, layer_name="lm_head")
    if getattr(model.config, "tie_word_embeddings", False):
        # The head no longer shares the embedding's weight; keep the config honest so that
        # transformers does not tie them again.
        model.config.tie_word_embeddings = False
    model.set_output_embeddings(quant)
    return quant


@torch.no_grad()
def prepare_for_generation(
    model: nn.Module,
    *,
    activations: str = "int8",
    head_bits: int | None = None,
    head_group_size: int = 32,
) -> nn.Module:
    """Set ``model`` up for fast CPU generation, in place, and put it in eval mode.

    Args:
        activations: the small-batch route of every quantized layer (``"int8"``: the tiled
            int8 layout, the fastest; ``"bf16"`` or ``"exact"``), see
            :func:`qalora.set_activations`.
        head_bits: also quantize the output head to this many bits (4 is a good choice on
            small models, where the head dominates the bytes read per token); ``None`` keeps
            it dense.
        head_group_size: group size of the quantized head.

    Returns:
        The same model.
    """
    check_activations(activations)  # refused before the head is changed
    if head_bits is not None:
        quantize_head(model, head_bits, head_group_size)
    set_activations(model, activations)
    return model.eval()
