"""An 8 B model on this machine: a synthetic Q4_K_M GGUF with Llama-3-8B's shapes (32 layers,
hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocabulary 128256, untied head; random
weights, written by tests/gguf_synthetic.py as llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for
attn_v, ffn_down and the head), taken through import -> wrap -> training steps (batch 1 x 256
tokens, gradient checkpointing) -> merge -> export, in one fresh process.

Per stage: seconds, and the process's peak resident memory (VmHWM, reset before each stage
through /proc/self/clear_refs) and resident memory after it. Training: seconds per step and
tokens per second (the first step apart: it allocates). What the model holds is printed too:
quantized layers (codes + group parameters) and dense tensors, against the file's bytes.

    python benches/bench_8b.py [--shape 8b|1b|tiny] [--steps 3] [--dir DIR] [--keep] [--quantized-embedding]
                               [--no-train-offsets] [--mmap-threshold BYTES]

``--shape 1b`` uses Llama-3.2-1B's shapes (16 layers, hidden 2048, FFN 8192, 32 / 8 heads,
tied head); ``tiny`` checks the script in seconds. The file is written once into ``--dir``
(default: a temporary directory) and reused; ``--keep`` keeps the export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import machine

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
Q4_K_M = {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q4_K", "output": "Q6_K"}
SHAPES = {
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256, tied=False, context=8192),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True, context=8192),
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=512, tied=False, context=2048),
}

CHILD = r"""
import json, os, sys, time
import torch, transformers, qalora
from transformers.models.llama import modeling_llama  # code imported before the baseline

path, out, steps, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
quantized_embedding = sys.argv[5] == "1"
train_offsets = sys.argv[6] == "1"

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

inner_peak = [0]  # the highest peak a stage saw before it reset the counter itself (training)

def stage(name, fn):
    reset_peak()
    inner_peak[0] = 0
    t = time.perf_counter()
    result = fn()
    peak = max(status("VmHWM"), inner_peak[0])
    print(json.dumps(dict(stage=name, seconds=time.perf_counter() - t, peak=peak, rss=status("VmRSS"))), flush=True)
    return result

print(json.dumps(dict(stage="start", seconds=0.0, peak=status("VmHWM"), rss=status("VmRSS"))), flush=True)
lm = stage("import", lambda: qalora.load_gguf(path, show_progress=False, quantized_embedding=quantized_embedding))
model = lm.model
seen, quant = set(), 0  # quantized layers and a quantized embedding; a tied head shares the table's
for m in model.modules():
    if isinstance(m, (qalora.QuantLinear, qalora.layers.QuantEmbedding)):
        for b in m.buffers(recurse=False):
            if b.data_ptr() not in seen:
                seen.add(b.data_ptr())
                quant += b.numel() * b.element_size()
dense = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(stage="held", quant=quant, dense=dense)), flush=True)

def wrap():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qalora.QALoRAWarning)  # Q6_K layers: no adapter, by default
        qalora.wrap(model, qalora.QALoRAConfig(train_offsets=train_offsets))
stage("wrap", wrap)
model.config.use_cache = False
if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)
times = []

def train():
    for i in range(steps):
        ids = torch.randint(0, vocab, (1, seq), generator=gen)
        t = time.perf_counter()
        peaks = {}  # peak RSS within each phase of the step
        reset_peak()
        loss = model(input_ids=ids, labels=ids).loss
        peaks["forward"] = status("VmHWM")
        reset_peak()
        loss.backward()
        peaks["backward"] = status("VmHWM")
        reset_peak()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks["optimizer"] = status("VmHWM")
        inner_peak[0] = max(inner_peak[0], *peaks.values())
        times.append(time.perf_counter() - t)
        print(json.dumps(dict(stage="step", step=i, seconds=times[-1], loss=float(loss.detach()), rss=status("VmRSS"),
                              peaks=peaks)), flush=True)
stage("train", train)
model.eval()
del opt
stage("merge", lambda: qalora.merge(model))
report = stage("export", lambda: qalora.export_gguf(model, out, show_progress=False))
print(json.dumps(dict(stage="exported", bytes=os.path.getsize(out), summary=report.summary(),
                      source_bytes=report.source_bytes, type_change_bytes=report.type_change_bytes)), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dir", default=None, help="where the synthetic file is written (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the exported file")
    ap.add_argument(
        "--quantized-embedding",
        action="store_true",
        help="load_gguf(quantized_embedding=True): the Q4_K token embedding stays quantized (no dense table)",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="run the model's process with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 131072): large "
        "temporaries then go straight back to the system instead of staying in the heap",
    )
    ap.add_argument(
        "--no-train-offsets",
        action="store_true",
        help="QALoRAConfig(train_offsets=False): adapters only (no per-group offsets and their AdamW state)",
    )
    args = ap.parse_args()
    sys.path.insert(0, TESTS)
    import gguf_synthetic as syn

    print(f"machine: {machine()}")
    work = args.dir or tempfile.mkdtemp(prefix="qalora-8b-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"synthetic-{args.shape}-q4_k_m.gguf")
    if not os.path.exists(path):
        t = time.perf_counter()
        spec = syn.SyntheticSpec(**SHAPES[args.shape], types=Q4_K_M, name=f"synthetic-{args.shape}-q4_k_m")
        syn.write_synthetic_gguf(path + ".part", spec)
        os.replace(path + ".part", path)
        print(f"(wrote {path} in {time.perf_counter() - t:.0f} s)")
    out = os.path.join(work, "export.gguf")
    cache = tempfile.mkdtemp(prefix="qalora-cache-")
    env = dict(os.environ, QALORA_CACHE=cache, QALORA_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    gib = 1 << 30
    file_bytes = os.path.getsize(path)
    print(f"file: {os.path.basename(path)}, {file_bytes / gib:.2f} GiB")
    print("\n| stage | seconds | peak RSS GiB | RSS after GiB |")
    print("| --- | --- | --- | --- |")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            path,
            out,
            str(args.steps),
            str(args.seq),
            str(int(args.quantized_embedding)),
            str(int(not args.no_train_offsets)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    steps = []
    for line in proc.stdout:
        r = json.loads(line)
        if r["stage"] == "held":
            held = (r["quant"], r["dense"])
        elif r["stage"] == "step":
            steps.append(r["seconds"])
            phases = ", ".join(f"{k} {v / gib:.2f}" for k, v in r["peaks"].items())
            print(f"| (step {r['step']}: {r['seconds']:.1f} s; peak RSS GiB by phase: {phases}) | | | |", flush=True)
        elif r["stage"] == "exported":
            exported = r
        else:
            print(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak'] / gib:.2f} | {r['rss'] / gib:.2f} |", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode})")
    later = steps[1:] or steps
    per_step = sum(later) / len(later)
    print(
        f"\nheld after import: quantized layers {held[0] / gib:.2f} GiB + dense {held[1] / gib:.2f} GiB; "
        f"file {file_bytes / gib:.2f} GiB"
    )
    print(
        f"training steps (batch 1 x {args.seq}): {', '.join(f'{s:.1f}' for s in steps)} s; "
        f"{per_step:.1f} s/step after the first, {args.seq / per_step:.1f} tokens/s"
    )
    print(f"export: {exported['bytes'] / gib:.2f} GiB; {exported['summary']}")
    if not args.keep:
        os.remove(out)


if __name__ == "__main__":
    main()
