"""One training step (forward + backward) of an MLP block 576 -> 1536 -> 576 (SmolLM2-135M's
sizes), batch 4 x 256 tokens, on CPU:

* qalora: both linears frozen 4-bit, g = 32 (qalora.ops.qmatmul) plus a QA-LoRA adapter each
  (group_pool -> A (r x K/g) -> B (N x r)), the way QALoRALinear computes it;
* dense: both linears frozen fp32 (F.linear) plus a standard LoRA adapter (A: r x K).

Only the adapters (and the input, as inside a deeper model) take gradients.

    python benches/bench_train_step.py [--quick]
"""

from __future__ import annotations

import argparse

import qalora.ops as ops
import torch
import torch.nn.functional as F
from _common import machine, median_time

D, H, TOKENS, RANK, ALPHA, G, BITS = 576, 1536, 4 * 256, 16, 32, 32, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 7 if args.quick else 21
    print(f"machine: {machine()}")
    gen = torch.Generator().manual_seed(0)
    c = ALPHA / RANK
    w1 = torch.randn(H, D, generator=gen) * D**-0.5
    w2 = torch.randn(D, H, generator=gen) * H**-0.5
    q1 = ops.quantize(w1, BITS, G)
    q2 = ops.quantize(w2, BITS, G)

    def adapter(k: int, n: int, pooled: bool):
        a = (torch.randn(RANK, k // G if pooled else k, generator=gen) * 0.01).requires_grad_()
        b = (torch.randn(n, RANK, generator=gen) * 0.01).requires_grad_()
        return a, b

    qa1, qb1 = adapter(D, H, True)
    qa2, qb2 = adapter(H, D, True)
    la1, lb1 = adapter(D, H, False)
    la2, lb2 = adapter(H, D, False)
    x = torch.randn(4, 256, D, generator=gen)

    def qalora_step(i):
        xi = x.clone().requires_grad_()
        h = ops.qmatmul(xi, *q1, BITS, G) + c * F.linear(F.linear(ops.group_pool(xi, G), qa1), qb1)
        h = F.silu(h)
        y = ops.qmatmul(h, *q2, BITS, G) + c * F.linear(F.linear(ops.group_pool(h, G), qa2), qb2)
        y.square().mean().backward()

    def dense_step(i):
        xi = x.clone().requires_grad_()
        h = F.linear(xi, w1) + c * F.linear(F.linear(xi, la1), lb1)
        h = F.silu(h)
        y = F.linear(h, w2) + c * F.linear(F.linear(h, la2), lb2)
        y.square().mean().backward()

    # Alternate the two so machine noise hits both alike; report each round's ratio.
    ratios = []
    for _ in range(3):
        tq = median_time(qalora_step, reps)
        td = median_time(dense_step, reps)
        ratios.append(tq / td)
        print(
            f"qalora 4-bit + QA-LoRA: {tq * 1e3:7.2f} ms   dense fp32 + LoRA: {td * 1e3:7.2f} ms   ratio {tq / td:.2f}x",
            flush=True,
        )
    print(f"median ratio (qalora / dense): {sorted(ratios)[1]:.2f}x")


if __name__ == "__main__":
    main()
