"""Every benchmark behind benches/RESULTS.md, in one command: prints the machine and load
average, each benchmark's output (its own command above it), and the targets table with the
ratios read from those outputs.

    python benches/run_all.py            # the full set (about 20-30 minutes on 2 cores)
    python benches/run_all.py --quick    # fewer shapes and repetitions
    python benches/run_all.py --only qmatmul generate

The machine is shared and noisy: compare the ratios within one run, and note the load
average printed before and after (a run above a load of ~1 is not a quiet measurement).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

BENCHES = {
    "qmatmul": ["bench_qmatmul.py"],
    "scaling": ["bench_scaling.py"],
    "ops": ["bench_ops.py", "--quick"],
    "train": ["bench_train_step.py"],
    "generate": ["bench_generate.py", "--compile"],
}


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run(name: str, quick: bool) -> str:
    cmd = [sys.executable, *BENCHES[name]]
    if quick and "--quick" not in cmd:
        cmd.append("--quick")
    shown = "python benches/" + " ".join(cmd[1:])
    print(f"\n## {name}: `{shown}`\n\n```", flush=True)
    env = dict(os.environ, QALORA_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.match(r"^(Loading weights|.*it/s\])", line):
            continue  # progress bars
        lines.append(line)
        print(line, end="", flush=True)
    proc.wait()
    print("```", flush=True)
    if proc.returncode:
        print(f"(exited with status {proc.returncode})")
    return "".join(lines)


def floats(pattern: str, text: str) -> list[tuple[str, ...]]:
    return re.findall(pattern, text, flags=re.M)


def targets(out: dict[str, str]) -> None:
    rows = []
    q = out.get("qmatmul", "")
    # Rows: N x K, g, M | exact bf16 int8 tiled int4 dense ms | ... %BW | exact bf16 int8 tiled (x int4)
    row_re = r"^\s*(\d+x\d+)\s+(\d+)\s+(\d+) \|.*\|\s+(\S+x)\s+(\S+)\s+(\S+)\s+(\S+)\s*$"
    qrows = floats(row_re, q)

    def vs(m: int, col: int) -> list[float]:
        return [float(r[3 + col].rstrip("x")) for r in qrows if int(r[2]) == m and r[3 + col] != "-"]

    def span(v: list[float]) -> str:
        return f"{min(v):.2f}-{max(v):.2f}x" if v else "not measured"

    for m in (1, 8):
        v = vs(m, 1)
        rows.append((f"bf16 route >= 1.0x torch int4, M = {m}", span(v), min(v) >= 1.0 if v else None))
    v = vs(1, 3)
    rows.append(("int8 route (tiled) >= 1.5x torch int4, M = 1", span(v), min(v) >= 1.5 if v else None))
    v = vs(1, 0)
    rows.append(("exact route vs torch int4, M = 1 (no target)", span(v), None))
    bw = floats(r"^\s*\d+x\d+\s+\d+\s+1 \|.*\|\s+(\S+)%\s+(\S+)%\s+(\S+)%\s+(\S+)%\s+(\S+)%\s+\|", q)
    if bw:
        cols = list(zip(*bw))
        text = ", ".join(
            f"{name} {min(map(float, c)):.0f}-{max(map(float, c)):.0f}%"
            for name, c in zip(("exact", "bf16", "int8", "tiled", "int4"), cols)
        )
        rows.append(("M = 1, fraction of the measured read bandwidth", text, None))
    t = floats(r"^(fp32|bf16)\s+([\d.]+) s\s+([\d.]+) s\s+([\d.]+)x", out.get("train", ""))
    for prec, _, _, ratio in t:
        rows.append((f"training step, qalora / PEFT LoRA, {prec}", f"{float(ratio):.2f}x", float(ratio) <= 1.0))
    g = floats(r"^(qalora .*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\d+)/(\d+)\s*$", out.get("generate", ""))
    if g:
        best = max(g, key=lambda r: float(r[3]))
        rows.append(
            (
                "generation (decode tokens/s) >= 2x dense fp32 transformers",
                f"{float(best[3]):.2f}x ({best[0].strip()})",
                float(best[3]) >= 2.0,
            )
        )
    ops_out = out.get("ops", "")
    merge = floats(r"^merge_offsets, in place\s+[\d.]+\s+[\d.]+\s+(\d+)%", ops_out)
    if merge:
        rows.append(("merge_offsets (in place) >= 50% of memcpy", f"{merge[0]}%", int(merge[0]) >= 50))
    print("\n## Targets\n")
    print("| target | result | met? |\n| --- | --- | --- |")
    for name, result, met in rows:
        verdict = "-" if met is None else ("yes" if met else "**no**")
        print(f"| {name} | {result} | {verdict} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from _common import machine

    start = time.time()
    print(f"# qalora benchmarks, {time.strftime('%Y-%m-%d %H:%M')}\n\nmachine: {machine()}\nbefore: {load()}")
    out = {name: run(name, args.quick) for name in args.only}
    print(f"\nafter: {load()}; {(time.time() - start) / 60:.1f} min")
    targets(out)


if __name__ == "__main__":
    main()
