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

Each op is a torch custom op (``torch.ops.qalora.qmatmul``, ...; :data:`CUSTOM_OPS` lists
them) with a fake implementation that gives its output shapes and dtypes without running it,
and autograd for ``qmatmul`` and ``group_pool``: models built on them run under
``torch.compile(fullgraph=True)`` and ``torch.export``. The functions below are what to call:
they hand the dispatcher only arguments its schema can carry, so a bad argument still raises
the kernel's own typed error. The registrations, the autograd, the eager route (which skips
the dispatcher when nothing traces) and the fused layer's autograd node are in the private
:mod:`qalora._dispatch`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from . import _core
from ._dispatch import (
    CUSTOM_OPS,
    _call,
    _needs_grad,
    _qalora_forward,
    _QALoRALinear,
    _run,
    eager_route_applies,
)
from ._dispatch import group_param_grads as group_param_grads  # public here, defined beside its autograd
from .errors import DTypeError, InvalidValueError, ShapeError

__all__ = [
    "CUSTOM_OPS",
    "SUPPORTED_BITS",
    "check_layout",
    "dequantize",
    "eager_route_applies",
    "group_pool",
    "merge_offsets",
    "pack",
    "qalora_linear",
    "qmatmul",
    "quantize",
    "unpack",
]

#: Bit widths the kernels store.
SUPPORTED_BITS: tuple[int, ...] = tuple(_core.SUPPORTED_BITS)

# The extension chose its thread pool at import (QALORA_THREAD_POOL=rayon, else torch's
# OpenMP team where present); a value it does not know is said, not silently ignored.
if os.environ.get("QALORA_THREAD_POOL", "") not in ("", "openmp", "rayon"):
    warnings.warn(
        f"QALORA_THREAD_POOL: got {os.environ['QALORA_THREAD_POOL']!r}, allowed: 'openmp', 'rayon'; "
        f"the kernels use {_core.thread_pool()!r}",
        stacklevel=2,
    )

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


def qalora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    activations: str = "exact",
    adapter_dtype: torch.dtype | None = None,
    dropout: float = 0.0,
    scale_factors: torch.Tensor | None = None,
    offset_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qmatmul(x, ...) + scaling * group_pool(dropout(x)) @ lora_A.T @ lora_B.T`` as one
    autograd node: a QA-LoRA layer in eager mode (callers check
    :func:`eager_route_applies`). The backward adds the pooling's gradient into the base
    product's in place and computes the adapter's gradients directly, where the composed
    ops make eight autograd nodes for a 2-D x (docs/design.md §3) and two extra (M, K)
    tensors per layer.

    Args:
        x: (..., K). lora_A: (rank, K/group_size). lora_B: (N, rank).
        adapter_dtype: the dtype the adapter product runs in (default: lora_A's; the
            autocast dtype under autocast); its gradients come back in the weights' dtypes.
        dropout: probability of zeroing an input of the adapter (as ``nn.Dropout`` in
            training mode; 0 for none). Its mask (M×K bytes) is kept for the backward.
        scale_factors, offset_factors: factored group parameters (see :func:`dequantize`).

    Returns:
        (..., N) in x's dtype. Differentiable with respect to x, the adapters and
        floating-point scales/offsets (trained group parameters); no double backward.

    Raises:
        ShapeError: lora_A or lora_B do not fit the layer; the kernels' own errors for x and
            the quantized weight.
    """
    # The layer's own width (x is checked against it by the kernel).
    k = packed.shape[-1] * 8 // bits if packed.dim() == 2 and bits in SUPPORTED_BITS else 0
    groups = k // group_size if group_size > 0 else 0
    rank = lora_A.shape[0] if lora_A.dim() == 2 else -1
    if lora_A.dim() != 2 or lora_A.shape[1] != groups or tuple(lora_B.shape) != (packed.shape[0], rank):
        raise ShapeError(
            f"lora_A, lora_B: got shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)}, expected "
            f"(rank, K/group_size) = (rank, {groups}) and (out_features, rank) = ({packed.shape[0]}, rank)"
        )
    dtype = adapter_dtype or lora_A.dtype
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if not 0.0 <= dropout < 1.0:
        raise InvalidValueError(f"dropout: got {dropout}, allowed: 0 <= dropout < 1")
    factors = (_frozen(scale_factors), _frozen(offset_factors))
    args = (
        x2,
        lora_A,
        lora_B,
        packed,
        scales,
        offsets,
        bits,
        group_size,
        scaling,
        activations,
        dtype,
        dropout,
        factors,
    )
    # Nothing to differentiate (inference, no_grad): the forward without an autograd node.
    y = _QALoRALinear.apply(*args) if _needs_grad(args) else _qalora_forward(*args)[0]
    return y.view(*x.shape[:-1], y.shape[-1]) if x.dim() != 2 else y


def _frozen(t: Any) -> Any:
    # The weight-side ops are not differentiable: their results never require grad.
    return t.detach() if isinstance(t, torch.Tensor) else t


# ---------------------------------------------------------------- the ops


def pack(codes: ArrayOrTensor, bits: int) -> ArrayOrTensor:
    """Pack integer codes into the canonical little-endian bitstream.

    Args:
        codes: (N, K) integer tensor or numpy array, values in [0, 2**bits - 1].
        bits: 2, 3, 4, 5, 6 or 8. K*bits must be a multiple of 8.

    Returns:
        (N, K*bits/8) uint8, of the same kind (tensor or array) and device as ``codes``.
    """
    if isinstance(codes, np.ndarray):
        return _call("pack", "tis", _as_tensor(codes, "codes"), bits, "auto").numpy()
    return _call("pack", "tis", _frozen(codes), bits, "auto")


def unpack(packed: ArrayOrTensor, bits: int, k: int) -> ArrayOrTensor:
    """Unpack (N, K*bits/8) uint8 into (N, K) uint8 codes (inverse of :func:`pack`)."""
    if isinstance(packed, np.ndarray):
        return _call("unpack", "tiis", _as_tensor(packed, "packed"), bits, k, "auto").numpy()
    return _call("unpack", "tiis", _frozen(packed), bits, k, "auto")


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
    return _call("quantize", "tiids", _frozen(weight), bits, group_size, scale_dtype, backend)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    backend: str = "auto",
    scale_factors: torch.Tensor | None = None,
    offset_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense (N, K) weight ``scales * q + offsets`` (computed in float32), in ``dtype``.

    ``scale_factors`` / ``offset_factors``: factored group parameters (docs/design.md §2):
    ``scales`` and ``offsets`` are then uint8 / int8 integers (N, L) and each group's value is
    ``factor[n, l // (L / F)] * int[n, l]`` for float16 factors of shape (N, F), F dividing L,
    the way GGUF's K-quants store them (exact in float32). Every op that takes a quantized
    weight takes them."""
    args = (_frozen(packed), _frozen(scales), _frozen(offsets), bits, group_size, dtype, backend)
    return _call("dequantize", "tttiidsTT", *args, _frozen(scale_factors), _frozen(offset_factors))


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
    scale_factors: torch.Tensor | None = None,
    offset_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for the quantized weight W, without materialising W on CPU.

    Args:
        x: (..., K) float32, bfloat16, float16 or float64.
        activations: ``"exact"`` (default), ``"int8"`` or ``"bf16"``; they differ only on
            CPU, for small batches (M <= 16 rows) of a 4-bit weight with a group size that is
            a multiple of 32. ``"int8"`` quantizes x to int8 per block (one float scale each,
            round half to even; the block is the largest of 128, 64 and 32 that divides the
            group size) and uses integer dot products: each output then differs from the
            exact one by at most sum_k |s*q| * d_block / 2 (d = block max|x| / 127).
            ``"bf16"`` rounds x to bfloat16 (to nearest even, as torch's int4 kernel does)
            and accumulates in float32: at most 2**-8 * sum_k |s*q*x| from the exact result.
            Both keep the offsets' term exact (float32 sums of x). Other layouts, larger
            batches, float64 and CUDA tensors are always computed exactly. The backward pass
            is exact.
        scale_factors, offset_factors: factored group parameters (see :func:`dequantize`);
            frozen, like the codes.

    Returns:
        (..., N) in x's dtype. Differentiable with respect to ``x`` (backward = grad @ W)
        and to floating-point ``scales`` and ``offsets`` (trained group parameters, see
        :func:`group_param_grads`); the codes are frozen. On CPU, small batches (M <= 16 rows) use a fused
        dequantize-and-multiply kernel and larger ones dequantize one tile of rows at a time
        for torch's GEMM, so at most a tile of W is ever dense; on CUDA W is dequantized
        once per call. For bfloat16 x those CPU tiles are dequantized straight to bfloat16
        and multiplied by bf16 GEMMs with float32 accumulation (as ``nn.Linear`` does on
        bf16 weights, e.g. under ``torch.autocast("cpu", torch.bfloat16)``); the backward
        pass of a bfloat16 gradient likewise.
    """
    factors = (_frozen(scale_factors), _frozen(offset_factors))
    return _run("qmatmul", "ttttiissTT", x, packed, scales, offsets, bits, group_size, backend, activations, *factors)


def qmatmul_tiled(x: torch.Tensor, tiled: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    """``x @ W.T`` with int8 activations on a weight stored in the tiled int8 layout
    (:meth:`qalora.QuantLinear.tile_`); x of shape (..., K) with at most 16 rows in all, on
    CPU. The arithmetic of ``qmatmul(..., activations="int8")``; no gradient.
    """
    return _run("qmatmul_tiled", "ttii", x, _frozen(tiled), out_features, group_size)


def group_pool(x: torch.Tensor, group_size: int, *, backend: str = "auto") -> torch.Tensor:
    """Mean over each contiguous group of ``group_size`` along the last dimension.

    (..., K) -> (..., K/group_size), differentiable. This is QA-LoRA's pooling: the adapter
    sees one value per quantization group, so its update folds into the group offsets.
    """
    return _run("group_pool", "tis", x, group_size, backend)


def merge_offsets(
    offsets: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    group_size: int,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact QA-LoRA merge: ``offsets + scaling * (lora_B @ lora_A) / group_size``.

    Args:
        offsets: (N, L) with L = K / group_size.
        lora_A: (rank, L). lora_B: (N, rank).
        scaling: alpha / rank.
        out: write the result here instead of into a new tensor: ``offsets`` itself for an
            in-place merge, or a contiguous tensor of the offsets' shape, dtype and device
            that overlaps no input. On CPU this skips allocating (and page-faulting in) a
            fresh (N, L) tensor, which costs more than the merge itself.

    Returns:
        The merged offsets (N, L), computed in float32 and rounded once to ``offsets``'
        dtype: ``out`` when given, else a new tensor.
    """
    args = (_frozen(offsets), _frozen(lora_A), _frozen(lora_B), scaling, group_size, backend)
    if out is None:
        return _call("merge_offsets", "tttfis", *args)
    if not isinstance(out, torch.Tensor):
        _core.merge_offsets(*args, out)  # raises the kernel's typed error
    name = "merge_offsets_" if out is offsets else "merge_offsets_out"
    if name == "merge_offsets_":
        _call(name, "tttfis", *args)
    else:
        _call(name, "tttfist", *args, _frozen(out))
    return out
