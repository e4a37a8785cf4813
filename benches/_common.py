"""Shared helpers of the benchmark scripts: timing with warm-up and medians, the machine's
memory bandwidth measured in the same run, and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[int], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn(i)`` over ``reps`` calls (i counts calls, for rotating
    inputs), after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def l3_bytes() -> int:
    """Size of the last-level cache from lscpu ("L3 cache: 32 MiB (1 instance)"); 32 MiB if
    lscpu does not say."""
    text = _lscpu().get("L3 cache", "")
    try:
        size, unit = text.split()[:2]
        return int(float(size) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit])
    except (ValueError, KeyError):
        return 32 << 20


def stream_bandwidth(reps: int = 7) -> float:
    """Read bandwidth in GB/s from qalora's streaming-read kernel (``qalora._core.stream_read``:
    every byte loaded once, several 32-byte loads in flight per thread, on all of the kernels'
    threads) over a buffer twice the last-level cache, at least 256 MiB."""
    from qalora import _core

    buf = torch.ones(max(256 << 20, 2 * l3_bytes()), dtype=torch.uint8)
    t = median_time(lambda i: _core.stream_read(buf), reps)
    return buf.numel() / t / 1e9


def read_bandwidth(mib: int = 512, reps: int = 7) -> float:
    """Read bandwidth in GB/s: a large float32 sum (bytes read / time)."""
    x = torch.ones(mib << 18)  # mib MiB of float32
    t = median_time(lambda i: x.sum(), reps)
    return x.numel() * 4 / t / 1e9


def copy_bandwidth(mib: int = 256, reps: int = 7) -> float:
    """memcpy bandwidth in GB/s counting read + write bytes (a large tensor copy)."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    t = median_time(lambda i: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / t / 1e9


def machine() -> str:
    model = platform.processor() or "?"
    fields = _lscpu()
    if fields:
        model = fields.get("Model name", model)
        caches = ", ".join(f"{k} {fields[k]}" for k in ("L2 cache", "L3 cache") if k in fields)
        flags = fields.get("Flags", "").split()
        isa = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)
        model = f"{model} ({caches}; {isa})"
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load average ?"
    return (
        f"{model}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; {load}"
    )
