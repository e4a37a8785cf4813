"""Low-level QA-LoRA kernels (Rust, on CPU tensors with rayon and on CUDA tensors through
libtorch).

Storage layout (see the README): a quantized weight of shape (N, K) = (out_features,
in_features) is three tensors,

* ``packed`` uint8 (N, K*bits/8): row k-codes as a little-endian bitstream (code k occupies
  bits [k*bits, (k+1)*bits) of its row; at 4 bits, byte j = q[2j] | q[2j+1] << 4);
* ``scales`` and ``offsets`` (N, K/group_size), float16 by default;

and dequantizes as ``W[n, k] = scales[n, k // g] * q[n, k] + offsets[n, k // g]``.

Every function raises a :class:`qalora.QALoRAError` subclass on bad input (the same class and
message for a numpy array as for a tensor) and releases the GIL while it runs. ``backend``
picks the implementation: ``"auto"`` (the Rust core for CPU tensors, libtorch ops otherwise),
``"core"`` or ``"torch"``; the two give the same results and the tests hold them to it.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _core
from .errors import DTypeError

__all__ = [
    "SUPPORTED_BITS",
    "check_layout",
    "dequantize",
    "group_pool",
    "merge_offsets",
    "pack",
    "qmatmul",
    "quantize",
    "unpack",
]

#: Bit widths the kernels store.
SUPPORTED_BITS: tuple[int, ...] = tuple(_core.SUPPORTED_BITS)

ArrayOrTensor = torch.Tensor | np.ndarray


def check_layout(in_features: int, bits: int, group_size: int) -> None:
    """Check that a linear layer with ``in_features`` inputs can be stored at ``bits`` bits in
    groups of ``group_size``, with the checks and messages every op uses.

    Args:
        in_features: K, the layer's input width (at least 1).
        bits: 2, 3, 4, 5, 6 or 8.
        group_size: a divisor of K; at 3 and 5 bits also a multiple of 8, at 6 bits of 4
            (each group then starts on a byte boundary).

    Raises:
        UnsupportedBitsError: ``bits`` is not one of :data:`SUPPORTED_BITS`.
        GroupSizeError: ``group_size`` does not group K evenly; the message names K and lists
            the valid group sizes nearest to the one given.
        ShapeError: K is below 1, or K*bits does not fill whole bytes.
        DTypeError: an argument is not an int.
    """
    _core.check_layout(in_features, bits, group_size)


def _as_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    # numpy inputs take the tensor path, so both get the same checks and messages. torch
    # shares native-endian, writable arrays with non-negative strides; others are copied.
    if not array.dtype.isnative or not array.flags.writeable or any(s < 0 for s in array.strides):
        array = np.array(array, dtype=array.dtype.newbyteorder("="), copy=True)
    try:
        return torch.from_numpy(array)
    except TypeError:
        raise DTypeError(f"{name}: got a numpy array of dtype {array.dtype}, which torch cannot hold") from None


def pack(codes: ArrayOrTensor, bits: int) -> ArrayOrTensor:
    """Pack integer codes into the canonical little-endian bitstream.

    Args:
        codes: (N, K) integer tensor or numpy array, values in [0, 2**bits - 1].
        bits: 2, 3, 4, 5, 6 or 8. K*bits must be a multiple of 8.

    Returns:
        (N, K*bits/8) uint8, of the same kind (tensor or array) and device as ``codes``.
    """
    if isinstance(codes, np.ndarray):
        return _core.pack(_as_tensor(codes, "codes"), bits).numpy()
    return _core.pack(codes, bits)


def unpack(packed: ArrayOrTensor, bits: int, k: int) -> ArrayOrTensor:
    """Unpack (N, K*bits/8) uint8 into (N, K) uint8 codes (inverse of :func:`pack`)."""
    if isinstance(packed, np.ndarray):
        return _core.unpack(_as_tensor(packed, "packed"), bits, k).numpy()
    return _core.unpack(packed, bits, k)


def quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max round-to-nearest quantization per (row, group).

    For each row n and group l of ``group_size`` consecutive columns: offset = min,
    scale = (max - min) / (2**bits - 1), both rounded to ``scale_dtype`` first; then
    q = clamp(round((w - offset) / scale)) with ties to even. A constant group gets scale 0,
    codes 0, and dequantizes to its offset exactly (no NaN/Inf).

    Args:
        weight: (N, K) float tensor (float32/bfloat16/float16/float64), finite.
        bits: 2, 3, 4, 5, 6 or 8.
        group_size: a divisor of K (a multiple of 8 at 3 and 5 bits, of 4 at 6 bits).
        scale_dtype: torch.float16 (default), torch.bfloat16 or torch.float32.

    Returns:
        ``(packed, scales, offsets)``: uint8 (N, K*bits/8) and two (N, K/group_size) tensors
        of ``scale_dtype``, on the weight's device.
    """
    return _core.quantize(weight, bits, group_size, scale_dtype, backend)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense (N, K) weight ``scales * q + offsets`` (computed in float32), in ``dtype``."""
    return _core.dequantize(packed, scales, offsets, bits, group_size, dtype, backend)


class _QMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, offsets, bits, group_size, backend, activations):
        ctx.save_for_backward(packed, scales, offsets)
        ctx.config = (bits, group_size, backend)
        return _core.qmatmul(x, packed, scales, offsets, bits, group_size, backend, activations)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        packed, scales, offsets = ctx.saved_tensors
        bits, group_size, backend = ctx.config
        grad_x = _core.qmatmul_grad_input(grad_output, packed, scales, offsets, bits, group_size, backend)
        return grad_x, None, None, None, None, None, None, None


def qmatmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    backend: str = "auto",
    activations: str = "exact",
) -> torch.Tensor:
    """``x @ W.T`` for the quantized weight W, without materialising W on CPU.

    Args:
        x: (..., K) float32, bfloat16, float16 or float64.
        activations: ``"exact"`` (default) or ``"int8"``: on CPU, small batches (M <= 16
            rows) of a 4-bit weight with a group size that is a multiple of 32 quantize x to
            int8 per block (one float scale each, round half to even; the block is the
            largest of 128, 64 and 32 that divides the group size) and use integer dot
            products, about 2x faster for generation. Each output then differs from the
            exact one by at most sum_k |s*q| * d_block / 2 (d = block max|x| / 127); the
            offsets' term stays exact. Other layouts, larger batches, float64 and CUDA
            tensors are always computed exactly. The backward pass is exact.

    Returns:
        (..., N) in x's dtype. Differentiable with respect to ``x`` (backward = grad @ W);
        the quantized weight is frozen. On CPU, small batches (M <= 16 rows) use a fused
        dequantize-and-multiply kernel and larger ones dequantize one tile of rows at a time
        for torch's GEMM, so at most a tile of W is ever dense; on CUDA W is dequantized
        once per call.
    """
    return _QMatmul.apply(x, packed, scales, offsets, bits, group_size, backend, activations)


class _GroupPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_size, backend):
        ctx.config = (group_size, backend)
        return _core.group_pool(x, group_size, backend)

    @staticmethod
    def backward(ctx, grad_output):
        group_size, backend = ctx.config
        return _core.group_pool_backward(grad_output, group_size, backend), None, None


def group_pool(x: torch.Tensor, group_size: int, *, backend: str = "auto") -> torch.Tensor:
    """Mean over each contiguous group of ``group_size`` along the last dimension.

    (..., K) -> (..., K/group_size), differentiable. This is QA-LoRA's pooling: the adapter
    sees one value per quantization group, so its update folds into the group offsets.
    """
    return _GroupPool.apply(x, group_size, backend)


def merge_offsets(
    offsets: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    group_size: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The exact QA-LoRA merge: ``offsets + scaling * (lora_B @ lora_A) / group_size``.

    Args:
        offsets: (N, L) with L = K / group_size.
        lora_A: (rank, L). lora_B: (N, rank).
        scaling: alpha / rank.

    Returns:
        New offsets (N, L), computed in float32 and returned in ``offsets``' dtype.
    """
    return _core.merge_offsets(offsets, lora_A, lora_B, scaling, group_size, backend)
