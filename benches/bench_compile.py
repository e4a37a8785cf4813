"""Eager vs torch.compile on SmolLM2-135M (the bundled GGUF), 4-bit g = 32, on CPU:

* training step: the wrapped model (QA-LoRA rank 16 on every projection), batch 4 x 128
  tokens, forward + backward + AdamW step; compiled with torch.compile(fullgraph=True);
* generation: the merged model, greedy decoding with a static KV cache, prompt (prefill) and
  per-token decode timed separately; the compiled run compiles the model's forward
  (fullgraph=True), once for the prompt's shape and once for one token.

Both use the same qalora custom ops (torch.ops.qalora.*): the compiled graphs call them as
extern kernels and fuse what lies between them. Compile time is reported separately (the
first calls); the timed calls come after warm-up. Ratios are eager time / compiled time.

    python benches/bench_compile.py [--quick] [--layers N]
"""

from __future__ import annotations

import argparse
import os
import time

import qalora
import torch
from _common import machine, median_time

os.environ.setdefault("QALORA_NO_PROGRESS", "1")

BATCH, SEQ, RANK, PROMPT = 4, 128, 16, 16


def load(layers: int | None):
    from qalora.loaders import load_model

    lm = load_model()
    model = lm.model
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model, lm.tokenizer


def train_step_times(model, steps_timed: int) -> dict:
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=RANK, alpha=2 * RANK, dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step(fn):
        def run(i):
            loss = fn(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    eager = median_time(step(model), steps_timed, warmup=1)
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    step(compiled)(0)  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    comp = median_time(step(compiled), steps_timed, warmup=1)
    torch._dynamo.reset()
    return {"eager_s": eager, "compiled_s": comp, "compile_s": compile_s}


def generation_times(model, new_tokens: int) -> dict:
    from transformers import StaticCache

    qalora.merge(model)
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))

    def generate(forward):
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + new_tokens + 1)
        t0 = time.perf_counter()
        pos = torch.arange(PROMPT)
        logits = forward(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        tokens = [token]
        for i in range(new_tokens - 1):
            pos = torch.tensor([PROMPT + i])
            logits = forward(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        t2 = time.perf_counter()
        return torch.cat(tokens, 1), t1 - t0, (t2 - t1) / (new_tokens - 1)

    with torch.no_grad():
        generate(model.forward)  # warm-up
        eager_tokens, eager_prefill, eager_decode = min((generate(model.forward) for _ in range(3)), key=lambda r: r[2])
        compiled = torch.compile(model.forward, fullgraph=True)
        t0 = time.perf_counter()
        generate(compiled)  # compiles the prompt's shape and the one-token shape
        compile_s = time.perf_counter() - t0
        comp_tokens, comp_prefill, comp_decode = min((generate(compiled) for _ in range(3)), key=lambda r: r[2])
    torch._dynamo.reset()
    return {
        "same_tokens": bool(torch.equal(eager_tokens, comp_tokens)),
        "eager_prefill_s": eager_prefill,
        "compiled_prefill_s": comp_prefill,
        "eager_decode_s": eager_decode,
        "compiled_decode_s": comp_decode,
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps and tokens")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    model, _ = load(args.layers)
    layers = model.config.num_hidden_layers
    train = train_step_times(model, 3 if args.quick else 7)
    gen = generation_times(model, 16 if args.quick else 48)
    print(f"\nSmolLM2-135M ({layers} layers), 4-bit g32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | eager | compiled | eager / compiled | compile time |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| training step (batch {BATCH}x{SEQ}, fwd+bwd+AdamW) | {train['eager_s'] * 1e3:.0f} ms | "
        f"{train['compiled_s'] * 1e3:.0f} ms | {train['eager_s'] / train['compiled_s']:.2f}x | {train['compile_s']:.0f} s |"
    )
    print(
        f"| generation: prompt of {PROMPT} tokens | {gen['eager_prefill_s'] * 1e3:.1f} ms | "
        f"{gen['compiled_prefill_s'] * 1e3:.1f} ms | {gen['eager_prefill_s'] / gen['compiled_prefill_s']:.2f}x | "
        f"{gen['compile_s']:.0f} s (both shapes) |"
    )
    print(
        f"| generation: decode, per token | {gen['eager_decode_s'] * 1e3:.1f} ms "
        f"({1 / gen['eager_decode_s']:.1f} tok/s) | {gen['compiled_decode_s'] * 1e3:.1f} ms "
        f"({1 / gen['compiled_decode_s']:.1f} tok/s) | {gen['eager_decode_s'] / gen['compiled_decode_s']:.2f}x | |"
    )
    print(f"\ngreedy tokens identical eager vs compiled: {gen['same_tokens']}")


if __name__ == "__main__":
    main()
