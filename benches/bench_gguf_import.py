"""Peak memory of qalora.load_gguf on a synthetic 1.1 B-parameter GGUF (TinyLlama-1.1B's shape:
hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocabulary 32000, untied head),
random weights, written by tests/gguf_synthetic.py.

The import runs in a fresh process. Its peak resident memory (VmHWM) is compared with the
memory before the call (torch, transformers and qalora already imported), and the increase
with what the imported model must hold: its quantized layers (packed codes, scales, offsets)
plus the dense embedding and norm tensors. The bound the import keeps: increase <= 1.3 x that.

    python benches/bench_gguf_import.py [--mix q4_1,q4_k_m] [--dir DIR]

Each mix: q4_1 (every linear layer Q4_1, embedding Q4_1, head Q6_K, as llama.cpp's Q4_1
files), q4_k_m (Q4_K, with Q6_K for attn_v, ffn_down and the head, as llama.cpp's Q4_K_M).
The first load of a file also builds its config and tokenizer through transformers (cached
afterwards); both the first and a cached load are measured.
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
MIXES = {
    "q4_1": {"default": "Q4_1", "token_embd": "Q4_1", "output": "Q6_K"},
    "q4_k_m": {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q4_K", "output": "Q6_K"},
}

CHILD = r"""
import json, os, sys, time
import torch, transformers, accelerate, qalora
from transformers.models.llama import modeling_llama  # code imported before the baseline

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
before = status("VmRSS")
t = time.perf_counter()
lm = qalora.load_gguf(sys.argv[1], show_progress=False)
seconds = time.perf_counter() - t
peak = status("VmHWM")
after = status("VmRSS")
model = lm.model
from qalora.targets import quantized_layers
quant = sum(b.numel() * b.element_size() for _, m in quantized_layers(model) for b in m.buffers())
dense = sum(p.numel() * p.element_size() for p in model.parameters())
params = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for _, m in quantized_layers(model))
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
print(json.dumps(dict(before=before, peak=peak, after=after, quant=quant, dense=dense, params=params,
                      seconds=seconds, finite=bool(torch.isfinite(logits).all()))))
"""


def measure(path: str, cache: str) -> dict:
    env = dict(os.environ, QALORA_CACHE=cache, QALORA_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", default="q4_1,q4_k_m")
    ap.add_argument("--dir", default=None, help="where to write the synthetic files (default: a temporary directory)")
    args = ap.parse_args()
    sys.path.insert(0, TESTS)
    import gguf_synthetic as syn

    print(f"machine: {machine()}")
    work = args.dir or tempfile.mkdtemp(prefix="qalora-1b-")
    os.makedirs(work, exist_ok=True)
    mib = 1 << 20
    print(
        "\n| file | params | file MiB | load | before MiB | peak MiB | increase MiB | model: quantized + dense MiB | increase / model | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix in args.mix.split(","):
        path = os.path.join(work, f"synthetic-1.1b-{mix}.gguf")
        if not os.path.exists(path):
            spec = syn.SyntheticSpec(
                hidden=2048,
                layers=22,
                heads=32,
                kv_heads=4,
                ffn=5632,
                vocab=32000,
                tied=False,
                types=MIXES[mix],
                name=f"synthetic-1.1b-{mix}",
                context=2048,
            )
            t = time.perf_counter()
            syn.write_synthetic_gguf(path, spec)
            print(f"(wrote {path} in {time.perf_counter() - t:.0f} s)")
        cache = tempfile.mkdtemp(prefix="qalora-cache-")
        for load in ("first", "cached"):
            m = measure(path, cache)
            increase = m["peak"] - m["before"]
            held = m["quant"] + m["dense"]
            assert m["finite"], "the imported model's logits are not finite"
            print(
                f"| {os.path.basename(path)} | {m['params'] / 1e9:.3f} B | {os.path.getsize(path) / mib:.0f} | {load} | "
                f"{m['before'] / mib:.0f} | {m['peak'] / mib:.0f} | {increase / mib:.0f} | "
                f"{m['quant'] / mib:.0f} + {m['dense'] / mib:.0f} = {held / mib:.0f} | {increase / held:.3f} | "
                f"{m['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
