"""How the kernels' calls reach the Rust binding: the torch custom ops and their
registration, fake implementations and autograd; the eager route that skips the dispatcher
when nothing traces; the small-batch route's predicate; the fused QA-LoRA layer's autograd
node; and the conversion of arguments to what an op's schema carries.

Private: :mod:`qalora.ops` is the API (it re-exports :data:`CUSTOM_OPS`,
:func:`eager_route_applies` and :func:`group_param_grads` from here). docs/design.md §3
describes the routes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from . import _core
from .errors import InternalError

# ---------------------------------------------------------------- custom ops
#
# One torch custom op per kernel. Its implementation is the Rust function itself (which
# validates every argument again); its fake implementation computes output shapes and dtypes
# from metadata alone (symbolic shapes included), so torch.compile / torch.export can trace a
# model without running the kernels. Integer arguments are plain `int` in the schemas: bits
# and group sizes are layout constants, never traced as symbols.

_LIBRARY = "qalora"


#: The registered ops, by name (``torch.ops.qalora.<name>``; each runs ``qalora._core.<name>``).
CUSTOM_OPS: dict[str, torch.library.CustomOpDef | torch._ops.OpOverload] = {}


def _custom_op(name: str, schema: str) -> torch.library.CustomOpDef:
    op = torch.library.custom_op(f"{_LIBRARY}::{name}", getattr(_core, name), mutates_args=(), schema=schema)
    CUSTOM_OPS[name] = op
    return op


def _last(shape: torch.Size, last: Any) -> list[Any]:
    return [*shape[:-1], last]


_pack_op = _custom_op("pack", "(Tensor codes, int bits, str backend) -> Tensor")
_unpack_op = _custom_op("unpack", "(Tensor packed, int bits, int k, str backend) -> Tensor")
_quantize_op = _custom_op(
    "quantize",
    "(Tensor weight, int bits, int group_size, ScalarType scale_dtype, str backend) -> (Tensor, Tensor, Tensor)",
)
_dequantize_op = _custom_op(
    "dequantize",
    "(Tensor packed, Tensor scales, Tensor offsets, int bits, int group_size, ScalarType dtype, str backend, "
    "Tensor? scale_factors=None, Tensor? offset_factors=None) -> Tensor",
)
_qmatmul_op = _custom_op(
    "qmatmul",
    "(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int bits, int group_size, str backend, "
    "str activations, Tensor? scale_factors=None, Tensor? offset_factors=None) -> Tensor",
)
_qmatmul_grad_input_op = _custom_op(
    "qmatmul_grad_input",
    "(Tensor grad_output, Tensor packed, Tensor scales, Tensor offsets, int bits, int group_size, str backend, "
    "Tensor? scale_factors=None, Tensor? offset_factors=None) -> Tensor",
)
_qmatmul_grad_scales_op = _custom_op(
    "qmatmul_grad_scales",
    "(Tensor grad_output, Tensor x, Tensor packed, Tensor scales, Tensor offsets, int bits, int group_size, "
    "str backend, Tensor? scale_factors=None, Tensor? offset_factors=None) -> Tensor",
)
_group_pool_op = _custom_op("group_pool", "(Tensor x, int group_size, str backend) -> Tensor")
_group_pool_backward_op = _custom_op(
    "group_pool_backward", "(Tensor grad_output, int group_size, str backend) -> Tensor"
)

# qmatmul_tiled runs once per layer per generated token, inside compiled decode graphs,
# where torch.library.custom_op's Python wrappers (autograd, backend dispatch) cost ~25 us
# a call. It has no gradient, so it is defined with the plain library API: the dispatcher
# calls the binding's function directly (measured 38 vs 56-68 us a call on a 576 x 576
# layer at M = 1).
_RAW_LIBRARY = torch.library.Library(_LIBRARY, "FRAGMENT")
_RAW_LIBRARY.define("qmatmul_tiled(Tensor x, Tensor tiled, int out_features, int group_size) -> Tensor")
_RAW_LIBRARY.impl("qmatmul_tiled", _core.qmatmul_tiled, "CompositeExplicitAutograd")
CUSTOM_OPS["qmatmul_tiled"] = torch.ops.qalora.qmatmul_tiled.default
_merge_offsets_op = _custom_op(
    "merge_offsets",
    "(Tensor offsets, Tensor lora_A, Tensor lora_B, float scaling, int group_size, str backend) -> Tensor",
)

# merge_offsets into a given tensor: ``offsets`` itself (in place), or a separate ``out``.
# Two ops, so that no op mutates an argument that aliases another.


def _merge_offsets_in_place(offsets, lora_A, lora_B, scaling, group_size, backend) -> None:
    _core.merge_offsets(offsets, lora_A, lora_B, scaling, group_size, backend, offsets)


def _merge_offsets_into(offsets, lora_A, lora_B, scaling, group_size, backend, out) -> None:
    _core.merge_offsets(offsets, lora_A, lora_B, scaling, group_size, backend, out)


for _name, _fn, _schema in (
    (
        "merge_offsets_",
        _merge_offsets_in_place,
        "(Tensor(a!) offsets, Tensor lora_A, Tensor lora_B, float scaling, int group_size, str backend) -> ()",
    ),
    (
        "merge_offsets_out",
        _merge_offsets_into,
        "(Tensor offsets, Tensor lora_A, Tensor lora_B, float scaling, int group_size, str backend, "
        "Tensor(a!) out) -> ()",
    ),
):
    CUSTOM_OPS[_name] = torch.library.custom_op(
        f"{_LIBRARY}::{_name}", _fn, mutates_args=("offsets",) if _name.endswith("_") else ("out",), schema=_schema
    )


@_pack_op.register_fake
def _(codes, bits, backend):
    return codes.new_empty((codes.shape[0], codes.shape[1] * bits // 8), dtype=torch.uint8)


@_unpack_op.register_fake
def _(packed, bits, k, backend):
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)


@_quantize_op.register_fake
def _(weight, bits, group_size, scale_dtype, backend):
    n, k = weight.shape
    params = (n, k // group_size)
    return (
        weight.new_empty((n, k * bits // 8), dtype=torch.uint8),
        weight.new_empty(params, dtype=scale_dtype),
        weight.new_empty(params, dtype=scale_dtype),
    )


@_dequantize_op.register_fake
def _(packed, scales, offsets, bits, group_size, dtype, backend, scale_factors=None, offset_factors=None):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 8 // bits), dtype=dtype)


@_qmatmul_op.register_fake
def _(x, packed, scales, offsets, bits, group_size, backend, activations, scale_factors=None, offset_factors=None):
    return x.new_empty(_last(x.shape, packed.shape[0]))


@_qmatmul_grad_input_op.register_fake
def _(grad_output, packed, scales, offsets, bits, group_size, backend, scale_factors=None, offset_factors=None):
    return grad_output.new_empty(_last(grad_output.shape, packed.shape[1] * 8 // bits))


@_qmatmul_grad_scales_op.register_fake
def _(grad_output, x, packed, scales, offsets, bits, group_size, backend, scale_factors=None, offset_factors=None):
    dtype = torch.float64 if torch.float64 in (grad_output.dtype, x.dtype) else torch.float32
    return packed.new_empty((packed.shape[0], packed.shape[1] * 8 // bits // group_size), dtype=dtype)


@_group_pool_op.register_fake
def _(x, group_size, backend):
    return x.new_empty(_last(x.shape, x.shape[-1] // group_size))


@_group_pool_backward_op.register_fake
def _(grad_output, group_size, backend):
    return grad_output.new_empty(_last(grad_output.shape, grad_output.shape[-1] * group_size))


@torch.library.register_fake("qalora::qmatmul_tiled")
def _(x, tiled, out_features, group_size):
    return x.new_empty(_last(x.shape, out_features))


@_merge_offsets_op.register_fake
def _(offsets, lora_A, lora_B, scaling, group_size, backend):
    return torch.empty_like(offsets, memory_format=torch.contiguous_format)


# Autograd: y = x W^T and its backward grad_x = grad_y W are each other's transposes, so each
# op's backward is the other (which also gives double backward); group_pool and its
# backward likewise. The codes are frozen. qmatmul also differentiates its scales and
# offsets (trainable group parameters, docs/design.md §1): with P = grad_y^T x,
# d/ds[n,l] = sum over group l of q[n,k] P[n,k] (qmatmul_grad_scales) and d/dm[n,l] = the
# group sums of P, i.e. grad_y^T times the group sums of x. x is kept only when one of them
# requires grad. The backwards call the ops through `_run`, so an eager backward takes the
# eager route too. Factored parameters' integers and factors (the last two inputs of both
# ops) are frozen.


def _save_weight(ctx, inputs, output):
    x, packed, scales, offsets, bits, group_size, backend, *_ = inputs
    scale_factors, offset_factors = inputs[-2:]
    params_grad = scales.requires_grad or offsets.requires_grad
    ctx.save_for_backward(packed, scales, offsets, x if params_grad else None, scale_factors, offset_factors)
    ctx.layout = (bits, group_size, backend)


def group_param_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    need_scales: bool = True,
    need_offsets: bool = True,
    pooled: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``qmatmul(x, packed, scales, offsets)`` with respect to the scales and
    the offsets, given the output's gradient ``grad_y`` (..., N) and ``x`` (..., K); each in
    its parameter's dtype. ``pooled``: ``group_pool(x)`` (M, K/g) if the caller has it."""
    grad_s = grad_m = None
    if need_scales:
        gs = _run("qmatmul_grad_scales", "tttttiis", grad_y, x, packed, scales, offsets, bits, group_size, "auto")
        grad_s = gs.to(scales.dtype)
    if need_offsets:
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        if pooled is None:
            pooled = _run("group_pool", "tis", x.reshape(-1, x.shape[-1]), group_size, "auto")
        kind = torch.float64 if torch.float64 in (g2.dtype, pooled.dtype) else torch.float32
        grad_m = (g2.t().to(kind) @ pooled.to(kind)).mul_(group_size).to(offsets.dtype)
    return grad_s, grad_m


def _qmatmul_backward(ctx, grad_y):
    packed, scales, offsets, x, *factors = ctx.saved_tensors
    grad_x = grad_s = grad_m = None
    if ctx.needs_input_grad[0]:
        grad_x = _run("qmatmul_grad_input", "ttttiisTT", grad_y, packed, scales, offsets, *ctx.layout, *factors)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        grad_s, grad_m = group_param_grads(
            grad_y,
            x,
            packed,
            scales,
            offsets,
            *ctx.layout[:2],
            need_scales=ctx.needs_input_grad[2],
            need_offsets=ctx.needs_input_grad[3],
        )
    return grad_x, None, grad_s, grad_m, None, None, None, None, None, None


def _qmatmul_grad_input_backward(ctx, grad_grad_x):
    packed, scales, offsets, _, *factors = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _run("qmatmul", "ttttiissTT", grad_grad_x, packed, scales, offsets, *ctx.layout, "exact", *factors)
    return grad, None, None, None, None, None, None, None, None


def _save_group(ctx, inputs, output):
    ctx.group = inputs[1:]


def _group_pool_backward(ctx, grad):
    return _run("group_pool_backward", "tis", grad, *ctx.group), None, None


def _group_pool_backward_backward(ctx, grad):
    return _run("group_pool", "tis", grad, *ctx.group), None, None


_qmatmul_op.register_autograd(_qmatmul_backward, setup_context=_save_weight)
_qmatmul_grad_input_op.register_autograd(_qmatmul_grad_input_backward, setup_context=_save_weight)
_group_pool_op.register_autograd(_group_pool_backward, setup_context=_save_group)
_group_pool_backward_op.register_autograd(_group_pool_backward_backward, setup_context=_save_group)


# ---------------------------------------------------------------- the eager route
#
# Outside tracing, the ops a model runs at every step skip the dispatcher: a
# torch.autograd.Function (same context setup, same backward) calls the Rust function
# directly. The custom op's Python layers cost about 0.1 ms a call forward and 0.2 ms with
# autograd (measured on 512-row calls), and a training step of SmolLM2-135M makes 840 of
# them; torch.compile, torch.export, fake tensors, dispatch modes and functorch transforms
# still see the custom ops.


def _eager_function(name: str, setup, backward) -> type[torch.autograd.Function]:
    kernel = getattr(_core, name)

    def forward(*args):
        return kernel(*args)

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)

    return type(
        f"_Eager_{name}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )


_EAGER: dict[str, Any] = {
    "qmatmul": _eager_function("qmatmul", _save_weight, _qmatmul_backward).apply,
    "qmatmul_grad_input": _eager_function("qmatmul_grad_input", _save_weight, _qmatmul_grad_input_backward).apply,
    "qmatmul_grad_scales": _core.qmatmul_grad_scales,  # a backward's kernel: no gradient
    "group_pool": _eager_function("group_pool", _save_group, _group_pool_backward).apply,
    "group_pool_backward": _eager_function("group_pool_backward", _save_group, _group_pool_backward_backward).apply,
    "qmatmul_tiled": _core.qmatmul_tiled,  # no gradient
}

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_route_applies(*args: Any) -> bool:
    """Whether the ops run on ``args`` take the eager route (see above): no tracing,
    compiling, dispatch or torch-function mode, functorch transform, and plain tensors."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


# The bindings themselves, for eager calls with nothing to differentiate: an autograd
# Function's apply costs about 20 us a call, as much as a small layer's kernel.
_KERNELS: dict[str, Any] = {name: getattr(_core, name) for name in _EAGER}


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _run(name: str, kinds: str, *args: Any) -> Any:
    """One of the per-step ops: the eager route when it applies (the binding itself when no
    input needs a gradient), else the custom op."""
    if eager_route_applies(*args):
        return (_EAGER if _needs_grad(args) else _KERNELS)[name](*args)
    return _call(name, kinds, *args)


# ---------------------------------------------------------------- the small-batch route
#
# The one place Python decides by the number of rows: the tiled layout's kernel
# (`qmatmul_tiled`) runs small CPU batches; everything else is routed by rows inside the
# binding, against the same threshold.

#: Rows of x up to which the small-batch routes (and the tiled layout's kernel) run: the
#: core's threshold (``qalora_core::matmul::FUSED_MAX_ROWS``), so the two cannot drift apart.
SMALL_BATCH_ROWS = _core.FUSED_MAX_ROWS


def tiled_route_applies(x: torch.Tensor, in_features: int) -> bool:
    """Whether a tiled layer (:meth:`qalora.QuantLinear.tile_`) multiplies ``x`` with
    :func:`qalora.ops.qmatmul_tiled`: at most :data:`SMALL_BATCH_ROWS` rows."""
    # The tiled kernel: small CPU batches without gradients (its int8 route has no backward).
    rows = x.numel() // max(in_features, 1)
    return (
        rows <= SMALL_BATCH_ROWS
        and x.device.type == "cpu"
        and x.dtype != torch.float64
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


# ---------------------------------------------------------------- the fused QA-LoRA layer
#
# `ops.qalora_linear` (the public entry, which checks the adapters' shapes) runs a whole
# QA-LoRA layer eagerly as one autograd node: `_QALoRALinear`, or `_qalora_forward` alone
# when nothing needs a gradient.


def _qalora_forward(
    x2, lora_A, lora_B, packed, scales, offsets, bits, group_size, scaling, activations, dtype, dropout, factors
):
    """The fused layer's forward: y and what its backward needs (pooled input, h, the
    adapters in the compute dtype, the dropout's mask). ``factors``: (scale_factors,
    offset_factors) of factored group parameters, or (None, None)."""
    y = _core.qmatmul(x2, packed, scales, offsets, bits, group_size, "auto", activations, *factors)
    mask = None
    if dropout > 0:
        # The adapter reads dropout(x), as nn.Dropout gives it (same random stream).
        dropped, mask = torch.native_dropout(x2, dropout, True)
        pooled = _core.group_pool(dropped, group_size, "auto").to(dtype)
        del dropped
    else:
        pooled = _core.group_pool(x2, group_size, "auto").to(dtype)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    h = pooled @ a.t()
    if y.dtype == dtype:
        y.addmm_(h, b.t(), alpha=scaling)  # y is this call's own fresh tensor
    else:
        y += (h @ b.t()).mul_(scaling).to(y.dtype)
    return y, (pooled, h, a, b, mask)


class _QALoRALinear(torch.autograd.Function):
    """``qalora_linear`` as one autograd node (no double backward)."""

    @staticmethod
    def forward(
        ctx,
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
    ):
        y, (pooled, h, a, b, mask) = _qalora_forward(
            x2, lora_A, lora_B, packed, scales, offsets, bits, group_size, scaling, activations, dtype, dropout, factors
        )
        # Trained group parameters need x itself (the scales' gradient reads every column).
        params_grad = scales.requires_grad or offsets.requires_grad
        ctx.save_for_backward(pooled, h, a, b, packed, scales, offsets, mask, x2 if params_grad else None, *factors)
        ctx.layout = (bits, group_size, scaling, lora_A.dtype, lora_B.dtype, dropout)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        pooled, h, a, b, packed, scales, offsets, mask, x2, *factors = ctx.saved_tensors
        bits, group_size, scaling, a_dtype, b_dtype, dropout = ctx.layout
        grad_s = grad_m = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            # The base product's group parameters see x, not the adapter's dropout(x): the
            # adapter's pooled input serves the offsets only when there is no dropout.
            grad_s, grad_m = group_param_grads(
                grad_y,
                x2,
                packed,
                scales,
                offsets,
                bits,
                group_size,
                need_scales=ctx.needs_input_grad[4],
                need_offsets=ctx.needs_input_grad[5],
                pooled=pooled if mask is None else None,
            )
        g = grad_y.to(h.dtype)
        grad_h = (g @ b).mul_(scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _core.qmatmul_grad_input(grad_y, packed, scales, offsets, bits, group_size, "auto", *factors)
            # The adapter's share, the pooling's backward: each group's gradient spread over
            # its columns, added in place (no second (M, K) tensor, no separate add).
            rows, k = grad_x.shape
            spread = (grad_h @ a).div_(group_size).to(grad_x.dtype).unsqueeze(-1)
            grouped = grad_x.view(rows, k // group_size, group_size)
            if mask is None:
                grouped.add_(spread)
            else:  # through the dropout: kept inputs only, scaled as they were
                grouped.addcmul_(spread, mask.view(grouped.shape), value=1.0 / (1.0 - dropout))
        if ctx.needs_input_grad[1]:
            grad_a = (grad_h.t() @ pooled).to(a_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h).mul_(scaling).to(b_dtype)
        return grad_x, grad_a, grad_b, None, grad_s, grad_m, None, None, None, None, None, None, None


# ---------------------------------------------------------------- arguments for the dispatcher

_INT64 = (-(2**63), 2**63 - 1)


def _carried(kinds: str, *values: Any) -> list[Any] | None:
    """``values`` as the dispatcher's schema carries them (per ``kinds``: ``t`` a tensor, ``T``
    a tensor or None, ``i``
    an int64, ``f`` a float, ``s`` a str, ``d`` a torch.dtype), converted the way the kernel
    reads them (``__index__`` for ints, ``__float__`` for floats); None when one cannot be."""
    out = []
    for kind, v in zip(kinds, values, strict=True):
        if kind == "t":
            ok = isinstance(v, torch.Tensor)
        elif kind == "T":
            ok = v is None or isinstance(v, torch.Tensor)
        elif kind == "i":
            ok = not isinstance(v, bool) and hasattr(type(v), "__index__")
            if ok:
                try:
                    v = operator.index(v)
                except TypeError:  # e.g. a numpy array of more than one element
                    return None
                ok = _INT64[0] <= v <= _INT64[1]
        elif kind == "f":
            ok = not isinstance(v, (bool, str, bytes)) and (
                hasattr(type(v), "__float__") or hasattr(type(v), "__index__")
            )
            if ok:
                try:
                    v = float(v)
                except (TypeError, ValueError, OverflowError):
                    ok = False
        elif kind == "s":
            ok = isinstance(v, str)
        else:
            ok = isinstance(v, torch.dtype)
        if not ok:
            return None
        out.append(v)
    return out


def _call(name: str, kinds: str, *args: Any) -> Any:
    """Runs ``op`` on ``args``. Arguments its schema cannot carry (a float for an int, an int
    beyond int64, a non-tensor) go to the kernel itself, which refuses them with its typed
    error, as it does every other bad argument inside the op."""
    carried = _carried(kinds, *args)
    if carried is None:
        getattr(_core, name)(*args)
        raise InternalError(f"qalora::{name}: the kernel accepted arguments its schema cannot carry: {args!r}")
    return CUSTOM_OPS[name](*carried)
