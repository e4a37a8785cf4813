"""Greedy generation with SmolLM2-135M on CPU: transformers' ``generate`` on the dense fp32
model against the same model quantized by qalora (4-bit, group 32, every linear layer but the
head; merged, as a fine-tuned model is shipped), in one run.

qalora settings: the small-batch route of the quantized layers (``exact``, ``bf16``, ``int8``:
the tiled int8 layout), the output head dense fp32 or quantized at 4 bits
(``qalora.prepare_for_generation(head_bits=4)``), and optionally a static KV cache with the
forward compiled by ``torch.compile`` (``--compile``).

For each: prompt processing (one forward over the prompt) and decoding (the new tokens after
the first) are timed separately and reported as tokens per second; the greedy tokens are
compared with the dense model's. Models alternate run by run; medians of the runs.

    python benches/bench_generate.py [--quick] [--new-tokens 48] [--compile]
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

PROMPT_TOKENS = 16


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, float, torch.Tensor]:
    """(prompt seconds, decode seconds for new_tokens - 1 tokens, tokens)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=prompt)
        t_prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        t_gen = time.perf_counter() - t0
    # generate = prompt forward (first new token) + new_tokens - 1 decode steps.
    return t_prompt, max(t_gen - t_prompt, 1e-9), out[0, prompt.shape[1] :]


def compiled(model):
    """Static KV cache and the decode forward compiled (transformers' own compile hook,
    enabled on CPU)."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, dynamic=False)
    cc._compile_all_devices = True  # transformers compiles on accelerators only by default
    model.generation_config.compile_config = cc
    model.generation_config.cache_implementation = "static"
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs and settings")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also a static cache + torch.compile setting")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = args.runs or (2 if args.quick else 3)
    print(f"machine: {machine()}")
    lm = load_model("smollm2", dense=True)  # dense fp32 layers (the bundled file is Q4_1)
    dense = lm.model.eval()
    text = " ".join(datasets.bundled_dataset().heldout)
    prompt = lm.tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]

    def quantized(activations: str, head_bits: int | None):
        m = copy.deepcopy(dense)
        qalora.wrap(m, qalora.QALoRAConfig(bits=4, group_size=32), show_progress=False)
        qalora.merge(m)
        return qalora.prepare_for_generation(m, activations=activations, head_bits=head_bits)

    settings = {"dense fp32 (transformers)": dense}
    variants = (
        [("int8", 4), ("int8", None)]
        if args.quick
        else [
            ("exact", None),
            ("bf16", None),
            ("int8", None),
            ("exact", 4),
            ("int8", 4),
        ]
    )
    for act, head in variants:
        settings[f"qalora {act}, head {'4-bit' if head else 'fp32'}"] = quantized(act, head)
    if args.compile:
        settings["qalora int8, head 4-bit, static cache + compile"] = compiled(quantized("int8", 4))
    print(
        f"SmolLM2-135M, prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens (greedy), batch 1, "
        f"{torch.get_num_threads()} torch threads; median of {runs} runs after one warm-up run\n"
    )
    times = {name: ([], []) for name in settings}
    tokens = {}
    for r in range(runs + 1):
        for name, model in settings.items():
            tp, td, toks = timed_generate(model, prompt, args.new_tokens)
            if r > 0:
                times[name][0].append(tp)
                times[name][1].append(td)
            tokens[name] = toks
    ref_tokens = tokens["dense fp32 (transformers)"]
    base_decode = None
    header = f"{'setting':<50} {'prompt tok/s':>12} {'decode tok/s':>12} {'vs dense':>8} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    for name in settings:
        tp, td = statistics.median(times[name][0]), statistics.median(times[name][1])
        prompt_tps, decode_tps = PROMPT_TOKENS / tp, (args.new_tokens - 1) / td
        base_decode = base_decode or decode_tps
        same = int((tokens[name] == ref_tokens).cumprod(0).sum())
        print(
            f"{name:<50} {prompt_tps:>12.1f} {decode_tps:>12.1f} {decode_tps / base_decode:>7.2f}x "
            f"{same:>5}/{args.new_tokens}",
            flush=True,
        )
    print("\nsame tokens: how many leading greedy tokens equal the dense model's.")


if __name__ == "__main__":
    main()
