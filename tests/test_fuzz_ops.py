"""Property-based fuzzing of every public op: arguments near a valid call, with one or more
broken at random (wrong types, dtypes, shapes, layouts, values, sizes beyond int64). Every
call either returns what the op's fake implementation says it returns (shape, dtype) or
raises one of qalora's typed errors; never another exception, a crash or a hang.

The runs are derandomized (the same examples every time, so a CI failure reproduces
locally) and small: QALORA_FUZZ_EXAMPLES raises the count for a longer local run.
"""

from __future__ import annotations

import faulthandler
import os

import numpy as np
import pytest
import qalora
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qalora import ops
from torch._subclasses.fake_tensor import FakeTensorMode

EXAMPLES = int(os.environ.get("QALORA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # shared machines are noisy; hangs are caught by the watchdog below
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_S = 300  # the whole test, not one example


@pytest.fixture(autouse=True)
def watchdog():
    # A kernel that never returns cannot be interrupted from Python: dump every thread's
    # stack and end the process, so a hang fails the run instead of stalling it.
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]
OTHER_DTYPES += [torch.uint16, torch.uint32, torch.uint64]
BAD_INTS = [0, -1, -(2**63), 2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -(2**70)]
BAD_OBJECTS = [None, 4.0, True, "4", b"4", [4], np.float64(4.5), object()]


def _tensor_like(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` broken in one way: another dtype, a dim added or dropped, a size changed, a
    non-contiguous or expanded view, NaN/Inf values, or empty."""
    how = draw(st.sampled_from(["dtype", "dims", "size", "transpose", "expand", "special", "empty"]))
    if how == "dtype":
        return _cast(t, draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES)))
    if how == "dims":
        return t.unsqueeze(0) if draw(st.booleans()) or t.dim() == 0 else t.reshape(-1)
    if how == "size" and t.dim() > 0:
        d = draw(st.integers(0, t.dim() - 1))
        size = list(t.shape)
        size[d] = draw(st.integers(0, 70))
        return _cast(torch.randn(size), t.dtype)
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape, not contiguous
    if how == "expand" and t.dim() >= 1 and t.numel():
        return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(*([2**20, *list(t.shape[1:])]))
    if how == "special" and t.is_floating_point() and t.numel():
        flat = t.clone().reshape(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -1e38]))
        return flat.reshape(t.shape)
    return t[..., :0] if t.dim() else t.reshape(1)[:0]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.from_numpy(t.detach().abs().to(torch.int64).numpy().astype(str(dtype).split(".")[1]))
    return t.detach().to(dtype)


def _maybe_break(draw, value, kind: str, rate: float = 0.2):
    """``value`` as it is, or (with probability ``rate``) broken according to its kind."""
    if not draw(st.booleans()) or draw(st.floats(0, 1)) > rate * 2:
        return value
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([*BAD_OBJECTS, np.zeros(3)]))
    if kind == "tensor":
        return _tensor_like(draw, value)
    if kind == "int":
        return draw(st.sampled_from([*BAD_INTS, value + 1, value - 1, value * 3]))
    if kind == "str":
        return draw(st.sampled_from(["", "gpu", "AUTO", "int4", "exact ", 3]))
    if kind == "dtype":
        return draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
    if kind == "float":
        return draw(st.sampled_from([float("nan"), float("inf"), -1e300, 0.0, 2**1100]))
    raise AssertionError(kind)


@st.composite
def layouts(draw):
    bits = draw(st.sampled_from(ops.SUPPORTED_BITS))
    g = draw(st.sampled_from([8, 16, 32, 64]))
    k = g * draw(st.integers(1, 4))
    n = draw(st.integers(1, 20))
    return n, k, bits, g


def _check(name, call, fake_args=None):
    """Runs ``call``: a typed error, or a result whose metadata the fake implementation of
    op ``name`` (on ``fake_args``) predicts."""
    try:
        out = call()
    except qalora.InternalError as e:  # a bug by definition
        raise AssertionError(f"{name}: internal error {e}") from e
    except qalora.QALoRAError as e:
        event(f"{name}: {type(e).__name__}")  # shown by pytest --hypothesis-show-statistics
        return None
    event(f"{name}: returned")
    if fake_args is not None:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = ops.CUSTOM_OPS[name](*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fake_args])
        real = out if isinstance(out, tuple) else (out,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake, strict=True):
            r = torch.from_numpy(r) if isinstance(r, np.ndarray) else r
            assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype), (name, r.shape, f.shape, r.dtype, f.dtype)
    return out


# ---------------------------------------------------------------- one property per op


@FUZZ
@given(st.data())
def test_fuzz_pack_and_unpack(data):
    draw = data.draw
    n, k, bits, _ = draw(layouts())
    dtype = draw(st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.int64, torch.uint16]))
    codes = torch.randint(0, 2**bits, (n, k))
    if draw(st.booleans()):  # one code out of range (or, for a signed dtype, negative)
        codes.view(-1)[draw(st.integers(0, n * k - 1))] = draw(st.sampled_from([2**bits, -1, 2**bits - 1]))
    codes = _cast(codes, dtype) if dtype != torch.int8 or codes.max() < 128 else codes
    codes = _maybe_break(draw, codes, "tensor")
    b = _maybe_break(draw, bits, "int")
    as_numpy = isinstance(codes, torch.Tensor) and draw(st.booleans())
    arg = codes.numpy() if as_numpy else codes
    packed = _check("pack", lambda: ops.pack(arg, b), [codes, b, "auto"])
    packed = packed if packed is not None else torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8)
    packed = torch.from_numpy(packed) if isinstance(packed, np.ndarray) else packed
    packed = _maybe_break(draw, packed, "tensor")
    kk = _maybe_break(draw, k, "int")
    b = _maybe_break(draw, bits, "int")
    _check("unpack", lambda: ops.unpack(packed, b, kk), [packed, b, kk, "auto"])


@FUZZ
@given(st.data())
def test_fuzz_quantize_and_dequantize(data):
    draw = data.draw
    n, k, bits, g = draw(layouts())
    w = _cast(torch.randn(n, k) * draw(st.sampled_from([1e-3, 1.0, 1e4])), draw(st.sampled_from(FLOAT_DTYPES)))
    w = _maybe_break(draw, w, "tensor", 0.15)
    args = [_maybe_break(draw, v, kind, 0.1) for v, kind in [(bits, "int"), (g, "int")]]
    scale_dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    scale_dtype = _maybe_break(draw, scale_dtype, "dtype", 0.1)
    backend = _maybe_break(draw, draw(st.sampled_from(["auto", "core", "torch"])), "str", 0.1)
    q = _check(
        "quantize",
        lambda: ops.quantize(w, *args, scale_dtype, backend=backend),
        [w, *args, scale_dtype, backend],
    )
    if q is None:
        q = ops.quantize(torch.randn(n, k), bits, g)
    p, s, m = (_maybe_break(draw, t, "tensor", 0.1) for t in q)
    args = [_maybe_break(draw, v, kind, 0.1) for v, kind in [(bits, "int"), (g, "int")]]
    dtype = _maybe_break(draw, draw(st.sampled_from(FLOAT_DTYPES)), "dtype", 0.1)
    backend = _maybe_break(draw, draw(st.sampled_from(["auto", "core", "torch"])), "str", 0.1)
    _check(
        "dequantize",
        lambda: ops.dequantize(p, s, m, *args, dtype, backend=backend),
        [p, s, m, *args, dtype, backend],
    )


@FUZZ
@given(st.data())
def test_fuzz_qmatmul_forward_and_backward(data):
    draw = data.draw
    n, k, bits, g = draw(layouts())
    p, s, m = ops.quantize(torch.randn(n, k), bits, g, draw(st.sampled_from([torch.float16, torch.float32])))
    lead = draw(st.lists(st.integers(0, 20), min_size=0, max_size=2))
    x = _cast(torch.randn(*lead, k), draw(st.sampled_from(FLOAT_DTYPES)))
    x, p, s, m = (_maybe_break(draw, t, "tensor", 0.08) for t in (x, p, s, m))
    b, gs = (_maybe_break(draw, v, "int", 0.08) for v in (bits, g))
    backend = _maybe_break(draw, draw(st.sampled_from(["auto", "core", "torch"])), "str", 0.05)
    activations = _maybe_break(draw, draw(st.sampled_from(["exact", "int8"])), "str", 0.05)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and draw(st.booleans()):
        x = x.detach().requires_grad_(True)
    y = _check(
        "qmatmul",
        lambda: ops.qmatmul(x, p, s, m, b, gs, backend=backend, activations=activations),
        [x, p, s, m, b, gs, backend, activations],
    )
    if y is not None and y.requires_grad:
        grad = torch.randn_like(y)
        if draw(st.integers(0, 4)) == 0:
            grad = _tensor_like(draw, grad)
        try:
            y.backward(grad)
        except RuntimeError as e:
            # torch refuses a gradient of another shape before any backward runs; a gradient
            # it accepts must go through ours.
            assert not isinstance(e, qalora.QALoRAError) and "Mismatch in shape" in str(e), e
        else:
            assert x.grad is not None and x.grad.shape == x.shape


@FUZZ
@given(st.data())
def test_fuzz_group_pool(data):
    draw = data.draw
    lead = draw(st.lists(st.integers(0, 12), min_size=0, max_size=2))
    k = draw(st.integers(1, 96))
    g = draw(st.one_of(st.integers(1, k), st.sampled_from(BAD_INTS)))
    x = _maybe_break(draw, _cast(torch.randn(*lead, k), draw(st.sampled_from(FLOAT_DTYPES))), "tensor")
    backend = _maybe_break(draw, draw(st.sampled_from(["auto", "core", "torch"])), "str", 0.1)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and draw(st.booleans()):
        x = x.detach().requires_grad_(True)
    y = _check("group_pool", lambda: ops.group_pool(x, g, backend=backend), [x, g, backend])
    if y is not None and y.requires_grad:
        y.sum().backward()
        assert x.grad.shape == x.shape
    # The backward's kernel directly, with group sizes that multiply its output size (huge
    # ones are beyond what the machine would allocate, never a size it would try to fill).
    grad = _maybe_break(draw, torch.randn(*lead, draw(st.integers(1, 8))), "tensor")
    gs = draw(st.one_of(st.integers(1, 64), st.sampled_from([0, -2, 2**42, 2**62, 2**63, 2**70])))
    _check("group_pool_backward", lambda: qalora._core.group_pool_backward(grad, gs, "auto"), [grad, gs, "auto"])


@FUZZ
@given(st.data())
def test_fuzz_merge_offsets(data):
    draw = data.draw
    n, L, r = draw(st.integers(1, 24)), draw(st.integers(1, 8)), draw(st.integers(1, 6))
    offsets = _cast(torch.randn(n, L), draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])))
    a, b = torch.randn(r, L), torch.randn(n, r)
    offsets, a, b = (_maybe_break(draw, t, "tensor", 0.12) for t in (offsets, a, b))
    scaling = _maybe_break(draw, draw(st.floats(-4, 4)), "float", 0.12)
    g = _maybe_break(draw, draw(st.sampled_from([1, 8, 32])), "int", 0.12)
    backend = _maybe_break(draw, draw(st.sampled_from(["auto", "core", "torch"])), "str", 0.1)
    _check(
        "merge_offsets",
        lambda: ops.merge_offsets(offsets, a, b, scaling, g, backend=backend),
        [offsets, a, b, scaling, g, backend],
    )


@FUZZ
@given(
    st.one_of(st.integers(-4, 600), st.sampled_from(BAD_INTS + BAD_OBJECTS)),
    st.one_of(st.sampled_from([2, 3, 4, 5, 8, 16]), st.sampled_from(BAD_INTS + BAD_OBJECTS)),
    st.one_of(st.integers(-4, 200), st.sampled_from(BAD_INTS + BAD_OBJECTS)),
)
def test_fuzz_check_layout(k, bits, g):
    _check("check_layout", lambda: ops.check_layout(k, bits, g))
