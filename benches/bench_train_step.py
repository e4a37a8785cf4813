"""One whole training step of SmolLM2-135M on CPU, qalora against PEFT LoRA on the dense model
(what a CPU user fine-tunes today), in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``:

* PEFT: the dense fp32 model, LoRA rank 16 (alpha 32) on all seven projections of every layer;
* qalora: the same model wrapped at 4-bit, group 32, QA-LoRA rank 16 (alpha 32) on the same
  seven projections (frozen quantized base; under autocast its forward and backward run as
  bf16 GEMMs on dequantized bf16 tiles).

Each step is forward + loss + backward + AdamW on a batch of 4 x 128 tokens of the bundled
text; the adapters keep fp32 master weights in both. The two models alternate step by step
(so machine noise hits both alike); medians of the timed steps after warm-up.

    python benches/bench_train_step.py [--quick] [--steps N] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import qalora
import torch
from _common import machine
from qalora import datasets
from qalora.loaders import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BITS, GROUP, BATCH, BLOCK = 16, 32, 4, 32, 4, 128


def peft_model(base: torch.nn.Module) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(copy.deepcopy(base), config)


def qalora_model(base: torch.nn.Module) -> torch.nn.Module:
    config = qalora.QALoRAConfig(bits=BITS, group_size=GROUP, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    return qalora.wrap(copy.deepcopy(base), config, show_progress=False)


def make_step(model: torch.nn.Module, batches: torch.Tensor, bf16: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(i: int) -> float:
        ids = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model and precision")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model and precision (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 6)
    print(f"machine: {machine()}")
    lm = load_model("smollm2", dense=True)  # dense fp32 layers (the bundled file is Q4_1)
    blocks = datasets.token_blocks(lm.tokenizer, datasets.bundled_dataset().train, BLOCK, max_blocks=BATCH * 8)
    batches = blocks.view(-1, BATCH, BLOCK)
    models = {"PEFT LoRA (dense)": peft_model(lm.model), "qalora 4-bit g32": qalora_model(lm.model)}
    print(
        f"SmolLM2-135M, rank {RANK} on {len(TARGETS)} projections x {lm.model.config.num_hidden_layers} layers, "
        f"batch {BATCH}x{BLOCK} tokens, AdamW, {torch.get_num_threads()} torch threads; "
        f"median of {steps} steps after {args.warmup} warm-up steps\n"
    )
    print(f"{'precision':<10} {'PEFT LoRA (dense)':>18} {'qalora 4-bit g32':>17} {'qalora / PEFT':>14}")
    results = {}
    for bf16 in (False, True):
        fns = {name: make_step(m, batches, bf16) for name, m in models.items()}
        times = {name: [] for name in fns}
        for i in range(args.warmup + steps):
            for name, fn in fns.items():
                t = fn(i)
                if i >= args.warmup:
                    times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        peft_t, q_t = med["PEFT LoRA (dense)"], med["qalora 4-bit g32"]
        label = "bf16" if bf16 else "fp32"
        results[label] = (peft_t, q_t)
        print(f"{label:<10} {peft_t:>16.2f} s {q_t:>15.2f} s {q_t / peft_t:>13.2f}x", flush=True)
    (pf, qf), (pb, qb) = results["fp32"], results["bf16"]
    print(
        f"\nbf16 autocast vs fp32: PEFT {pf / pb:.2f}x faster, qalora {qf / qb:.2f}x faster; "
        f"qalora bf16 / PEFT fp32 = {qb / pf:.2f}x"
    )


if __name__ == "__main__":
    main()
