"""What trained group parameters cost per training step (QALoRAConfig.train_offsets /
train_scales / train_norms), against today's QA-LoRA step, on SmolLM2-135M, fp32:

* qalora 4-bit g32, the pooled adapter alone (rank 16, alpha 32, all seven projections);
* the same with trained offsets (target: at most 1.05x its step), with trained scales (at
  most 1.3x), with both and the norms.

The models alternate step by step (machine noise hits all alike); medians of the timed steps
after warm-up. Each step is forward + loss + backward + AdamW on 4 x 128 tokens.

    python benches/bench_group_params.py [--steps N] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import qalora
import torch
from _common import machine
from bench_train_step import ALPHA, BATCH, BITS, BLOCK, GROUP, RANK, TARGETS, make_step
from qalora import datasets
from qalora.loaders import load_model

_NONE = {"train_scales": False, "train_offsets": False, "train_norms": False}
# Each variant names everything it trains (QALoRAConfig's default trains the offsets).
VARIANTS = {
    "QA-LoRA": dict(_NONE),
    "+ offsets (the default)": {**_NONE, "train_offsets": True},
    "+ scales": {**_NONE, "train_scales": True},
    "+ scales + offsets + norms": {"train_scales": True, "train_offsets": True, "train_norms": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    lm = load_model("smollm2", dense=True)
    blocks = datasets.token_blocks(lm.tokenizer, datasets.bundled_dataset().train, BLOCK, max_blocks=BATCH * 8)
    batches = blocks.view(-1, BATCH, BLOCK)
    base = qalora.wrap(
        copy.deepcopy(lm.model),
        qalora.QALoRAConfig(bits=BITS, group_size=GROUP, target_modules=TARGETS),
        show_progress=False,
    )
    qalora.merge(base)  # the quantized base once; every variant wraps a copy of it
    qalora.state_of(base).config = None
    fns = {}
    for name, extra in VARIANTS.items():
        cfg = qalora.QALoRAConfig(bits=BITS, group_size=GROUP, rank=RANK, alpha=ALPHA, target_modules=TARGETS, **extra)
        fns[name] = make_step(qalora.wrap(copy.deepcopy(base), cfg, show_progress=False), batches, bf16=False)
    print(
        f"SmolLM2-135M, 4-bit g32, rank {RANK}, batch {BATCH}x{BLOCK} tokens, AdamW, {torch.get_num_threads()} "
        f"torch threads; median of {args.steps} steps after {args.warmup} warm-up steps, variants alternating\n"
    )
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.steps):
        for name, fn in fns.items():
            t = fn(i)
            if i >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med["QA-LoRA"]
    print(f"{'variant':<28} {'step':>8} {'vs QA-LoRA':>11}")
    for name, t in med.items():
        print(f"{name:<28} {t:>6.2f} s {t / ref:>10.2f}x")


if __name__ == "__main__":
    main()
