"""Throughput of qalora's memory-bound ops on CPU vs the machine's memcpy bandwidth, measured
in the same run. Each op is charged the bytes it must read plus write; its effective GB/s is
divided by a large tensor copy's (read + write) GB/s.

    python benches/bench_ops.py            # 8192 x 8192 weights
    python benches/bench_ops.py --quick    # 4096 x 4096, fewer repetitions
"""

from __future__ import annotations

import argparse

import qalora.ops as ops
import torch
from _common import copy_bandwidth, machine, median_time


def clone_bandwidth(mib: int = 256, reps: int = 7) -> float:
    """Allocating copy (``clone``), read + write GB/s: every op below returns a fresh
    tensor, so this includes the same first-touch page faults they pay."""
    src = torch.ones(mib << 18)
    t = median_time(lambda i: src.clone(), reps)
    return 2 * src.numel() * 4 / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = k = 4096 if args.quick else 8192
    g, bits, rank = 32, 4, 16
    reps = 5 if args.quick else 9
    print(f"machine: {machine()}")
    copy_bw = copy_bandwidth()
    clone_bw = clone_bandwidth()
    print(
        f"measured memcpy bandwidth (read + write bytes): {copy_bw:.1f} GB/s into an existing tensor, "
        f"{clone_bw:.1f} GB/s allocating (clone)"
    )
    print(f"shapes: weight ({n}, {k}), bits {bits}, group {g}; activations ({n}, {k}) fp32; rank {rank}\n")

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    packed = ops.pack(codes, bits)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(n, k, generator=gen)
    scales = torch.rand(n, k // g, generator=gen).half()
    offsets = torch.randn(n, k // g, generator=gen).half()
    lora_a = torch.randn(rank, k // g, generator=gen)
    torch.randn(n, rank, generator=gen)
    # Large M-row groups of offsets make merge a measurable, memory-bound op: one (N, L)
    # offsets tensor per 32 columns of the weight would be tiny, so merge 64 layers' worth.
    big_offsets = torch.randn(n * 64, k // g, generator=gen).half()
    big_b = torch.randn(n * 64, rank, generator=gen)
    merge_out, in_place = torch.empty_like(big_offsets), big_offsets.clone()

    cases = [
        ("pack (4-bit)", lambda i: ops.pack(codes, bits), codes.numel() + packed.numel()),
        ("unpack (4-bit)", lambda i: ops.unpack(packed, bits, k), codes.numel() + packed.numel()),
        (
            "quantize (4-bit, g32, fp16)",
            lambda i: ops.quantize(w, bits, g),
            w.numel() * 4 + packed.numel() + 2 * scales.numel() * 2,
        ),
        (
            "dequantize (4-bit -> fp32)",
            lambda i: ops.dequantize(packed, scales, offsets, bits, g),
            packed.numel() + 2 * scales.numel() * 2 + w.numel() * 4,
        ),
        ("group_pool (fp32, g32)", lambda i: ops.group_pool(x, g), x.numel() * 4 * (1 + 1 / g)),
        (
            "merge_offsets (fp16, r16)",
            lambda i: ops.merge_offsets(big_offsets, lora_a, big_b, 2.0, g),
            2 * big_offsets.numel() * 2 + big_b.numel() * 4,
        ),
        (
            "merge_offsets, out= a tensor",
            lambda i: ops.merge_offsets(big_offsets, lora_a, big_b, 2.0, g, out=merge_out),
            2 * big_offsets.numel() * 2 + big_b.numel() * 4,
        ),
        (
            "merge_offsets, in place",
            lambda i: ops.merge_offsets(in_place, lora_a, big_b, 2.0, g, out=in_place),
            2 * big_offsets.numel() * 2 + big_b.numel() * 4,
        ),
    ]
    print(f"{'op':<30} {'ms':>9} {'GB/s':>8} {'of memcpy':>10} {'of clone':>9}")
    print("(merge_offsets: the out= rows write into an existing tensor; the first allocates its result)")
    for name, fn, nbytes in cases:
        t = median_time(fn, reps)
        gbs = nbytes / t / 1e9
        print(
            f"{name:<30} {t * 1e3:9.2f} {gbs:8.2f} {100 * gbs / copy_bw:9.0f}% {100 * gbs / clone_bw:8.0f}%", flush=True
        )


if __name__ == "__main__":
    main()
