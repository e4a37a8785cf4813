"""``qalora finetune`` / ``demo`` (quantize, wrap, train, merge, save, report) and ``qalora eval``."""

from __future__ import annotations

import os
import platform

import torch

from .. import datasets
from ..checkpoint import save_adapter
from ..config import QALoRAConfig
from ..io import atomic_write_json, atomic_write_text
from ..loaders import load_model, save_for_reload
from ..state import state_of
from ..train import finetune, perplexity
from ..wrapping import merge, summary, wrap
from .report import plot_losses, report_markdown


def token_splits(tokenizer, splits, block_size: int, eval_blocks: int, train_blocks: int):
    train = datasets.token_blocks(tokenizer, splits.train, block_size, max_blocks=train_blocks)
    heldout = datasets.token_blocks(tokenizer, splits.heldout, block_size, max_blocks=eval_blocks)
    return train, heldout


def qalora_state_quantization(model) -> dict:
    """The quantizer and, for GPTQ, its time and per-layer errors (from the model's state)."""
    state = state_of(model)
    return dict(state.quantization) if state is not None else {}


def run_finetune(args) -> dict:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)
    splits = datasets.load_dataset(args.data, args.heldout)  # bad data fails before the slow load
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    train_blocks, heldout = token_splits(tok, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size)
    print(
        f"qalora: model {lm.source} loaded in {lm.load_seconds:.1f}s; data {splits.name}: "
        f"{len(train_blocks)} training and {len(heldout)} held-out blocks of {args.block_size} tokens"
    )
    ppl_dense = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: dense model")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = QALoRAConfig(
        bits=args.bits,
        group_size=args.group_size,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        scale_dtype=args.scale_dtype,
        on_indivisible="raise",
        quantizer=args.quantizer,
        damp_percent=args.damp_percent,
        act_order=args.act_order,
    )
    calibration = None
    if args.quantizer == "gptq":  # GPTQ calibrates on blocks of the training data
        calibration = datasets.token_blocks(tok, splits.train, args.block_size, max_blocks=args.calibration_blocks)
    wrap(model, config, calibration=calibration)
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
        "quantization": qalora_state_quantization(model),
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
    atomic_write_text(report["outputs"]["report_md"], report_markdown(report))
    print(report_markdown(report))
    return report


def run_eval(args) -> float:
    splits = datasets.load_dataset(args.data, args.heldout)
    lm = load_model(args.model)
    heldout = datasets.token_blocks(lm.tokenizer, splits.heldout, args.block_size, max_blocks=args.eval_blocks)
    return perplexity(lm.model, heldout, batch_size=args.batch_size)
