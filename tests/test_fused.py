"""The eager route (the per-step ops called without the dispatcher) and the fused QA-LoRA
layer (ops.qalora_linear, one autograd node per layer): the same results as the custom ops
and the composed layer, and both against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from qalora import QALoRALinear, ops
from qalora.layers import QuantLinear
from torch.overrides import TorchFunctionMode


class _Dispatcher(TorchFunctionMode):
    """A torch-function mode that changes nothing: while it is active the ops take the
    custom-op route (as under tracing), which the tests compare the eager route with."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def rng(seed):
    return np.random.default_rng(seed)


def tensor(shape, seed, scale=1.0):
    return torch.from_numpy((rng(seed).standard_normal(shape) * scale).astype(np.float32))


def layer(n, k, g, bits, seed, bias=False, dropout=0.0):
    base = QuantLinear.from_weight(tensor((n, k), seed, 0.05), tensor((n,), seed + 1) if bias else None, bits, g)
    lyr = QALoRALinear(base, rank=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        lyr.lora_A.weight.copy_(tensor(lyr.lora_A.weight.shape, seed + 2, 0.3))
        lyr.lora_B.weight.copy_(tensor(lyr.lora_B.weight.shape, seed + 3, 0.3))  # not zero: a live adapter
    return lyr


def run(lyr, x, grad_y, dispatcher=False):
    """Forward and backward; returns y, grad_x, grad_A, grad_B and the output's grad_fn name."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for p in lyr.parameters():
        p.grad = None
    if dispatcher:
        with _Dispatcher():
            y = lyr(x)
    else:
        y = lyr(x)
    node = fused_node(y) or type(y.grad_fn).__name__
    y.backward(grad_y.to(y.dtype))
    grads = [t.grad for t in (x, lyr.lora_A.weight, lyr.lora_B.weight)]
    return (y.detach(), *grads, node)


def fused_node(y):
    """'_QALoRALinearBackward' when it is in y's graph (under the bias's add, a reshape)."""
    todo = [y.grad_fn]
    while todo:
        fn = todo.pop()
        if type(fn).__name__ == "_QALoRALinearBackward":
            return type(fn).__name__
        todo += [f for f, _ in fn.next_functions if f is not None]
    return None


def reference_layer(lyr, x, grad_y):
    """float64 forward and gradients from numpy's unpacked codes (no qalora kernel)."""
    base = lyr.base_layer
    codes = ref.unpack(base.packed.numpy(), base.bits, base.in_features)
    w = ref.dequantize(codes, base.scales.double().numpy(), base.offsets.double().numpy(), base.group_size)
    g, s = base.group_size, lyr.scaling
    x64 = torch.from_numpy(x.double().numpy()).requires_grad_()
    a64 = lyr.lora_A.weight.detach().double().requires_grad_()
    b64 = lyr.lora_B.weight.detach().double().requires_grad_()
    pooled = x64.unflatten(-1, (-1, g)).mean(-1)
    y = x64 @ torch.from_numpy(w).T + s * (pooled @ a64.T) @ b64.T
    if base.bias is not None:
        y = y + base.bias.double()
    y.backward(grad_y.double())
    return y.detach(), x64.grad, a64.grad, b64.grad


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- the eager route


@pytest.mark.parametrize("m", [3, 40])
def test_eager_and_custom_op_routes_give_the_same_bits(m):
    g = 32
    p, s, o = ops.quantize(tensor((37, 96), 1, 0.05), 4, g)
    x0, gy = tensor((m, 96), 2), tensor((m, 37), 3)
    results = {}
    for dispatcher in (False, True):
        x = x0.clone().requires_grad_()
        if dispatcher:
            with _Dispatcher():
                y = ops.qmatmul(x, p, s, o, 4, g)
                pooled = ops.group_pool(x, g)
        else:
            y = ops.qmatmul(x, p, s, o, 4, g)
            pooled = ops.group_pool(x, g)
        names = (type(y.grad_fn).__name__, type(pooled.grad_fn).__name__)
        (y * gy).sum().add((pooled * pooled).sum()).backward()
        results[dispatcher] = (y.detach(), pooled.detach(), x.grad, names)
    eager, custom = results[False], results[True]
    assert eager[3][0].startswith("_Eager_qmatmul") and eager[3][1].startswith("_Eager_group_pool")
    assert not custom[3][0].startswith("_Eager") and not custom[3][1].startswith("_Eager")
    for a, b in zip(eager[:3], custom[:3]):
        assert torch.equal(a, b)


def test_eager_route_keeps_double_backward_of_the_ops():
    p, s, o = ops.quantize(tensor((24, 64), 4, 0.05), 4, 32)
    x = tensor((5, 64), 5).double().requires_grad_()
    (gx,) = torch.autograd.grad(ops.qmatmul(x, p, s, o, 4, 32).square().sum(), x, create_graph=True)
    assert type(gx.grad_fn).__name__.startswith("_Eager")
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    w = ops.dequantize(p, s, o, 4, 32, torch.float64)
    # d/dx sum(2 (x W^T) W) = 2 * 1 W^T W, row by row
    want = 2 * torch.ones(5, 64, dtype=torch.float64) @ w.T @ w
    assert rel(ggx, want) < 1e-9


def test_eager_route_refuses_bad_input_with_the_kernels_errors():
    p, s, o = ops.quantize(tensor((24, 64), 4, 0.05), 4, 32)
    with pytest.raises(qalora.ShapeError, match="x"):
        ops.qmatmul(tensor((5, 63), 1), p, s, o, 4, 32)
    with pytest.raises(qalora.GroupSizeError):
        ops.group_pool(tensor((5, 64), 1), 24)


# ---------------------------------------------------------------- the fused layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [3, 40])
def test_fused_layer_matches_float64(bits, rows):
    """Forward, grad_x, grad_A, grad_B of a live adapter (B != 0), odd out_features, 3-D
    input, a bias; at 3 rows (the fused small-batch kernel) and 40 (dequantized tiles)."""
    lyr = layer(37, 96, 32, bits, seed=bits * 10 + rows, bias=True)
    x = tensor((1, rows, 96), 7).requires_grad_()
    gy = tensor((1, rows, 37), 8)
    y, gx, ga, gb, node = run(lyr, x, gy)
    assert node == "_QALoRALinearBackward"
    want = reference_layer(lyr, x.detach(), gy)
    for got, exp in zip((y, gx, ga, gb), want):
        assert got.dtype == torch.float32
        assert rel(got, exp) < 2e-6


@pytest.mark.parametrize("rows", [3, 40])
def test_fused_layer_matches_the_composed_ops(rows):
    lyr = layer(48, 128, 64, 4, seed=rows, bias=True)
    x, gy = tensor((2, rows, 128), 1).requires_grad_(), tensor((2, rows, 48), 2)
    fused, composed = run(lyr, x, gy), run(lyr, x, gy, dispatcher=True)
    assert fused[4] == "_QALoRALinearBackward" and composed[4] != fused[4]
    for a, b in zip(fused[:4], composed[:4]):
        assert rel(a, b) < 1e-6


def test_fused_layer_under_bf16_autocast():
    """bf16 base GEMMs and adapter product (as nn.Linear under autocast); fp32 adapter grads."""
    lyr = layer(64, 128, 32, 4, seed=5)
    x, gy = tensor((40, 128), 1).requires_grad_(), tensor((40, 64), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(lyr, x, gy)
        composed = run(lyr, x, gy, dispatcher=True)
    assert fused[4] == "_QALoRALinearBackward"
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32
    assert fused[2].dtype == fused[3].dtype == torch.float32
    want = reference_layer(lyr, x.detach(), gy)
    for got, other, exp in zip(fused[:4], composed[:4], want):
        assert rel(got, exp) < 2e-2
        assert rel(got, other) < 2e-2


def test_fused_layer_float64_input():
    lyr = layer(24, 64, 32, 4, seed=6)
    x, gy = tensor((20, 64), 1).double().requires_grad_(), tensor((20, 24), 2)
    y, gx, ga, gb, node = run(lyr, x, gy)
    assert node == "_QALoRALinearBackward" and y.dtype == gx.dtype == torch.float64
    want = reference_layer(lyr, x.detach(), gy)
    # The adapter computes in its own float32, as on the composed route.
    for got, exp in zip((y, gx, ga, gb), want):
        assert rel(got, exp) < 1e-6


def test_fused_layer_gradients_only_where_needed():
    lyr = layer(32, 64, 32, 4, seed=7)
    gy = tensor((6, 32), 2)
    # Input without grad (a first layer): adapter grads only.
    _, gx, ga, gb, _ = run(lyr, tensor((6, 64), 1), gy)
    assert gx is None and ga is not None and gb is not None
    want = reference_layer(lyr, tensor((6, 64), 1), gy)
    assert rel(ga, want[2]) < 2e-6 and rel(gb, want[3]) < 2e-6
    # Frozen adapter: the input's grad only, still with the adapter's share.
    lyr.requires_grad_(False)
    _, gx, ga, gb, node = run(lyr, tensor((6, 64), 1).requires_grad_(), gy)
    assert node == "_QALoRALinearBackward" and ga is None and gb is None
    assert rel(gx, want[1]) < 2e-6


@pytest.mark.parametrize("rows", [3, 40])
def test_fused_layer_with_dropout_matches_the_composed_ops(rows):
    """The same random stream gives the same mask on both routes (nn.Dropout and the fused
    node both draw it with native dropout), so outputs and gradients agree; in eval mode
    the dropout is off on both."""
    lyr = layer(48, 128, 32, 4, seed=rows + 1, dropout=0.25)
    x, gy = tensor((rows, 128), 1).requires_grad_(), tensor((rows, 48), 2)
    torch.manual_seed(7)
    fused = run(lyr, x, gy)
    torch.manual_seed(7)
    composed = run(lyr, x, gy, dispatcher=True)
    assert fused[4] == "_QALoRALinearBackward" and composed[4] != fused[4]
    for a, b in zip(fused[:4], composed[:4]):
        assert rel(a, b) < 1e-6
    # The mask mattered: without dropout the results differ.
    assert rel(fused[0], run(layer(48, 128, 32, 4, seed=rows + 1), x, gy)[0]) > 1e-3
    lyr.eval()
    evaluated = run(lyr, x, gy)
    assert evaluated[4] == "_QALoRALinearBackward"
    want = reference_layer(lyr, x.detach(), gy)
    assert all(rel(got, exp) < 2e-6 for got, exp in zip(evaluated[:4], want))


def test_fused_dropout_gradient_against_float64():
    """grad_x through the mask: drawn by the fused node, then replayed in float64."""
    lyr = layer(24, 64, 32, 4, seed=11, dropout=0.5)
    x, gy = tensor((10, 64), 1).requires_grad_(), tensor((10, 24), 2)
    torch.manual_seed(3)
    y, gx, ga, gb, _ = run(lyr, x, gy)
    torch.manual_seed(3)
    _, mask = torch.native_dropout(x.detach(), 0.5, True)
    base, s = lyr.base_layer, lyr.scaling
    w = base.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    a64 = lyr.lora_A.weight.detach().double().requires_grad_()
    b64 = lyr.lora_B.weight.detach().double().requires_grad_()
    pooled = (x64 * mask.double() * 2.0).unflatten(-1, (-1, 32)).mean(-1)
    y64 = x64 @ w.T + s * (pooled @ a64.T) @ b64.T
    y64.backward(gy.double())
    for got, exp in [(y, y64.detach()), (gx, x64.grad), (ga, a64.grad), (gb, b64.grad)]:
        assert rel(got, exp) < 2e-6


def test_ops_qalora_linear_refuses_a_bad_dropout():
    lyr = layer(32, 64, 32, 4, seed=8)
    base = lyr.base_layer
    with pytest.raises(qalora.InvalidValueError, match="dropout"):
        ops.qalora_linear(
            tensor((3, 64), 1), *base.canonical(), 4, 32, lyr.lora_A.weight, lyr.lora_B.weight, 2.0, dropout=1.0
        )


def test_fused_route_has_no_double_backward():
    lyr = layer(32, 64, 32, 4, seed=8)
    x = tensor((6, 64), 1).requires_grad_()
    (gx,) = torch.autograd.grad(lyr(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice"):
        gx.sum().backward()


def test_qalora_linear_refuses_adapters_that_do_not_fit():
    lyr = layer(32, 64, 32, 4, seed=9)
    base, x = lyr.base_layer, tensor((3, 64), 1)
    args = (base.packed, base.scales, base.offsets, 4, 32)
    a, b = lyr.lora_A.weight, lyr.lora_B.weight
    for bad_a, bad_b in [(a.T, b), (a, b.T), (a[:, :1], b), (a, b[:5])]:
        with pytest.raises(qalora.ShapeError, match=r"expected \(rank, K/group_size\) = \(rank, 2\)"):
            ops.qalora_linear(x, *args, bad_a, bad_b, 2.0)
    for width in (63, 65):  # x's own error, not the adapters'
        with pytest.raises(qalora.ShapeError, match=r"^(?!lora_A).*\bx\b"):
            ops.qalora_linear(tensor((3, width), 1), *args, a, b, 2.0)


def test_calls_without_gradients_skip_the_autograd_node_and_give_the_same_bits():
    """Inference (no_grad, or no input that requires grad) calls the binding itself, without
    an autograd node: the same bits as the differentiable call, and no grad_fn."""
    lyr = layer(24, 64, 32, 4, 71, bias=True)
    x = tensor((3, 64), 72)
    base = lyr.base_layer
    weight = (base.packed, base.scales, base.offsets, base.bits, base.group_size)
    with_grad = ops.qmatmul(x.clone().requires_grad_(), *weight)
    assert with_grad.grad_fn is not None
    for context in (torch.no_grad, torch.enable_grad):
        with context():
            plain = ops.qmatmul(x, *weight)
            pooled = ops.group_pool(x, 32)
        assert plain.grad_fn is None and pooled.grad_fn is None
        assert torch.equal(plain, with_grad.detach())
        assert torch.equal(pooled, ops.group_pool(x.clone().requires_grad_(), 32).detach())
    want = lyr(x.clone().requires_grad_()).detach()
    with torch.no_grad():
        got = lyr(x)
    assert got.grad_fn is None
    assert torch.equal(got, want)
