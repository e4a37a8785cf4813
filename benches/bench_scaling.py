"""Where M = 1 time goes (4-bit, g32): torch's int4 kernel and qalora's int8-activation
route with one weight copy (cache-resident for 4096 x 4096, partly so for 4096 x 14336)
against rotating copies that must come from DRAM, and torch on one thread as well as on all
(is it limited per core?).

    python benches/bench_scaling.py
"""

from __future__ import annotations

import math

import qalora.ops as ops
import torch
from _common import machine, median_time, read_bandwidth
from bench_qmatmul import ROTATE_BYTES, make_qalora, make_torch_int4, weight_bytes


def main() -> None:
    g, reps = 32, 40
    threads = torch.get_num_threads()
    print(f"machine: {machine()}")
    print(f"measured read bandwidth (large fp32 sum, {threads} threads): {read_bandwidth():.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    for n, k in [(4096, 4096), (4096, 14336)]:
        wb = weight_bytes(n, k, g)
        copies = max(2, math.ceil(ROTATE_BYTES / wb))  # together well above the L3
        q = [make_qalora(n, k, g, gen) for _ in range(copies)]
        t4 = [make_torch_int4(n, k, g, gen) for _ in range(copies)]
        x = torch.randn(1, k, generator=gen)
        xb = x.bfloat16()
        print(f"\n{n} x {k}, g {g}, M = 1: {wb / 1e6:.1f} MB of codes + fp16 scales and offsets per call")

        def report(name: str, t: float) -> None:
            print(f"  {name:<44} {t * 1e3:7.3f} ms {wb / t / 1e9:6.1f} GB/s", flush=True)

        def int4(i: int, rotate: bool):
            p, sz = t4[i % copies if rotate else 0]
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, g, sz)

        for th in sorted({1, threads}):
            torch.set_num_threads(th)
            report(f"torch int4, {th} thread(s), rotating copies", median_time(lambda i: int4(i, True), reps))
        torch.set_num_threads(threads)
        report(f"torch int4, {threads} thread(s), one copy", median_time(lambda i: int4(i, False), reps))
        report(
            "qalora int8, rotating copies",
            median_time(lambda i: ops.qmatmul(x, *q[i % copies], 4, g, activations="int8"), reps),
        )
        report("qalora int8, one copy", median_time(lambda i: ops.qmatmul(x, *q[0], 4, g, activations="int8"), reps))
        q = t4 = None  # free the copies before the next shape


if __name__ == "__main__":
    main()
