"""The kernels as torch custom ops: opcheck, the dispatcher, torch.compile and torch.export."""

from __future__ import annotations

import pytest
import qalora
import torch
from qalora import QALoRAConfig, ops
from tiny_models import tiny_llama as _tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")


def _weight(n, k, bits, g, scale_dtype=torch.float16):
    return ops.quantize(torch.randn(n, k), bits, g, scale_dtype)


def _samples():
    """Arguments for each op: every bit width, both backends, the fused (M <= 16) and the
    tiled (M > 16) qmatmul routes, 3-D activations, int8 activations, every float dtype."""
    torch.manual_seed(0)
    grad = dict(requires_grad=True)
    cases = {name: [] for name in ops.CUSTOM_OPS}
    for bits, g in [(2, 16), (3, 32), (4, 32), (8, 16)]:
        p, s, m = _weight(12, 64, bits, g)
        codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.int32)
        cases["pack"].append((codes, bits, "auto"))
        cases["unpack"].append((p, bits, 64, "auto"))
        cases["quantize"].append((torch.randn(12, 64), bits, g, torch.float16, "auto"))
        cases["dequantize"].append((p, s, m, bits, g, torch.float32, "auto"))
        cases["qmatmul"].append((torch.randn(3, 64, **grad), p, s, m, bits, g, "auto", "exact"))
        cases["qmatmul_grad_input"].append((torch.randn(3, 12, **grad), p, s, m, bits, g, "auto"))
        cases["qmatmul_grad_scales"].append((torch.randn(3, 12), torch.randn(3, 64), p, s, m, bits, g, "auto"))
    p, s, m = _weight(12, 64, 4, 32, torch.float32)
    cases["pack"].append((torch.randint(0, 16, (5, 64), dtype=torch.uint8), 4, "torch"))
    cases["unpack"].append((p, 4, 64, "torch"))
    cases["quantize"].append((torch.randn(12, 64, dtype=torch.float64), 4, 32, torch.bfloat16, "torch"))
    cases["dequantize"].append((p, s, m, 4, 32, torch.bfloat16, "torch"))
    cases["qmatmul"] += [
        (torch.randn(2, 20, 64, **grad), p, s, m, 4, 32, "auto", "exact"),  # M = 40: tiles
        (torch.randn(2, 64, dtype=torch.bfloat16, **grad), p, s, m, 4, 32, "auto", "exact"),
        (torch.randn(1, 64, dtype=torch.float64, **grad), p, s, m, 4, 32, "torch", "exact"),
        (torch.randn(2, 64, **grad), p, s, m, 4, 32, "core", "int8"),
        (torch.randn(2, 64, **grad), p, s, m, 4, 32, "core", "bf16"),
        # trained group parameters: gradients for float32 scales and offsets too
        (torch.randn(3, 64, **grad), p, s.clone().requires_grad_(), m.clone().requires_grad_(), 4, 32, "auto", "exact"),
        (torch.randn(40, 64), p, s.clone().requires_grad_(), m, 4, 32, "auto", "exact"),
    ]
    cases["qmatmul_grad_scales"] += [
        (torch.randn(2, 20, 12), torch.randn(2, 20, 64), p, s, m, 4, 32, "auto"),  # M = 40: tiles
        (torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64), p, s, m, 4, 32, "torch"),
    ]
    for g in (1, 8, 64):
        cases["group_pool"].append((torch.randn(3, 64, **grad), g, "auto"))
        cases["group_pool_backward"].append((torch.randn(3, 64 // g, **grad), g, "auto"))
    cases["group_pool"].append((torch.randn(2, 3, 64, dtype=torch.float16, **grad), 16, "torch"))
    cases["group_pool_backward"].append((torch.randn(2, 3, 4, dtype=torch.bfloat16, **grad), 16, "torch"))
    for offsets_dtype, backend in [(torch.float16, "auto"), (torch.float32, "core"), (torch.bfloat16, "torch")]:
        offs = torch.randn(12, 2).to(offsets_dtype)
        cases["merge_offsets"].append((offs, torch.randn(3, 2), torch.randn(12, 3), 0.5, 32, backend))
        cases["merge_offsets_"].append((offs.clone(), torch.randn(3, 2), torch.randn(12, 3), 0.5, 32, backend))
        cases["merge_offsets_out"].append(
            (offs, torch.randn(3, 2), torch.randn(12, 3), 0.5, 32, backend, torch.empty_like(offs))
        )
    # Factored group parameters (GGUF K-quants): integers and float16 factors, frozen.
    for bits, g, ints in [(4, 32, torch.uint8), (6, 16, torch.int8)]:
        pf = _weight(12, 256, bits, g)[0]
        groups = 256 // g
        si = torch.randint(1, 60, (12, groups)).to(ints)
        mi = torch.randint(0, 60, (12, groups)).to(torch.uint8)
        sf = (torch.rand(12, 2) * 1e-2 + 1e-3).half()
        factored = (pf, si, mi, bits, g)
        cases["dequantize"].append((*factored, torch.float32, "auto", sf, -sf))
        cases["qmatmul"].append((torch.randn(3, 256, **grad), *factored, "auto", "exact", sf, -sf))
        cases["qmatmul"].append((torch.randn(20, 256, **grad), *factored, "auto", "exact", sf, -sf))
        cases["qmatmul_grad_input"].append((torch.randn(3, 12, **grad), *factored, "auto", sf, -sf))
    p, s, m = _weight(16, 64, 4, 32)
    tiled = qalora._core.repack_tiles(p, s, m, 4, 32)
    for x in (torch.randn(3, 64), torch.randn(2, 1, 64, dtype=torch.bfloat16)):
        cases["qmatmul_tiled"].append((x, tiled, 16, 32))
    return cases


SAMPLES = _samples()


@pytest.mark.parametrize("name", sorted(ops.CUSTOM_OPS))
def test_each_op_passes_opcheck(name):
    # opcheck runs the op for real and under fake tensors (shapes, strides, dtypes must
    # agree), checks the schema (no aliasing, no hidden mutation), the autograd registration,
    # and traces it through AOTAutograd with dynamic shapes.
    assert SAMPLES[name], name
    for args in SAMPLES[name]:
        torch.library.opcheck(ops.CUSTOM_OPS[name], args)
    op = ops.CUSTOM_OPS[name]
    assert getattr(torch.ops.qalora, name).default is getattr(op, "_opoverload", op)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_public_functions_go_through_the_custom_ops():
    p, s, m = _weight(8, 64, 4, 32)
    x = torch.randn(2, 64, requires_grad=True)
    with _OpLog() as log:
        ops.pack(torch.zeros(2, 8, dtype=torch.uint8), 4)
        ops.unpack(p, 4, 64)
        ops.quantize(torch.randn(4, 64), 4, 32)
        ops.dequantize(p, s, m, 4, 32)
        y = ops.qmatmul(x, p, s, m, 4, 32)
        z = ops.group_pool(x, 32)
        ops.merge_offsets(m, torch.randn(2, 2), torch.randn(8, 2), 1.0, 32)
        ops.merge_offsets(m.clone(), torch.randn(2, 2), torch.randn(8, 2), 1.0, 32, out=torch.empty_like(m))
        m2 = m.clone()
        ops.merge_offsets(m2, torch.randn(2, 2), torch.randn(8, 2), 1.0, 32, out=m2)
        ops.qmatmul_tiled(x.detach(), qalora._core.repack_tiles(p, s, m, 4, 32), 8, 32)
        trained_scales = s.float().requires_grad_()  # a trained group parameter's gradient
        y2 = ops.qmatmul(x, p, trained_scales, m, 4, 32)
        (y.sum() + z.sum() + y2.sum()).backward()
    names = {op.split(".")[1] for op in log.ops if op.startswith("qalora.")}
    assert names == set(ops.CUSTOM_OPS), names


def test_double_backward_through_qmatmul_and_group_pool():
    p, s, m = _weight(8, 64, 4, 32)
    w = ops.dequantize(p, s, m, 4, 32, torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: ops.qmatmul(t, p, s, m, 4, 32), (x,))
    torch.autograd.gradgradcheck(lambda t: ops.group_pool(t, 16), (x,))
    (gx,) = torch.autograd.grad(ops.qmatmul(x, p, s, m, 4, 32).square().sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(hx, 2 * (torch.ones(3, 64, dtype=torch.float64) @ w.T @ w))


def test_weight_ops_results_never_require_grad():
    w = torch.randn(8, 64, requires_grad=True)
    p, s, m = ops.quantize(w, 4, 32)
    a, b = torch.randn(2, 2, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    for t in (p, s, m, ops.dequantize(p, s, m, 4, 32), ops.merge_offsets(m, a, b, 1.0, 32)):
        assert not t.requires_grad


def test_bad_arguments_the_schema_cannot_carry_keep_their_typed_errors():
    p, s, m = _weight(8, 64, 4, 32)
    x = torch.randn(2, 64)
    cases = [
        (lambda: ops.qmatmul(x, p, s, m, 4.0, 32), qalora.DTypeError, "bits: expected an int, got float 4.0"),
        (lambda: ops.qmatmul(x, p, s, m, True, 32), qalora.DTypeError, "bits: expected an int, got bool"),
        (lambda: ops.qmatmul(x, p, s, m, 4, 2**70), qalora.GroupSizeError, f"group_size: got {2**70}"),
        (lambda: ops.qmatmul(x.numpy(), p, s, m, 4, 32), qalora.DTypeError, "x: expected a torch.Tensor"),
        (lambda: ops.unpack(p, 4, 2**64), qalora.ShapeError, "too large"),
        (lambda: ops.group_pool(x, "32"), qalora.DTypeError, "group_size: expected an int, got str"),
        (lambda: ops.quantize(x, 4, 32, "float16"), qalora.DTypeError, "scale_dtype: expected a torch.dtype"),
        (lambda: ops.merge_offsets(m, x[:, :2], x, "1", 32), qalora.DTypeError, "scaling: expected a float"),
        (lambda: ops.merge_offsets(m, x, x, 2**1100, 32), qalora.DTypeError, "scaling: expected a float"),
    ]
    for call, error, fragment in cases:
        with pytest.raises(error, match=fragment):
            call()
    # Index-like integers and float-like scalings are carried as the kernel reads them.
    import numpy as np

    y = ops.qmatmul(x, p, s, m, np.int64(4), np.int32(32))
    torch.testing.assert_close(y, ops.qmatmul(x, p, s, m, 4, 32))
    a, b = torch.randn(3, 2), torch.randn(8, 3)
    torch.testing.assert_close(ops.merge_offsets(m, a, b, np.float32(0.5), 32), ops.merge_offsets(m, a, b, 0.5, 32))


# ---------------------------------------------------------------- models under torch.compile


def tiny_llama(seed=0):
    return _tiny_llama(seed, layers=1)


def wrapped_llama():
    model = qalora.wrap(tiny_llama(), QALoRAConfig(bits=4, group_size=32, rank=4, alpha=8))
    with torch.no_grad():  # a trained-looking adapter, so that it changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_wrapped_model_compiles_without_graph_breaks_and_matches_eager():
    model = wrapped_llama().train()
    ids = torch.randint(0, 96, (2, 12))
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()

    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    grads_c = _adapter_grads(model)
    model.zero_grad()
    loss_e = model(input_ids=ids, labels=ids).loss
    loss_e.backward()
    grads_e = _adapter_grads(model)
    # Same kernels either way; only the surrounding float32 ops may be fused differently.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 21  # lora_A, lora_B, delta_offsets x 7 layers
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_merged_model_compiles_and_exports_and_matches_eager():
    model = qalora.merge(wrapped_llama()).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    exported = torch.export.export(Logits(model), (ids,))
    calls = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert calls.count("qalora.qmatmul.default") == 7, calls
    other = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(input_ids=other).logits, rtol=1e-5, atol=1e-5)


def test_tiled_int8_model_compiles_without_graph_breaks_and_matches_eager():
    model = qalora.merge(wrapped_llama()).eval()
    assert qalora.set_activations(model, "int8") > 0
    assert any(getattr(m, "is_tiled", False) for m in model.modules())
    ids = torch.randint(0, 96, (1, 6))  # 6 rows: the tiled route
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
