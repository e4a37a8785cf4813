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
    python benches/bench_train_step.py --gguf FILE.gguf --fp32-only   # a GGUF model instead

With ``--gguf`` the two sides come from one GGUF file (e.g. the 1 B-shaped Q4_K_M file of
``bench_8b.py --shape 1b``): PEFT LoRA on the file made dense in fp32 (what a CPU user
without qalora trains), qalora on the file's own quantized layers as imported (default
config: pooled adapter and trained offsets; layers of a fixed-offset type get no adapter),
and random token batches.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

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
    ap.add_argument("--gguf", default=None, help="a GGUF file to compare on instead of SmolLM2 (see above)")
    ap.add_argument("--fp32-only", action="store_true", help="skip the bf16 autocast rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 6)
    print(f"machine: {machine()}")
    if args.gguf:
        dense = load_model(args.gguf, dense=True)  # every layer dense fp32
        name = os.path.basename(args.gguf)
        vocab = dense.model.config.vocab_size
        batches = torch.randint(0, vocab, (8, BATCH, BLOCK), generator=torch.Generator().manual_seed(0))
        imported = qalora.load_gguf(args.gguf, show_progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qalora.QALoRAWarning)  # fixed-offset layers: no adapter
            qalora.wrap(imported.model, qalora.QALoRAConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS))
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
        models = {"PEFT LoRA (dense)": peft.get_peft_model(dense.model, config), "qalora 4-bit g32": imported.model}
        layers = dense.model.config.num_hidden_layers
    else:
        lm = load_model("smollm2", dense=True)  # dense fp32 layers (the bundled file is Q4_1)
        name = "SmolLM2-135M"
        blocks = datasets.token_blocks(lm.tokenizer, datasets.bundled_dataset().train, BLOCK, max_blocks=BATCH * 8)
        batches = blocks.view(-1, BATCH, BLOCK)
        models = {"PEFT LoRA (dense)": peft_model(lm.model), "qalora 4-bit g32": qalora_model(lm.model)}
        layers = lm.model.config.num_hidden_layers
    print(
        f"{name}, rank {RANK} on {len(TARGETS)} projections x {layers} layers, "
        f"batch {BATCH}x{BLOCK} tokens, AdamW, {torch.get_num_threads()} torch threads; "
        f"median of {steps} steps after {args.warmup} warm-up steps\n"
    )
    print(f"{'precision':<10} {'PEFT LoRA (dense)':>18} {'qalora 4-bit g32':>17} {'qalora / PEFT':>14}")
    results = {}
    for bf16 in (False,) if args.fp32_only else (False, True):
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
    if args.fp32_only:
        return
    (pf, qf), (pb, qb) = results["fp32"], results["bf16"]
    print(
        f"\nbf16 autocast vs fp32: PEFT {pf / pb:.2f}x faster, qalora {qf / qb:.2f}x faster; "
        f"qalora bf16 / PEFT fp32 = {qb / pf:.2f}x"
    )


if __name__ == "__main__":
    main()
