"""GPTQ's cost: one layer (the core's column loop vs the same loop as libtorch ops, and
against RTN), and the whole of SmolLM2-135M (wall time and peak memory, against RTN on the
same model in the same run).

    python benches/bench_gptq.py                 # layers + whole model, 3-bit g32, 128 blocks
    python benches/bench_gptq.py --layers-only
    python benches/bench_gptq.py --model-only --settings 3:32,2:32,4:64 --calibration-blocks 32

Absolute times move with the machine's load (printed at the top); compare the ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import qalora
from _common import machine, median_time
from qalora import gptq, ops


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def layer_table(bits: int, group_size: int) -> None:
    print(f"\none layer, {bits}-bit g{group_size}, Hessian from 4096 correlated rows (median of 3)")
    print(f"{'N x K':>12} | {'core ms':>8} {'torch ms':>9} {'RTN ms':>7} | {'torch/core':>10} {'core/RTN':>9}")
    g = torch.Generator().manual_seed(0)
    for n, k in ((576, 576), (1536, 576), (576, 1536)):
        mix = torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / k**0.5
        x = torch.randn(4096, k, generator=g) @ mix
        h = torch.zeros(k, k)
        gptq.hessian_update(h, x, 0)
        w = 0.05 * torch.randn(n, k, generator=g)
        t = {
            be: median_time(lambda i, be=be: gptq.quantize_weight(w, h, bits, group_size, backend=be), 3, warmup=1)
            for be in ("core", "torch")
        }
        rtn = median_time(lambda i: ops.quantize(w, bits, group_size), 3, warmup=1)
        print(
            f"{n:>5} x {k:<5}| {t['core'] * 1e3:8.1f} {t['torch'] * 1e3:9.1f} {rtn * 1e3:7.2f} | "
            f"{t['torch'] / t['core']:9.2f}x {t['core'] / rtn:8.0f}x"
        )


def whole_model(lm, calib, heldout, bits: int, group_size: int) -> None:
    from qalora.train import perplexity

    cfg = qalora.QALoRAConfig(bits=bits, group_size=group_size)
    print(
        f"\n{time.strftime('%H:%M:%S')} SmolLM2-135M, {bits}-bit g{group_size}, {len(calib)} calibration blocks "
        f"of {calib.shape[1]} tokens, {len(heldout)} held-out blocks; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    m = copy.deepcopy(lm.model)
    t0 = time.perf_counter()
    qalora.wrap(m, cfg)
    rtn_s = time.perf_counter() - t0
    rtn_ppl = perplexity(m, heldout, show_progress=False)
    del m
    m = copy.deepcopy(lm.model)
    rss_before, hwm_before = status_kib("VmRSS"), status_kib("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    qalora.wrap(m, qalora.QALoRAConfig(bits=bits, group_size=group_size, quantizer="gptq"), calibration=calib)
    gptq_s, gptq_cpu = time.perf_counter() - t0, time.process_time() - c0
    hwm_after = status_kib("VmHWM")
    report = qalora.state_of(m).quantization
    gptq_ppl = perplexity(m, heldout, show_progress=False)
    layers = report["layers"].values()
    ratio = sorted(r["error"] / r["rtn_error"] for r in layers if r["rtn_error"] > 0)
    mib = 1024
    print(f"RTN wrap:  {rtn_s:7.1f} s   held-out perplexity {rtn_ppl:.3f}")
    print(
        f"GPTQ wrap: {gptq_s:7.1f} s   held-out perplexity {gptq_ppl:.3f}   ({gptq_s / rtn_s:.0f}x RTN's time; "
        f"{gptq_cpu:.0f} s of CPU time, so {gptq_cpu / gptq_s:.2f} cores on average)"
    )
    print(
        f"memory: RSS {rss_before / mib:.0f} MiB before GPTQ, process peak {hwm_after / mib:.0f} MiB after "
        f"(peak before GPTQ {hwm_before / mib:.0f} MiB): GPTQ added at most {(hwm_after - rss_before) / mib:.0f} MiB"
    )
    print(
        f"per-layer output error on calibration, GPTQ / RTN: median {ratio[len(ratio) // 2]:.2f}, "
        f"min {ratio[0]:.2f}, max {ratio[-1]:.2f} over {len(ratio)} layers; mode: {report['mode']}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="3:32", help="bits:group_size pairs for the whole model, comma-separated")
    p.add_argument("--calibration-blocks", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--layers-only", action="store_true")
    p.add_argument("--model-only", action="store_true")
    args = p.parse_args()
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    print(time.strftime("%H:%M:%S"), machine(), flush=True)
    if not args.model_only:
        layer_table(*settings[0])
    if not args.layers_only:
        from qalora import datasets
        from qalora.loaders import load_model

        lm = load_model()
        ds = datasets.bundled_dataset()
        calib = datasets.token_blocks(lm.tokenizer, ds.train, args.block_size, max_blocks=args.calibration_blocks)
        heldout = datasets.token_blocks(lm.tokenizer, ds.heldout, args.block_size, max_blocks=args.heldout_blocks)
        for bits, g in settings:
            whole_model(lm, calib, heldout, bits, g)


if __name__ == "__main__":
    main()
