"""Where M = 1 time goes (4-bit, g32): torch's int4 kernel and qalora's routes with one weight
copy (cache-resident) against rotating copies that must come from DRAM, and on one thread as
well as on all (is each kernel limited per core?).

    python benches/bench_scaling.py
"""

from __future__ import annotations

import math
import os

import torch
from _common import machine, median_time, stream_bandwidth
from bench_qmatmul import make_weights, rotate_bytes, route_call, weight_bytes
from qalora import _core


def main() -> None:
    g, reps = 32, 40
    threads = torch.get_num_threads()
    print(f"machine: {machine()}")
    print(f"read bandwidth (streaming-read kernel, {threads} threads): {stream_bandwidth():.1f} GB/s")
    # The kernels' pool: torch's OpenMP team (torch's thread count) or rayon.
    pool = _core.thread_pool()
    pool += f" {threads}" if pool == "openmp" else " " + os.environ.get("RAYON_NUM_THREADS", "all")
    gen = torch.Generator().manual_seed(0)
    for n, k in [(4096, 4096), (4096, 14336)]:
        wb = weight_bytes(n, k, g)
        copies = max(2, math.ceil(rotate_bytes() / wb))  # together well above the L3
        ws = [make_weights(n, k, g, gen) for _ in range(copies)]
        x = torch.randn(1, k, generator=gen)
        xb = x.bfloat16()
        print(f"\n{n} x {k}, g {g}, M = 1: {wb / 1e6:.1f} MB of codes + fp16 scales and offsets per call")

        def report(name: str, t: float) -> None:
            print(f"  {name:<48} {t * 1e3:7.3f} ms {wb / t / 1e9:6.1f} GB/s", flush=True)

        def int4(i: int, rotate: bool):
            p, sz = ws[i % copies if rotate else 0][2]
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, g, sz)

        for th in sorted({1, threads}):
            torch.set_num_threads(th)
            report(f"torch int4, {th} thread(s), rotating copies", median_time(lambda i: int4(i, True), reps))
        torch.set_num_threads(threads)
        report(f"torch int4, {threads} thread(s), one copy", median_time(lambda i: int4(i, False), reps))
        for route in ("exact", "int8", "tiled"):

            def run(i, rotate, route=route):
                q, tiled, _ = ws[i % copies if rotate else 0]
                return route_call(route, x, q, tiled, g)

            report(f"qalora {route}, {pool} threads, rotating copies", median_time(lambda i: run(i, True), reps))
            report(f"qalora {route}, {pool} threads, one copy", median_time(lambda i: run(i, False), reps))
        ws = None  # free the copies before the next shape


if __name__ == "__main__":
    main()
