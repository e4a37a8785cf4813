"""``qalora finetune`` / ``demo`` (quantize, wrap, train, merge, save, report) and ``qalora eval``."""

from __future__ import annotations

import os
import platform

import torch

from .. import datasets
from ..checkpoint import save_adapter
from ..config import QALoRAConfig
from ..formats.gguf_export import check_exportable
from ..io import atomic_write_json, atomic_write_text
from ..layers import QALoRALinear, QuantLinear
from ..loaders import load_model, save_for_reload
from ..state import state_of
from ..targets import quantized_layers
from ..train import finetune, perplexity
from ..wrapping import memory_bytes, merge, summary, wrap
from .export import write_gguf
from .report import plot_losses, report_markdown


def token_splits(tokenizer, splits, block_size: int, eval_blocks: int, train_blocks: int):
    train = datasets.token_blocks(tokenizer, splits.train, block_size, max_blocks=train_blocks)
    heldout = datasets.token_blocks(tokenizer, splits.heldout, block_size, max_blocks=eval_blocks)
    return train, heldout


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
    # A GGUF model arrives with its layers already quantized (its own codes); wrap then only
    # adds adapters, and config.bits / group_size apply to layers the file holds dense.
    loaded_quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    gguf_path = None
    if getattr(args, "gguf", None):
        gguf_path = args.gguf if os.path.isabs(args.gguf) else os.path.join(out, args.gguf)
        check_exportable(model, tok)  # refuse before training, not after
    ppl_dense = perplexity(
        model,
        heldout,
        batch_size=args.batch_size,
        desc="perplexity: model as loaded" if loaded_quantized else "perplexity: dense model",
    )
    loaded_bytes = memory_bytes(model)  # parameters and buffers (quantized layers included)
    config = QALoRAConfig(
        bits=args.bits,
        group_size=args.group_size,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        scale_dtype=args.scale_dtype,
        on_indivisible="raise",
    )
    wrap(model, config)
    info = summary(model)
    imported = state_of(model).source.get("layers", {})
    if imported and all(name in imported for name, _ in quantized_layers(model, QALoRALinear)):
        ppl_quant = ppl_dense  # zero-initialised adapters on the file's own layers: nothing changed
    else:
        ppl_quant = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: quantized base")
    result = finetune(model, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    ppl_adapted = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: with adapters")
    adapter_dir = os.path.join(out, "adapter")
    save_adapter(model, adapter_dir)
    merge(model)
    ppl_merged = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: merged")
    model_dir = os.path.join(out, "model")
    save_for_reload(model, tok, model_dir)
    gguf_report = None
    if gguf_path is not None:
        gguf_report = write_gguf(model, tok, gguf_path, other_type=args.other_type)
        print(gguf_report.summary())
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
        "loaded_quantized": loaded_quantized,
        "heldout_perplexity": {
            "dense_fp32": ppl_dense,
            "quantized_base": ppl_quant,
            "qalora_unmerged": ppl_adapted,
            "qalora_merged": ppl_merged,
        },
        "merge_perplexity_change": ppl_merged / ppl_adapted - 1,
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "memory_bytes": {"loaded": loaded_bytes, "wrapped": info.memory_bytes, "merged": merged_info.memory_bytes},
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
            "gguf": gguf_path,
        },
    }
    if gguf_report is not None:
        report["gguf"] = {
            "path": gguf_path,
            "summary": gguf_report.summary(),
            "bytes": gguf_report.bytes,
            "tensors": {how: gguf_report.count(how) for how in ("copied", "exact", "rounded", "converted", "dense")},
            "max_param_rel_change": gguf_report.max_param_rel_change,
            "max_rel_error": gguf_report.max_rel_error,
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
