"""Tied tensors: one tensor under several names (an LM head sharing the embedding's weight,
a quantized head holding its table's codes), which a model's parameters, buffers and state
dict list once per name.

:func:`storage_key` is the one test qalora uses to find them: counting memory once
(:func:`qalora.memory_bytes`), storing a tied tensor once in a checkpoint and giving every
name its value again on loading (:mod:`qalora.checkpoint`).
"""

from __future__ import annotations

import torch


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tied tensor: the device, the address of the first element,
    the number of elements and the dtype (a view of part of another tensor differs)."""
    return (t.device, t.data_ptr(), t.numel(), t.dtype)
