"""The boundary of the native module: how arguments are parsed, how errors cross it, and the
sizes it refuses before touching memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import _core, errors, ops

PYTHON_DIR = os.path.dirname(os.path.dirname(qalora.__file__))


def _q():
    return ops.quantize(torch.randn(4, 64), 4, 32)


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (for what could abort one, or needs a fresh state)."""
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


# ---------------------------------------------------------------- errors cross by type


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: _core.unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 8), errors.ShapeError),
        (lambda: _core.pack(torch.zeros(2, 8), 4), errors.DTypeError),
        (lambda: _core.dequantize(*map(_meta, _q()), 4, 32, torch.float32, "core"), errors.DeviceError),
        (lambda: _core.pack(torch.zeros(2, 8, dtype=torch.uint8), 7), errors.UnsupportedBitsError),
        (lambda: _core.quantize(torch.randn(2, 64), 4, 48), errors.GroupSizeError),
        (lambda: _core.pack(torch.full((2, 8), 16), 4), errors.CodeRangeError),
        (lambda: _core.pack(torch.zeros(2, 8, dtype=torch.uint8), 4, "gpu"), errors.InvalidValueError),
        # A libtorch failure inside a kernel (no nonzero() on meta tensors) is caught, typed.
        (lambda: _core.pack(torch.zeros(2, 8, dtype=torch.uint8, device="meta"), 4), errors.InternalError),
    ],
)
def test_each_error_kind_is_raised_as_its_own_class(call, error):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error


def test_error_classes_are_registered_once_and_kept():
    classes = dict(
        shape=errors.ShapeError,
        dtype=errors.DTypeError,
        device=errors.DeviceError,
        bits=errors.UnsupportedBitsError,
        group_size=errors.GroupSizeError,
        code_range=errors.CodeRangeError,
        value=errors.InvalidValueError,
        internal=errors.InternalError,
    )
    _core.register_errors(**classes)  # the same classes again: a no-op
    with pytest.raises(RuntimeError, match="already registered"):
        _core.register_errors(**dict(classes, shape=ValueError))
    with pytest.raises(TypeError, match="not an Exception class"):
        _core.register_errors(**dict(classes, value=int))
    with pytest.raises(TypeError):
        _core.register_errors(**dict(classes, value="InvalidValueError"))
    with pytest.raises(errors.ShapeError):  # still the registered classes
        _core.unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 8)


def test_without_registered_classes_errors_are_loud_not_value_errors():
    # The extension loaded on its own, without qalora.errors: nothing is registered.
    r = _run_python(
        f"""
        import glob, importlib.machinery, importlib.util, os
        import torch
        path = glob.glob(os.path.join({PYTHON_DIR!r}, "qalora", "_core*.so"))[0]
        loader = importlib.machinery.ExtensionFileLoader("_core", path)
        core = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_core", path, loader=loader))
        loader.exec_module(core)
        try:
            core.check_layout(64, 7, 32)
        except Exception as e:
            print(type(e).__name__, isinstance(e, ValueError), e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RuntimeError False"), r.stdout
    assert "no exception classes are registered" in r.stdout and "bits: got 7" in r.stdout


# ---------------------------------------------------------------- options and numbers


def _with_backend(backend):
    p, s, m = _q()
    x, codes = torch.randn(2, 64), torch.zeros(2, 8, dtype=torch.uint8)
    return [
        lambda: ops.pack(codes, 4) if backend is None else _core.pack(codes, 4, backend),
        lambda: _core.unpack(p, 4, 64, backend),
        lambda: ops.quantize(torch.randn(4, 64), 4, 32, backend=backend),
        lambda: ops.dequantize(p, s, m, 4, 32, backend=backend),
        lambda: ops.qmatmul(x, p, s, m, 4, 32, backend=backend),
        lambda: _core.qmatmul_grad_input(torch.randn(2, 4), p, s, m, 4, 32, backend),
        lambda: ops.group_pool(x, 32, backend=backend),
        lambda: _core.group_pool_backward(torch.randn(2, 2), 32, backend),
        lambda: ops.merge_offsets(m, torch.randn(3, 2), torch.randn(4, 3), 1.0, 32, backend=backend),
    ]


@pytest.mark.parametrize("bad", [None, 3, b"core", ["auto"]])
def test_non_string_backend_is_a_dtype_error_naming_it_everywhere(bad):
    for call in _with_backend(bad)[1:]:
        with pytest.raises(qalora.DTypeError, match=r"^backend: expected a str, got "):
            call()


def test_unknown_backend_lists_the_allowed_values_everywhere():
    for call in _with_backend("gpu")[1:]:
        with pytest.raises(qalora.InvalidValueError, match=r"^backend: got 'gpu', allowed: 'auto', 'core', 'torch'$"):
            call()


def test_activations_option():
    p, s, m = _q()
    with pytest.raises(qalora.InvalidValueError, match=r"^activations: got 'fp8', allowed: 'exact', 'int8', 'bf16'$"):
        _core.qmatmul(torch.randn(2, 64), p, s, m, 4, 32, "auto", "fp8")
    with pytest.raises(qalora.DTypeError, match=r"^activations: expected a str, got int 8$"):
        ops.qmatmul(torch.randn(2, 64), p, s, m, 4, 32, activations=8)


def test_dtype_options_take_torch_dtypes():
    w = torch.randn(4, 64)
    for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ops.quantize(w, 4, 32, scale_dtype)[1].dtype == scale_dtype
    with pytest.raises(
        qalora.DTypeError, match=r"^scale_dtype: expected a torch.dtype such as torch.float16, got str 'float16'$"
    ):
        _core.quantize(w, 4, 32, "float16")
    with pytest.raises(
        qalora.DTypeError,
        match=r"^scale_dtype: got torch.float64, allowed: torch.float16, torch.bfloat16, torch.float32$",
    ):
        ops.quantize(w, 4, 32, torch.float64)
    with pytest.raises(qalora.DTypeError, match=r"^dtype: got torch.int32, allowed: .*torch.float64$"):
        ops.dequantize(*_q(), 4, 32, torch.int32)
    assert ops.dequantize(*_q(), 4, 32, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("bad", [4.0, True, "4", None])
def test_non_int_numbers_are_dtype_errors_naming_the_argument(bad):
    p, s, m = _q()
    calls = {
        "bits": [
            lambda: ops.pack(torch.zeros(2, 8, dtype=torch.uint8), bad),
            lambda: ops.qmatmul(torch.randn(2, 64), p, s, m, bad, 32),
        ],
        "group_size": [
            lambda: ops.quantize(torch.randn(4, 64), 4, bad),
            lambda: ops.group_pool(torch.randn(2, 64), bad),
        ],
        "k": [lambda: ops.unpack(p, 4, bad)],
        "in_features": [lambda: ops.check_layout(bad, 4, 32)],
    }
    for name, fns in calls.items():
        for call in fns:
            with pytest.raises(qalora.DTypeError, match=rf"^{name}: expected an int, got {type(bad).__name__} "):
                call()
    with pytest.raises(qalora.DTypeError, match=r"^scaling: expected a float, got "):
        ops.merge_offsets(m, torch.randn(3, 2), torch.randn(4, 3), "1.0" if bad is None else None, 32)


def test_numpy_integers_are_ints():
    p, s, m = _q()
    x = torch.randn(3, 64)
    assert torch.equal(ops.qmatmul(x, p, s, m, np.int64(4), np.int32(32)), ops.qmatmul(x, p, s, m, 4, 32))
    np.testing.assert_allclose(
        ops.merge_offsets(m, torch.ones(1, 2), torch.ones(4, 1), np.float32(2.0), np.int64(32)).float().numpy(),
        ops.merge_offsets(m, torch.ones(1, 2), torch.ones(4, 1), 2.0, 32).float().numpy(),
    )


@pytest.mark.parametrize("bits", [-1, 0, 1, 7, 16, 2**32 + 4, -(2**63), 2**64 + 4, 2**70])
def test_bits_are_reported_as_given(bits):
    p, s, m = _q()
    for call in (
        lambda: ops.quantize(torch.randn(4, 64), bits, 32),
        lambda: ops.dequantize(p, s, m, bits, 32),
        lambda: ops.qmatmul(torch.randn(2, 64), p, s, m, bits, 32),
        lambda: ops.pack(torch.zeros(2, 8, dtype=torch.uint8), bits),
        lambda: ops.unpack(p, bits, 64),
        lambda: ops.check_layout(64, bits, 32),
    ):
        with pytest.raises(
            qalora.UnsupportedBitsError, match=rf"^bits: got {bits}, allowed values are 2, 3, 4, 5, 6 and 8$"
        ):
            call()


@pytest.mark.parametrize("g", [-3, 0, 2**40, 2**63 - 1, 2**70])
def test_group_sizes_are_reported_as_given(g):
    p, s, m = _q()
    for call in (
        lambda: ops.quantize(torch.randn(4, 64), 4, g),
        lambda: ops.dequantize(p, s, m, 4, g),
        lambda: ops.group_pool(torch.randn(2, 64), g),
        lambda: ops.check_layout(64, 4, g),
    ):
        with pytest.raises(qalora.GroupSizeError, match=rf"^group_size: got {g}, it must divide in_features K = 64 "):
            call()
    if g < 1 or g > 2**63 - 1:
        with pytest.raises(qalora.GroupSizeError, match=rf"^group_size: got {g}, it must be a positive integer$"):
            ops.merge_offsets(m, torch.randn(3, 2), torch.randn(4, 3), 1.0, g)


# ---------------------------------------------------------------- check_layout


def test_check_layout_accepts_what_the_ops_accept():
    for k, bits, g in [
        (576, 4, 32),
        (576, 4, 64),
        (576, 3, 64),
        (64, 2, 64),
        (6, 4, 3),
        (8, 8, 1),
        (576, 5, 32),
        (576, 6, 16),
        (12, 6, 4),
    ]:
        assert ops.check_layout(k, bits, g) is None
        ops.quantize(torch.randn(2, k), bits, g)


@pytest.mark.parametrize(
    "k,bits,g",
    [
        (64, 7, 32),
        (64, 4, 48),
        (576, 4, 128),
        (64, 3, 4),
        (576, 3, 12),
        (12, 3, 4),
        (6, 2, 3),
        (64, 4, 0),
        (63, 4, 9),
        (64, 5, 4),
        (576, 6, 6),
        (12, 5, 4),
        (6, 6, 3),
    ],
)
def test_check_layout_raises_what_quantize_raises(k, bits, g):
    with pytest.raises(qalora.QALoRAError) as layout_err:
        ops.check_layout(k, bits, g)
    with pytest.raises(qalora.QALoRAError) as op_err:
        ops.quantize(torch.randn(2, k), bits, g)
    assert type(layout_err.value) is type(op_err.value)
    assert str(layout_err.value) == str(op_err.value)


def test_group_size_message_names_k_and_valid_neighbours():
    with pytest.raises(qalora.GroupSizeError) as info:
        ops.check_layout(576, 4, 128)
    assert str(info.value) == (
        "group_size: got 128, it must divide in_features K = 576 (positive divisors near 128: 64, 72, 96, 144)"
    )
    with pytest.raises(qalora.GroupSizeError) as info:
        ops.check_layout(576, 3, 12)
    assert "be a multiple of 8 at 3 bits" in str(info.value) and "multiples of 8 near 12: 8, 16, 24, 32" in str(
        info.value
    )
    with pytest.raises(qalora.ShapeError, match="does not pack into whole bytes at 2 bits: K must be a multiple of 4"):
        ops.check_layout(6, 2, 3)
    with pytest.raises(qalora.ShapeError, match="in_features K: got 0, it must be at least 1"):
        ops.check_layout(0, 4, 1)


@pytest.mark.parametrize("k", [2**40 + 7, 2**40 + 15, 2**62 + 3, 2**63 - 1])
def test_group_size_message_is_instant_for_huge_k(k):
    # The neighbour search is bounded: an O(K) one takes hours at these K (and did, 40 s+
    # at 2^40), so this test would not finish.
    for g in (128, 0, 1000):
        with pytest.raises(qalora.GroupSizeError, match=rf"got {g}, it must divide in_features K = {k} "):
            ops.check_layout(k, 4, g)


# ---------------------------------------------------------------- numpy takes the tensor path


NUMPY_INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _outcome(call):
    try:
        result = call()
    except qalora.QALoRAError as e:
        return type(e), str(e)
    return "ok", np.asarray(result)


@pytest.mark.parametrize("dtype", NUMPY_INT_DTYPES)
@pytest.mark.parametrize("bad", [None, -1, 16, 255, 256, 2**32, 2**63, 2**64 - 1])
def test_numpy_codes_pack_like_tensors(dtype, bad):
    codes = np.random.default_rng(3).integers(0, 16, size=(300, 256)).astype(dtype)  # above the parallel threshold
    if bad is not None:
        info = np.iinfo(dtype)
        if not info.min <= bad <= info.max:
            return
        codes[123, 45] = bad
        codes[200, 0] = bad
    from_numpy = _outcome(lambda: ops.pack(codes, 4))
    from_tensor = _outcome(lambda: ops.pack(torch.from_numpy(codes), 4).numpy())
    assert from_numpy[0] == from_tensor[0]
    if bad is None or 0 <= bad <= 15:
        assert from_numpy[0] == "ok"
        np.testing.assert_array_equal(from_numpy[1], from_tensor[1])
        np.testing.assert_array_equal(from_numpy[1], ref.pack(codes.astype(np.int64), 4))
        np.testing.assert_array_equal(ops.unpack(from_numpy[1], 4, 256), codes)
    else:
        # A cast to uint8 would wrap -1, 256 and 2^32 into range: the value given is named.
        assert from_numpy == (
            qalora.CodeRangeError,
            f"codes: value {bad} at row 123, column 45 is outside [0, 15] allowed at 4 bits",
        )
        assert from_numpy == from_tensor


def test_numpy_layouts_torch_cannot_share_are_copied():
    codes = np.random.default_rng(4).integers(0, 8, size=(6, 16)).astype(np.int32)
    want = ops.pack(codes, 3)
    flipped = codes[::-1]
    assert np.array_equal(ops.pack(flipped, 3), ops.pack(np.ascontiguousarray(flipped), 3))
    assert np.array_equal(ops.pack(codes.astype(">i4"), 3), want)
    frozen = codes.copy()
    frozen.flags.writeable = False
    assert np.array_equal(ops.pack(frozen, 3), want)
    assert np.array_equal(ops.pack(np.asfortranarray(codes), 3), want)


@pytest.mark.parametrize(
    "array,error,fragment",
    [
        (np.zeros((2, 8)), qalora.DTypeError, "codes: got dtype torch.float64"),
        (np.zeros((2, 8), bool), qalora.DTypeError, "codes: got dtype torch.bool"),
        (np.array([["a"] * 8]), qalora.DTypeError, "codes: got a numpy array of dtype <U1"),
        (np.zeros(8, np.uint8), qalora.ShapeError, "expected a 2-D tensor"),
        (np.zeros((0, 8), np.uint8), qalora.ShapeError, "empty"),
    ],
)
def test_numpy_errors_are_the_tensor_errors(array, error, fragment):
    with pytest.raises(error, match=fragment):
        ops.pack(array, 4)


# ---------------------------------------------------------------- sizes that overflow


def test_unpack_with_a_k_whose_bit_count_wraps_is_a_shape_error():
    # k * bits = 2^64 + 8 wrapped to 8, passed the check as 1 byte per row, and the
    # (2, 2^61 + 1) allocation aborted the interpreter: run it where an abort is contained.
    r = _run_python(
        """
        import numpy as np, torch, qalora
        try:
            qalora.ops.unpack(np.zeros((2, 1), np.uint8), 8, 2**61 + 1)
        except qalora.QALoRAError as e:
            print(type(e).__name__, e)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ShapeError in_features K = 2305843009213693953 is too large"), r.stdout


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize(
    "bits,k", [(8, 2**61 + 1), (4, 2**62 + 2), (2, 2**63 + 4), (3, 2**63 - 8), (8, 2**64), (8, 2**70)]
)
def test_unpack_refuses_k_beyond_the_address_space(backend, bits, k):
    with pytest.raises(qalora.ShapeError, match=f"in_features K.*{k}.*too large"):
        _core.unpack(torch.zeros(2, 1, dtype=torch.uint8), bits, k, backend)


def test_qmatmul_refuses_an_expanded_x_whose_k_wraps():
    # x = zeros expanded to K = 2^61 + 1 (no memory behind it): K * 8 bits wraps to one byte.
    x = torch.zeros(1, 1).expand(1, 2**61 + 1)
    p, s, m = (
        torch.zeros(4, 1, dtype=torch.uint8),
        torch.zeros(4, 1, dtype=torch.float16),
        torch.zeros(4, 1, dtype=torch.float16),
    )
    for backend in ("core", "torch"):
        with pytest.raises(qalora.ShapeError, match="does not match the quantized weight"):
            ops.qmatmul(x, p, s, m, 8, 2**61 + 1, backend=backend)


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_group_pool_backward_sizes(backend):
    grad = torch.randn(2, 3)
    with pytest.raises(qalora.ShapeError, match="too many to address"):
        _core.group_pool_backward(grad, 2**62, backend)  # 3 * 2^62 overflows
    with pytest.raises(qalora.ShapeError, match="could not allocate"):
        _core.group_pool_backward(grad, 2**40, backend)  # 26 TB
    with pytest.raises(qalora.GroupSizeError, match="positive integer"):
        _core.group_pool_backward(grad, 0, backend)
    back = _core.group_pool_backward(grad, 4, backend)
    np.testing.assert_allclose(back.numpy(), np.repeat(grad.numpy() / 4, 4, axis=1), rtol=1e-6)


def test_expanded_inputs_too_large_to_copy_are_shape_errors():
    huge_codes = torch.zeros(1, 1, dtype=torch.int64).expand(2**31, 2**31)
    with pytest.raises(qalora.ShapeError, match="could not allocate"):
        ops.pack(huge_codes, 4)
    p, s, m = _q()
    with pytest.raises(qalora.ShapeError, match="could not allocate"):
        ops.qmatmul(torch.zeros(1, 64).expand(2**40, 64), p, s, m, 4, 32, backend="core")


def test_unsigned_tensor_codes_are_accepted():
    codes = torch.randint(0, 16, (3, 32))
    want = ops.pack(codes, 4)
    for dt in (torch.uint16, torch.uint32, torch.uint64):
        assert torch.equal(ops.pack(codes.to(dt), 4), want)
        assert torch.equal(_core.pack(codes.to(dt), 4, "torch"), want)
    big = torch.from_numpy(np.full((2, 8), 2**64 - 1, np.uint64))
    for backend in ("core", "torch"):
        with pytest.raises(qalora.CodeRangeError, match="value 18446744073709551615 at row 0, column 0"):
            _core.pack(big, 4, backend)
    with pytest.raises(qalora.DTypeError, match=r"weight: got dtype torch\.uint16"):
        ops.quantize(torch.ones(2, 32, dtype=torch.uint16), 4, 32)


def test_stub_and_marker_ship_beside_the_module():
    here = os.path.dirname(qalora.__file__)
    assert os.path.isfile(os.path.join(here, "_core.pyi")) and os.path.isfile(os.path.join(here, "py.typed"))
    # The small-batch threshold is exported (qalora.layers.SMALL_BATCH_ROWS reads it); pack_array is gone.
    assert _core.FUSED_MAX_ROWS == 16 and not hasattr(_core, "pack_array")
