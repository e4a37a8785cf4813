"""K-quant layers held at file size: the factored layout (GGUF's K-quant group parameters as
the file stores them, QuantLinear.factor_) against the Q4_1 layout (float16 scale and offset
per group of 32) and against the float32 group parameters K-quant imports used to hold, in
one run, on Llama-3-8B's layer shapes.

Per layout: the bytes a layer holds, and the median time (the layouts taking turns, round by
round) of
- a generation step, M = 1 (the fused kernel), over rotating weight copies that together
  exceed twice the last-level cache, so weights come from DRAM as in a real model;
- a training step of the frozen base layer, M = 256 rows: forward (dequantized tiles through
  torch's GEMM) and the input's gradient.
The ratio column divides by the Q4_1 layout's time in the same run (target for the K-quant
layers: at most 1.2).

    python benches/bench_kquant.py            # (4096, 4096), (14336, 4096), (4096, 14336)
    python benches/bench_kquant.py --quick    # (4096, 4096) only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import l3_bytes, machine
from qalora import QuantLinear, ops


def q4_1(n: int, k: int, gen: torch.Generator) -> QuantLinear:
    layer = QuantLinear(k, n, 4, 32, bias=False)
    layer.packed.copy_(torch.randint(0, 256, layer.packed.shape, generator=gen, dtype=torch.uint8))
    layer.scales.copy_((torch.rand(n, k // 32, generator=gen) * 1e-2 + 1e-3).half())
    layer.offsets.copy_((torch.rand(n, k // 32, generator=gen) * -8e-2).half())
    return layer


def k_quant(n: int, k: int, bits: int, gen: torch.Generator) -> QuantLinear:
    """A Q4_K-shaped (4 bits, groups of 32, 6-bit scales and mins, two float16 factors per 256
    weights) or Q6_K-shaped (6 bits, groups of 16, int8 scales, implied minimum) layer."""
    g = 32 if bits == 4 else 16
    groups = k // g
    layer = QuantLinear(k, n, bits, g, bias=False, scale_dtype=torch.float32)
    layer.packed.copy_(torch.randint(0, 256, layer.packed.shape, generator=gen, dtype=torch.uint8))
    factors = (torch.rand(n, k // 256, generator=gen) * 1e-3 + 1e-4).half()
    if bits == 4:
        sc = torch.randint(1, 64, (n, groups), generator=gen, dtype=torch.uint8)
        mn = torch.randint(0, 64, (n, groups), generator=gen, dtype=torch.uint8)
        layer.factor_(sc, factors, mn, -(factors * 0.5))
    else:
        sc = torch.randint(-128, 128, (n, groups), generator=gen, dtype=torch.int8)
        layer.factor_(sc, factors, None, factors * -32)
    return layer


def held_bytes(layer: QuantLinear) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers())


def layouts(n: int, k: int, gen: torch.Generator) -> dict[str, QuantLinear]:
    out = {"Q4_1 (f16 params)": q4_1(n, k, gen)}
    for bits, name in ((4, "Q4_K"), (6, "Q6_K")):
        factored = k_quant(n, k, bits, gen)
        plain = copy.deepcopy(factored)
        plain.unfactor_()
        out[f"{name} factored"] = factored
        out[f"{name} f32 params"] = plain
    return out


def _m1_call(layer: QuantLinear):
    """A generation-step call of the layer over rotating copies (weights from DRAM)."""
    copies = max(1, -(-2 * l3_bytes() // held_bytes(layer)))
    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
    x = torch.randn(1, layer.in_features)
    state = {"i": 0}

    def call():
        state["i"] += 1
        with torch.no_grad():
            layers[state["i"] % len(layers)](x)

    for _ in range(len(layers)):
        call()
    return call


def _train_call(layer: QuantLinear, rows: int = 256):
    x = torch.randn(rows, layer.in_features, requires_grad=True)
    grad = torch.randn(rows, layer.out_features)

    def call():
        layer(x).backward(grad)
        x.grad = None

    call()
    return call


def interleaved(calls: dict[str, object], rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per call of each entry, the entries taking turns round by round (this
    VM's speed drifts by tens of percent between runs; turns give each layout the same drift)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for _ in range(per_round):
                call()
            times[name].append((time.perf_counter() - t) / per_round)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (14336, 4096), (4096, 14336)]
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    print("| N x K | layout | bits/weight held | M=1 us | vs Q4_1 | train step ms (M=256) | vs Q4_1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, k in shapes:
        built = layouts(n, k, gen)
        m1 = interleaved({name: _m1_call(layer) for name, layer in built.items()}, args.reps, 5)
        train = interleaved({name: _train_call(layer) for name, layer in built.items()}, max(3, args.reps // 5), 1)
        base = next(iter(built))
        for name, layer in built.items():
            bits = 8 * held_bytes(layer) / (n * k)
            print(
                f"| {n} x {k} | {name} | {bits:.3f} | {m1[name] * 1e6:.0f} | {m1[name] / m1[base]:.2f} "
                f"| {train[name] * 1e3:.1f} | {train[name] / train[base]:.2f} |",
                flush=True,
            )
    # The factored layers compute what their float32 twins compute.
    for name, layer in layouts(256, 512, gen).items():
        if layer.is_factored:
            plain = copy.deepcopy(layer)
            plain.unfactor_()
            x = torch.randn(3, 512)
            assert torch.equal(layer(x), plain(x)), name
            assert torch.equal(ops.dequantize(*plain.canonical(), plain.bits, plain.group_size), layer.dequantize())


if __name__ == "__main__":
    main()
