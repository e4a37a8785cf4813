"""Typed contract of the native module ``qalora._core`` (the engine of :mod:`qalora.ops`).

Checked against the built module by ``python -m mypy.stubtest qalora._core`` (``.ci/stubcheck``).
Every function raises :class:`qalora.QALoRAError` subclasses on bad input: a wrong argument type
is a ``DTypeError`` naming the argument, an unknown option string an ``InvalidValueError``
listing the allowed values.
"""

from typing import Literal

import torch

__all__ = [
    "FUSED_MAX_ROWS",
    "SUPPORTED_BITS",
    "__version__",
    "check_layout",
    "dequantize",
    "gptq_hessian_update",
    "gptq_quantize",
    "group_pool",
    "group_pool_backward",
    "merge_offsets",
    "pack",
    "qmatmul",
    "qmatmul_grad_input",
    "qmatmul_grad_scales",
    "qmatmul_tiled",
    "quantize",
    "register_errors",
    "repack_tiles",
    "set_thread_pool",
    "stream_read",
    "thread_pool",
    "unpack",
    "unrepack_tiles",
]

_Backend = Literal["auto", "core", "torch"]
_Activations = Literal["exact", "int8", "bf16"]

__version__: str
#: Bit widths the kernels store.
SUPPORTED_BITS: list[int]
#: Rows of x up to which the small-batch CPU routes (fused kernels, the tiled layout) run;
#: larger batches dequantize tiles and call torch's GEMM.
FUSED_MAX_ROWS: int

def register_errors(
    *,
    shape: type[Exception],
    dtype: type[Exception],
    device: type[Exception],
    bits: type[Exception],
    group_size: type[Exception],
    code_range: type[Exception],
    value: type[Exception],
    internal: type[Exception],
) -> None:
    """Hand the exception classes to the extension (``qalora.errors`` does it once, at import)."""

def check_layout(in_features: int, bits: int, group_size: int) -> None:
    """Raise the ops' error unless a layer of ``in_features`` inputs fits ``bits`` and ``group_size``."""

def pack(codes: torch.Tensor, bits: int, backend: _Backend = ...) -> torch.Tensor:
    """(N, K) integer codes -> (N, K*bits/8) uint8."""

def unpack(packed: torch.Tensor, bits: int, k: int, backend: _Backend = ...) -> torch.Tensor:
    """(N, K*bits/8) uint8 -> (N, K) uint8 codes."""

def quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = ...,
    backend: _Backend = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (packed, scales, offsets); scale_dtype defaults to torch.float16."""

def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = ...,
    backend: _Backend = ...,
    scale_factors: torch.Tensor | None = ...,
    offset_factors: torch.Tensor | None = ...,
) -> torch.Tensor:
    """Dense (N, K) weight ``scales * q + offsets``; dtype defaults to torch.float32. With
    ``scale_factors`` / ``offset_factors`` (float16, (N, F)), ``scales`` / ``offsets`` are
    uint8 or int8 integers (N, L) and each group's value is ``factor[n, l // (L / F)] *
    int[n, l]`` (factored parameters, as GGUF's K-quants store them; every op taking a
    quantized weight takes them)."""

def qmatmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    backend: _Backend = ...,
    activations: _Activations = ...,
    scale_factors: torch.Tensor | None = ...,
    offset_factors: torch.Tensor | None = ...,
) -> torch.Tensor:
    """``x @ W.T`` for x of shape (..., K); backend defaults to "auto", activations to "exact"."""

def qmatmul_grad_input(
    grad_output: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    backend: _Backend = ...,
    scale_factors: torch.Tensor | None = ...,
    offset_factors: torch.Tensor | None = ...,
) -> torch.Tensor:
    """``grad_output @ W`` for grad_output of shape (..., N): the backward of qmatmul."""

def qmatmul_grad_scales(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    backend: _Backend = ...,
    scale_factors: torch.Tensor | None = ...,
    offset_factors: torch.Tensor | None = ...,
) -> torch.Tensor:
    """The gradient of ``x @ W.T`` with respect to the scales: (N, K/g), float32 (float64 if an input is)."""

def group_pool(x: torch.Tensor, group_size: int, backend: _Backend = ...) -> torch.Tensor:
    """Mean over each contiguous group of ``group_size`` along the last dimension."""

def group_pool_backward(grad_output: torch.Tensor, group_size: int, backend: _Backend = ...) -> torch.Tensor:
    """Spread ``grad_output[..., l] / group_size`` over the inputs of group l."""

def merge_offsets(
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    group_size: int,
    backend: _Backend = ...,
    out: torch.Tensor | None = ...,
) -> torch.Tensor:
    """``offsets + scaling * (lora_b @ lora_a) / group_size``, in offsets' dtype; into ``out`` when given."""

def repack_tiles(
    packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """A 4-bit CPU weight with float16 parameters -> its tiled int8-route layout (1-D uint8, same size)."""

def unrepack_tiles(
    tiled: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled layout -> ``(packed, scales, offsets)`` in the canonical layout (float16 parameters)."""

def qmatmul_tiled(x: torch.Tensor, tiled: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    """``x @ W.T`` with int8 activations on a tiled weight; x of shape (..., K) with at most 16 rows."""

def stream_read(buf: torch.Tensor) -> int:
    """Read every byte of a uint8 CPU tensor once on all kernel threads; returns a checksum."""

def gptq_hessian_update(hessian: torch.Tensor, x: torch.Tensor, seen: int) -> int:
    """Add the rows of ``x`` (..., K) to the running Hessian ``2 XᵀX / n`` (K, K), in place;
    return the number of rows seen."""

def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = ...,
    damp_percent: float = ...,
    act_order: bool = ...,
    block_size: int | None = ...,
    backend: _Backend = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ for one layer -> (packed, scales, offsets, dampening used); float64 when the
    Hessian is float64."""

def thread_pool() -> str:
    """The thread pool of the kernels' parallel loops: ``"openmp"`` (torch's own OpenMP team,
    the default where torch uses libgomp) or ``"rayon"`` (``QALORA_THREAD_POOL=rayon``)."""

def set_thread_pool(pool: str) -> None:
    """Run the kernels' parallel loops on ``pool``, ``"openmp"`` or ``"rayon"``."""
