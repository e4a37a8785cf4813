"""What the command line runs: finetune (quantize, wrap, train, merge, save, report),
eval, and the QA-LoRA vs QLoRA-style comparison."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from typing import Dict, List

import torch
from torch import nn

from . import data as data_mod
from .config import QALoRAConfig
from .io import atomic_path, atomic_write_json, atomic_write_text
from .model import merge, merge_requantize, save_adapter, summary, wrap
from .models import load_model, save_for_reload
from .train import finetune, perplexity


def _blocks(tokenizer, splits, block_size: int, eval_blocks: int, train_blocks: int):
    train = data_mod.token_blocks(tokenizer, splits.train, block_size, max_blocks=train_blocks)
    heldout = data_mod.token_blocks(tokenizer, splits.heldout, block_size, max_blocks=eval_blocks)
    return train, heldout


def plot_losses(curves: Dict[str, List[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, losses in curves.items():
        steps = range(1, len(losses) + 1)
        line, = ax.plot(steps, losses, label=label, alpha=0.35 if len(losses) > 10 else 0.9)
        if len(losses) > 10:  # the raw curve is noisy at small batch sizes: overlay a moving average
            smooth, acc = [], losses[0]
            for v in losses:
                acc = 0.8 * acc + 0.2 * v
                smooth.append(acc)
            ax.plot(steps, smooth, color=line.get_color(), linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_finetune(args) -> Dict:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)
    splits = data_mod.load_dataset(args.data, args.heldout)  # bad data fails before the slow load
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    train_blocks, heldout = _blocks(tok, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size)
    print(f"qalora: model {lm.source} loaded in {lm.load_seconds:.1f}s; data {splits.name}: "
          f"{len(train_blocks)} training and {len(heldout)} held-out blocks of {args.block_size} tokens")
    ppl_dense = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: dense model")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = QALoRAConfig(
        bits=args.bits, group_size=args.group_size, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        scale_dtype=args.scale_dtype, on_indivisible="raise",
    )
    wrap(model, config)
    info = summary(model)
    ppl_quant = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: quantized base")
    result = finetune(model, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    ppl_adapted = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: with adapters")
    adapter_dir = os.path.join(out, "adapter")
    save_adapter(model, adapter_dir)
    merge(model)
    ppl_merged = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: merged")
    model_dir = os.path.join(out, "model")
    save_for_reload(model, tok, model_dir)
    merged_info = summary(model)
    loss_png = os.path.join(out, "loss_curve.png")
    plot_losses({"QA-LoRA": result.losses}, loss_png, f"{args.bits}-bit, group {args.group_size}, rank {args.rank}")
    report = {
        "model": lm.source,
        "data": splits.name,
        "config": config.to_dict(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "learning_rate": args.lr,
        "heldout_blocks": len(heldout),
        "heldout_perplexity": {
            "dense_fp32": ppl_dense,
            "quantized_base": ppl_quant,
            "qalora_unmerged": ppl_adapted,
            "qalora_merged": ppl_merged,
        },
        "merge_perplexity_change": ppl_merged / ppl_adapted - 1,
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "memory_bytes": {"dense": dense_bytes, "wrapped": info.memory_bytes, "merged": merged_info.memory_bytes},
        "seconds_per_step": result.seconds_per_step,
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "outputs": {
            "model_dir": model_dir,
            "adapter_dir": adapter_dir,
            "loss_curve": loss_png,
            "report_json": os.path.join(out, "report.json"),
            "report_md": os.path.join(out, "report.md"),
        },
    }
    atomic_write_json(report["outputs"]["report_json"], report)
    atomic_write_text(report["outputs"]["report_md"], _report_markdown(report))
    print(_report_markdown(report))
    return report


def _report_markdown(r: Dict) -> str:
    p = r["heldout_perplexity"]
    mib = 1 << 20
    c = r["config"]
    return "\n".join(
        [
            f"# qalora fine-tuning report",
            "",
            f"Model `{os.path.basename(r['model'])}`, data `{r['data']}`, {c['bits']}-bit, group size {c['group_size']}, "
            f"rank {c['rank']}, alpha {c['alpha']}, {r['steps']} steps of {r['batch_size']}×{r['block_size']} tokens, lr {r['learning_rate']}.",
            "",
            "| held-out perplexity | value |",
            "| --- | --- |",
            f"| dense fp32 model | {p['dense_fp32']:.3f} |",
            f"| quantized base (RTN) | {p['quantized_base']:.3f} |",
            f"| QA-LoRA, adapters unmerged | {p['qalora_unmerged']:.3f} |",
            f"| QA-LoRA, merged into the low-bit weights | {p['qalora_merged']:.3f} |",
            "",
            f"Merge changed perplexity by {100 * r['merge_perplexity_change']:+.4f}% (fp16 rounding of the offsets only).",
            "",
            f"- trainable parameters: {r['trainable_params']:,} of {r['total_params']:,}",
            f"- memory: dense {r['memory_bytes']['dense'] / mib:.1f} MiB, wrapped {r['memory_bytes']['wrapped'] / mib:.1f} MiB, "
            f"merged {r['memory_bytes']['merged'] / mib:.1f} MiB",
            f"- time per step: {r['seconds_per_step']:.2f} s ({r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads)",
            f"- final training loss: {r['final_loss']:.3f}",
            "",
        ]
    )


def run_eval(args) -> float:
    splits = data_mod.load_dataset(args.data, args.heldout)
    lm = load_model(args.model)
    heldout = data_mod.token_blocks(lm.tokenizer, splits.heldout, args.block_size, max_blocks=args.eval_blocks)
    return perplexity(lm.model, heldout, batch_size=args.batch_size)


# --------------------------------------------------------------------------- compare


class DenseLoRALinear(nn.Module):
    """Standard LoRA on an unquantized linear layer: the fp32 reference row."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _dense_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, DenseLoRALinear(m, rank, alpha))
    return model


def run_compare(args) -> Dict:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    settings = []
    for item in args.settings.split(","):
        bits, _, g = item.partition(":")
        settings.append((int(bits), int(g)))
    lm = load_model(args.model)
    splits = data_mod.load_dataset(args.data)
    train_blocks, heldout = _blocks(lm.tokenizer, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size)

    def fresh():
        return copy.deepcopy(lm.model)  # lm.model itself is never wrapped

    ppl = lambda m, d: perplexity(m, heldout, batch_size=args.batch_size, desc=f"perplexity: {d}")  # noqa: E731
    train = lambda m, d: finetune(m, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, desc=f"train: {d}")  # noqa: E731
    started = time.time()
    rows: List[Dict] = []
    curves: Dict[str, List[float]] = {}
    m = fresh()
    fp32 = ppl(m, "fp32")
    rows.append({"setting": "-", "method": "fp32 model", "heldout_ppl": fp32})
    _dense_lora(m, args.rank, args.alpha)
    r = train(m, "fp32 LoRA")
    curves["fp32 LoRA"] = r.losses
    rows.append({"setting": "-", "method": "fp32 LoRA (reference)", "heldout_ppl": ppl(m, "fp32 LoRA")})
    del m
    for bits, g in settings:
        tag = f"{bits}-bit g{g}"
        cfg = dict(bits=bits, group_size=g, rank=args.rank, alpha=args.alpha)
        m = wrap(fresh(), QALoRAConfig(**cfg))
        rows.append({"setting": tag, "method": "RTN quantized base", "heldout_ppl": ppl(m, f"{tag} RTN")})
        r = train(m, f"{tag} QA-LoRA")
        curves[f"{tag} QA-LoRA"] = r.losses
        unmerged = ppl(m, f"{tag} QA-LoRA")
        rows.append({"setting": tag, "method": "QA-LoRA, before merge", "heldout_ppl": unmerged})
        merge(m)
        rows.append({"setting": tag, "method": "QA-LoRA, merged (deployed)", "heldout_ppl": ppl(m, f"{tag} merged")})
        del m
        m = wrap(fresh(), QALoRAConfig(adapter="lora", **cfg))
        r = train(m, f"{tag} LoRA")
        curves[f"{tag} QLoRA-style"] = r.losses
        rows.append({"setting": tag, "method": "QLoRA-style, before merge", "heldout_ppl": ppl(m, f"{tag} LoRA")})
        merge_requantize(m)
        rows.append({"setting": tag, "method": "QLoRA-style, merged + re-quantized (deployed)", "heldout_ppl": ppl(m, f"{tag} requant")})
        del m
    result = {
        "model": lm.source,
        "data": splits.name,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "heldout_blocks": len(heldout),
        "seconds": time.time() - started,
        "rows": rows,
    }
    table = ["| setting | method | held-out perplexity |", "| --- | --- | --- |"]
    table += [f"| {r['setting']} | {r['method']} | {r['heldout_ppl']:.3f} |" for r in rows]
    atomic_write_json(os.path.join(out, "compare.json"), result)
    atomic_write_text(os.path.join(out, "compare.md"), "\n".join(table) + "\n")
    plot_losses(curves, os.path.join(out, "compare_losses.png"), "training loss")
    print("\n".join(table))
    print(f"qalora: comparison written to {out} ({result['seconds'] / 60:.1f} min)")
    return result
