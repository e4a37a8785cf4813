"""Quantized matmul on CPU: qalora's routes against torch's own int4 kernel
(``_weight_int4pack_mm_for_cpu``, bf16 activations) and dense fp32 ``F.linear``, in one run.

qalora routes (4-bit, fp16 scale and offset): ``exact`` (f32 activations, the default),
``bf16`` (``activations="bf16"``), ``int8`` (``activations="int8"``, canonical layout) and
``tiled`` (the int8 route on the tiled layout a layer gets from ``set_activations("int8")``);
the last three only differ from exact for M <= 16.

The run first measures the read bandwidth with a streaming-read kernel (every byte of a
buffer twice the size of the last-level cache loaded once, on 2 threads) and, for
comparison, a torch fp32 sum. Each op is then timed over rotating weight copies that
together exceed twice the last-level cache (so weights come from DRAM, as in a real model),
with warm-up and medians. Weight bytes of the 4-bit formats = N*K*(0.5 + 4/g) (codes + fp16
scale + fp16 offset; torch's bf16 scale_and_zero is the same size). Last, each route's error
against float64 on the same weights (scales and offsets exact in fp16 and bf16 alike, so
torch int4 and qalora hold identical weights).

    python benches/bench_qmatmul.py            # (4096,4096), (4096,14336); g 32/128; M 1/8/512
    python benches/bench_qmatmul.py --quick    # (4096,4096) only, fewer repetitions
"""

from __future__ import annotations

import argparse
import math

import qalora.ops as ops
import torch
import torch.nn.functional as F
from _common import l3_bytes, machine, median_time, read_bandwidth, stream_bandwidth
from qalora import _core

ROUTES = ("exact", "bf16", "int8", "tiled")


def rotate_bytes() -> int:
    """Rotating weight copies must together exceed this (twice the L3, at least 96 MiB)."""
    return max(96 << 20, 2 * l3_bytes())


def weight_bytes(n: int, k: int, g: int) -> float:
    return n * k * (0.5 + 4 / g)


def exact_params(n: int, k: int, g: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zero points (torch int4's w = (q - 8)·scale + zero) whose scales,
    zeros and offsets (m = zero - 8·scale) are exact in both bf16 and fp16."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scale = torch.randint(1, 64, (n, k // g), generator=gen).float() * 2.0**-12
    zero = torch.randint(-255, 256, (n, k // g), generator=gen).float() * 2.0**-12
    return codes, scale, zero


def make_qalora(codes, scale, zero, g):
    packed = ops.pack(codes.to(torch.uint8), 4)
    offsets = zero - 8 * scale
    return packed, scale.half(), offsets.half()


def make_torch_int4(codes, scale, zero, g):
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scale.t(), zero.t()], -1).bfloat16().contiguous()  # (K/g, N, 2)
    return packed, sz


def make_weights(n, k, g, gen):
    codes, scale, zero = exact_params(n, k, g, gen)
    q = make_qalora(codes, scale, zero, g)
    return q, _core.repack_tiles(*q, 4, g), make_torch_int4(codes, scale, zero, g)


def route_call(route: str, x: torch.Tensor, q, tiled, g: int):
    p, s, o = q
    if route == "tiled":
        if x.shape[0] <= 16:
            return _core.qmatmul_tiled(x, tiled, p.shape[0], g)
        return ops.qmatmul(x, *_core.unrepack_tiles(tiled, p.shape[0], x.shape[1], g), 4, g)
    return ops.qmatmul(x, p, s, o, 4, g, activations=route)


def errors_table(gen: torch.Generator) -> None:
    """Relative L2 error of each route against float64, same weights and activations."""
    print("\nerror against float64 (relative L2 over the outputs; same weights for every kernel):")
    print(f"{'N x K':>12} {'g':>4} {'M':>3} | " + " ".join(f"{r:>9}" for r in (*ROUTES, "int4")))
    for n, k in [(4096, 4096)]:
        for g in (32, 128):
            codes, scale, zero = exact_params(n, k, g, gen)
            q = make_qalora(codes, scale, zero, g)
            tiled = _core.repack_tiles(*q, 4, g)
            t4 = make_torch_int4(codes, scale, zero, g)
            w64 = (codes.double() - 8) * scale.double().repeat_interleave(g, 1) + zero.double().repeat_interleave(g, 1)
            for m in (1, 8):
                x = torch.randn(m, k, generator=gen)
                x[:, :: k // 8] *= 20  # a few large activations, as real models have
                want = x.double() @ w64.t()
                errs = [route_call(r, x, q, tiled, g).double() for r in ROUTES]
                errs.append(torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), t4[0], g, t4[1]).double())
                rel = [((y - want).norm() / want.norm()).item() for y in errs]
                print(f"{f'{n}x{k}':>12} {g:>4} {m:>3} | " + " ".join(f"{e:9.2e}" for e in rel), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repetitions")
    args = ap.parse_args()

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 14336)]
    groups, ms = [32, 128], [1, 8, 512]
    print(f"machine: {machine()}")
    probe = stream_bandwidth()
    print(
        f"read bandwidth: {probe:.1f} GB/s streaming-read kernel ({torch.get_num_threads()} threads, "
        f"{2 * l3_bytes() >> 20} MiB buffer); {read_bandwidth():.1f} GB/s torch fp32 sum"
    )
    print(f"weights rotate over copies of at least {rotate_bytes() >> 20} MiB per format\n")
    gen = torch.Generator().manual_seed(0)
    header = (
        f"{'N x K':>12} {'g':>4} {'M':>4} | "
        + " ".join(f"{r:>7}" for r in (*ROUTES, "int4", "dense"))
        + " ms | "
        + " ".join(f"{r:>6}" for r in (*ROUTES, "int4"))
        + " %BW | vs int4: "
        + " ".join(f"{r:>6}" for r in ROUTES)
    )
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        dense_copies = max(1, min(3, math.ceil(rotate_bytes() / (n * k * 4))))
        dense = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(dense_copies)]
        for g in groups:
            wb = weight_bytes(n, k, g)
            copies = max(2, math.ceil(rotate_bytes() / wb))
            ws = [make_weights(n, k, g, gen) for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, generator=gen)
                xb = x.bfloat16()
                reps = (30 if args.quick else 60) if m == 1 else (15 if args.quick else 30) if m <= 16 else 3
                times = {}
                for route in ROUTES:
                    if m > 16 and route != "exact":
                        continue  # the small-batch routes only differ for M <= 16

                    def run(i, route=route):
                        q, tiled, _ = ws[i % copies]
                        return route_call(route, x, q, tiled, g)

                    times[route] = median_time(run, reps)

                def run_t(i):
                    p, sz = ws[i % copies][2]
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, g, sz)

                times["int4"] = median_time(run_t, reps)
                times["dense"] = median_time(lambda i: F.linear(x, dense[i % dense_copies]), reps)
                ms_cols = " ".join(f"{times[r] * 1e3:7.3f}" if r in times else f"{'-':>7}" for r in (*ROUTES, "int4"))
                bw_cols = " ".join(
                    f"{100 * wb / times[r] / 1e9 / probe:5.0f}%" if r in times else f"{'-':>6}"
                    for r in (*ROUTES, "int4")
                )
                vs = " ".join(f"{times['int4'] / times[r]:5.2f}x" if r in times else f"{'-':>6}" for r in ROUTES)
                print(
                    f"{f'{n}x{k}':>12} {g:>4} {m:>4} | {ms_cols} {times['dense'] * 1e3:7.3f} ms | {bw_cols} | {vs}",
                    flush=True,
                )
            ws = None  # free the copies before the next shape
    print(
        "\n%BW: weight bytes per second over the streaming-read bandwidth measured above."
        "\nvs int4 > 1: qalora's route faster than torch's int4 kernel (times in the same run)."
    )
    errors_table(gen)


if __name__ == "__main__":
    main()
