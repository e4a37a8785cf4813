"""Quantized matmul on CPU: qalora.ops.qmatmul (4-bit, fp16 scale/offset; exact, and for
M <= 16 also with activations="int8") vs torch's own int4 kernel
(_weight_int4pack_mm_for_cpu, bf16 activations) vs dense fp32 F.linear.

One run measures the machine's read bandwidth, then times each op over rotating weight
copies that together exceed the last-level cache (so weights come from DRAM, as in a real
model), with warm-up and medians. Weight bytes of the 4-bit formats = N*K*(0.5 + 4/g)
(codes + fp16 scale + fp16 offset; torch's bf16 scale_and_zero is the same size).

    python benches/bench_qmatmul.py            # full: (4096,4096), (4096,14336); g 32/128; M 1/8/512
    python benches/bench_qmatmul.py --quick    # (4096,4096) only, fewer repetitions
"""

from __future__ import annotations

import argparse
import math

import qalora.ops as ops
import torch
import torch.nn.functional as F
from _common import machine, median_time, read_bandwidth

# Rotating copies must exceed this many bytes (well above a 32 MiB L3).
ROTATE_BYTES = 96 << 20


def weight_bytes(n: int, k: int, g: int) -> float:
    return n * k * (0.5 + 4 / g)


def make_qalora(n: int, k: int, g: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    packed = ops.pack(codes, 4)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).half()
    offsets = (torch.randn(n, k // g, generator=gen) * 0.1).half()
    return packed, scales, offsets


def make_torch_int4(n: int, k: int, g: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    # w = (q - 8) * scale + zero, scale_and_zero (K/g, N, 2) bf16.
    sz = torch.stack(
        [torch.rand(k // g, n, generator=gen) * 0.02 + 0.001, torch.randn(k // g, n, generator=gen) * 0.1], -1
    )
    return packed, sz.bfloat16()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repetitions")
    args = ap.parse_args()

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 14336)]
    groups = [32, 128]
    ms = [1, 8, 512]
    print(f"machine: {machine()}")
    bw = read_bandwidth()
    print(f"measured read bandwidth (large fp32 sum): {bw:.1f} GB/s\n")

    gen = torch.Generator().manual_seed(0)
    header = (
        f"{'N x K':>12} {'g':>4} {'M':>4} | {'exact ms':>8} {'int8 ms':>8} {'int4 ms':>8} {'dense ms':>8} | "
        f"{'exact GB/s':>10} {'int8 GB/s':>9} {'int4 GB/s':>9} {'%readBW':>7} | "
        f"{'int4/exact':>10} {'int4/int8':>9} {'exact/dense':>11}"
    )
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        dense_copies = max(1, min(3, math.ceil(ROTATE_BYTES / (n * k * 4))))
        dense = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(dense_copies)]
        for g in groups:
            wb = weight_bytes(n, k, g)
            copies = max(2, math.ceil(ROTATE_BYTES / wb))
            q = [make_qalora(n, k, g, gen) for _ in range(copies)]
            t4 = [make_torch_int4(n, k, g, gen) for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, generator=gen)
                xb = x.bfloat16()
                if m == 1:
                    reps = 30 if args.quick else 60
                elif m <= 16:
                    reps = 15 if args.quick else 30
                else:
                    reps = 3 if args.quick else 5

                def run_q(i):
                    p, s, o = q[i % copies]
                    return ops.qmatmul(x, p, s, o, 4, g)

                def run_q8(i):
                    p, s, o = q[i % copies]
                    return ops.qmatmul(x, p, s, o, 4, g, activations="int8")

                def run_t(i):
                    p, sz = t4[i % copies]
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, g, sz)

                def run_d(i):
                    return F.linear(x, dense[i % dense_copies])

                # Interleave the three so that machine noise hits them alike.
                tq = median_time(run_q, reps)
                # int8 activations change only the fused small-M path.
                t8 = median_time(run_q8, reps) if m <= 16 else None
                tt = median_time(run_t, reps)
                td = median_time(run_d, reps)
                best = min(tq, t8 or tq)
                i8 = (f"{t8 * 1e3:8.3f}", f"{wb / t8 / 1e9:9.2f}", f"{tt / t8:8.2f}x") if t8 else ("-", "-", "-")
                print(
                    f"{f'{n}x{k}':>12} {g:>4} {m:>4} | {tq * 1e3:8.3f} {i8[0]:>8} {tt * 1e3:8.3f} {td * 1e3:8.3f} | "
                    f"{wb / tq / 1e9:10.2f} {i8[1]:>9} {wb / tt / 1e9:9.2f} {100 * wb / best / 1e9 / bw:6.0f}% | "
                    f"{tt / tq:9.2f}x {i8[2]:>9} {tq / td:10.2f}x",
                    flush=True,
                )
            q = t4 = None  # free the copies before the next shape
    print(
        '\nexact / int8: qalora with exact f32 activations / with activations="int8" (M <= 16 only).'
        "\nint4/exact, int4/int8 > 1: qalora faster than torch's int4 kernel; exact/dense < 1: faster than dense fp32."
        "\n%readBW: weight bytes per second of qalora's faster mode over the measured read bandwidth."
    )


if __name__ == "__main__":
    main()
