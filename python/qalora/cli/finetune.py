"""``qalora finetune`` / ``demo`` (quantize, wrap, train, merge, save, report) and ``qalora eval``."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings

import torch

from .. import cli, datasets, distributed
from ..checkpoint import save_adapter, save_pretrained
from ..config import QALoRAConfig
from ..errors import GroupSizeError, NoTargetModulesError
from ..io import atomic_directory, atomic_write_json, atomic_write_text
from ..loaders import load_model
from ..state import state_of
from ..train import finetune, perplexity
from ..wrapping import _checked_targets, merge, summary, wrap
from .report import dense_parts, plot_losses, report_markdown

CLI_HINT = "On the command line: --exclude NAME[,NAME...] leaves layers dense; --on-indivisible skip leaves every such layer dense."


def token_splits(tokenizer, splits, block_size: int, eval_blocks: int, train_blocks: int):
    train = datasets.token_blocks(tokenizer, splits.train, block_size, max_blocks=train_blocks)
    heldout = datasets.token_blocks(tokenizer, splits.heldout, block_size, max_blocks=eval_blocks)
    return train, heldout


def check_settings_fit(model, config: QALoRAConfig) -> None:
    """The layer checks :func:`qalora.wrap` makes, run before any evaluation or training so
    that settings that cannot work fail at once, with the command-line options that help."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # wrap itself warns about skipped layers later
            _checked_targets(model, config, None)
    except (GroupSizeError, NoTargetModulesError) as e:
        text = str(e).rstrip()
        raise type(e)(f"{text}{'' if text.endswith('.') else '.'} {CLI_HINT}") from None


def run_config(args) -> QALoRAConfig:
    return QALoRAConfig(
        bits=args.bits,
        group_size=args.group_size,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        scale_dtype=args.scale_dtype,
        exclude_modules=args.exclude,
        on_indivisible=args.on_indivisible,
    )


def run_finetune(args) -> dict:
    out = os.path.abspath(args.out)
    writer = distributed.is_main_process()  # several processes: rank 0 prints and writes
    torch.manual_seed(args.seed)
    config = run_config(args)
    splits = datasets.load_dataset(args.data, args.heldout)  # bad data fails before the slow load
    lm = distributed.main_process_first(lambda: load_model(args.model))
    model, tok = lm.model, lm.tokenizer
    check_settings_fit(model, config)
    train_blocks, heldout = token_splits(tok, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size)
    if writer:
        print(
            f"qalora: model {lm.source} loaded in {lm.load_seconds:.1f}s; data {splits.name}: "
            f"{len(train_blocks)} training and {len(heldout)} held-out blocks of {args.block_size} tokens"
        )
    ppl_dense = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: dense model")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrap(model, config)
    info = summary(model)
    ppl_quant = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: quantized base")
    result = finetune(model, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    ppl_adapted = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: with adapters")
    outputs = {
        "model_dir": os.path.join(out, "model"),
        "adapter_dir": os.path.join(out, "adapter"),
        "loss_curve": os.path.join(out, "loss_curve.png") if cli.plotting_available() else None,
        "report_json": os.path.join(out, "report.json"),
        "report_md": os.path.join(out, "report.md"),
    }
    # Everything is written into a directory beside --out and swapped in at the end: a run
    # that fails leaves --out as it was. Launched as several processes, every rank merges and
    # evaluates (a shared computation) and rank 0 alone writes.
    with atomic_directory(out) if writer else contextlib.nullcontext() as work:
        if writer:
            save_adapter(model, os.path.join(work, "adapter"))
        merge(model)
        ppl_merged = perplexity(model, heldout, batch_size=args.batch_size, desc="perplexity: merged")
        if not writer:
            return {"outputs": outputs}
        save_pretrained(model, os.path.join(work, "model"), tokenizer=tok)
        merged_info = summary(model)
        if outputs["loss_curve"]:
            plot_losses(
                {"QA-LoRA": result.losses},
                os.path.join(work, "loss_curve.png"),
                f"{args.bits}-bit, group {args.group_size}, rank {args.rank}",
            )
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
            "dense_parts": dense_parts(model),
            "excluded_layers": list(config.exclude_modules or []),
            "skipped_layers": list(state_of(model).skipped),
            "seconds_per_step": result.seconds_per_step,
            "final_loss": result.losses[-1],
            "losses": result.losses,
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "processes": distributed.rank_and_world()[1],
            },
            "outputs": outputs,
        }
        atomic_write_json(os.path.join(work, "report.json"), report)
        atomic_write_text(os.path.join(work, "report.md"), report_markdown(report))
    print(report_markdown(report))
    return report


def run_eval(args) -> float:
    splits = datasets.load_dataset(args.data, args.heldout)
    lm = distributed.main_process_first(lambda: load_model(args.model))
    heldout = datasets.token_blocks(lm.tokenizer, splits.heldout, args.block_size, max_blocks=args.eval_blocks)
    return perplexity(lm.model, heldout, batch_size=args.batch_size)
