"""``qalora finetune`` / ``demo`` (quantize, wrap, train, merge, save, report) and ``qalora eval``."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings

import torch

from .. import cli, datasets, distributed, embeddings
from ..checkpoint import save_adapter, save_pretrained
from ..config import QALoRAConfig
from ..errors import DataError, GroupSizeError, NoTargetModulesError, QALoRAWarning
from ..io import atomic_directory, atomic_write_json, atomic_write_text
from ..layers import QALoRALinear, QuantLinear
from ..loaders import load_model
from ..state import state_of
from ..targets import quantized_layers
from ..train import finetune, perplexity
from ..wrapping import checked_targets, memory_bytes, merge, summary, wrap
from .report import dense_parts, plot_losses, report_markdown

CLI_HINT = "On the command line: --exclude NAME[,NAME...] leaves layers dense; --on-indivisible skip leaves every such layer dense."


def token_splits(tokenizer, splits, block_size: int, eval_blocks: int, train_blocks: int, chat=None):
    """The training and held-out token blocks; a split too short for one block is named, with
    the options that help. Chat data (any chat record) needs ``chat``, a dict of
    :func:`qalora.datasets.chat_blocks`'s ``packing`` and ``all_tokens``, and then gives
    :class:`~qalora.datasets.LabeledBlocks`."""
    if splits.is_chat and chat is None:
        raise DataError(
            f"{splits.name} holds chat records ('messages' or 'prompt'/'completion'); this command takes text data "
            f"('text' or 'instruction'/'response' records, or a .txt file); qalora finetune trains on chat data"
        )
    out = []
    for name, texts, limit in (("training", splits.train, train_blocks), ("held-out", splits.heldout, eval_blocks)):
        if splits.is_chat:  # its errors name the record, or the block size that would help
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", QALoRAWarning)  # said below, naming the split
                    blocks = datasets.chat_blocks(tokenizer, texts, block_size, max_blocks=limit, **chat)
            except DataError as e:
                raise DataError(f"the {name} split of {splits.name}: {e}") from None
            for note in blocks.notes:
                warnings.warn(QALoRAWarning(f"the {name} split of {splits.name}: {note}"), stacklevel=2)
            out.append(blocks)
            continue
        try:
            out.append(datasets.token_blocks(tokenizer, texts, block_size, max_blocks=limit))
        except DataError as e:
            hint = (
                "the held-out split is --heldout, or without it the data's last 10%: give more text, a separate "
                "--heldout file, or a smaller --block-size"
                if name == "held-out"
                else "give more data or a smaller --block-size"
            )
            raise DataError(f"the {name} split of {splits.name}: {e}; {hint}") from None
    return out[0], out[1]


def ids_and_labels(blocks):
    """(token ids, labels or None): what :func:`qalora.train.finetune` and ``perplexity`` take."""
    if isinstance(blocks, datasets.LabeledBlocks):
        return blocks.input_ids, blocks.labels
    return blocks, None


def chat_options(args) -> dict:
    return {
        "packing": getattr(args, "packing", "pack"),
        "all_tokens": bool(getattr(args, "train_on_all_tokens", False)),
    }


def check_settings_fit(model, config: QALoRAConfig) -> None:
    """The layer checks :func:`qalora.wrap` makes, run before any evaluation or training so
    that settings that cannot work fail at once, with the command-line options that help."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # wrap itself warns about skipped layers later
            keep, _ = checked_targets(model, config, None)
    except (GroupSizeError, NoTargetModulesError) as e:
        text = str(e).rstrip()
        raise type(e)(f"{text}{'' if text.endswith('.') else '.'} {CLI_HINT}") from None
    embeddings.plan(model, config, keep)  # --quantize-embeddings: its messages name the option


def check_block_size(model, block_size: int) -> None:
    """``--block-size`` within the positions the model takes (a model with learned position
    embeddings would fail inside its forward pass otherwise)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < block_size:
            raise cli.UsageError(
                f"--block-size {block_size}: the model takes at most {limit} positions ({key}); give a "
                f"--block-size of at most {limit}"
            )


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
        fixed_offset_layers=getattr(args, "fixed_offset_layers", "skip"),
        quantizer=args.quantizer,
        damp_percent=args.damp_percent,
        train_scales=args.train_scales,
        train_offsets=args.train_offsets,
        train_norms=args.train_norms,
        offset_lr_scale=args.offset_lr_scale,
        scale_lr_scale=args.scale_lr_scale,
        act_order=args.act_order,
        quantize_embeddings=getattr(args, "quantize_embeddings", False),
    )


def qalora_state_quantization(model) -> dict:
    """The quantizer and, for GPTQ, its time and per-layer errors (from the model's state)."""
    state = state_of(model)
    return dict(state.quantization) if state is not None else {}


def prompt_hint(texts) -> str:
    """A prompt in the style of the data the model was tuned on: the start of the first
    non-empty held-out line (at most 40 characters, cut at a word); for chat records, of the
    first user message (or prompt)."""
    for record in texts:
        if isinstance(record, datasets.Conversation):
            text = next((m["content"] for m in record.messages if m["role"] == "user"), "")
        elif isinstance(record, datasets.PromptCompletion):
            text = record.prompt
        else:
            text = record
        for line in str(text).splitlines():
            line = line.strip()
            if line:
                return line if len(line) <= 40 else line[:40].rsplit(" ", 1)[0]
    return "Hello"


def layer_layouts(model) -> dict[str, int]:
    """How many quantized linear layers the model holds at each bits / group size."""
    counts: dict[str, int] = {}
    for _, layer in quantized_layers(model):
        base = getattr(layer, "base_layer", layer)
        key = f"{base.bits}-bit g{base.group_size}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def run_finetune(args) -> dict:
    out = os.path.abspath(args.out)
    writer = distributed.is_main_process()  # several processes: rank 0 prints and writes
    torch.manual_seed(args.seed)
    config = run_config(args)
    splits = datasets.load_dataset(args.data, args.heldout)  # bad data fails before the slow load
    # A GGUF model arrives with its layers already quantized (its own codes): wrap then only
    # adds adapters, and --bits / --group-size apply to layers the file holds dense. GPTQ
    # quantizes from the dense weights, so for it the file's layers are dequantized first.
    dense = args.quantizer == "gptq" or getattr(args, "requantize", False)
    lm = distributed.main_process_first(lambda: load_model(args.model, dense=dense))
    model, tok = lm.model, lm.tokenizer
    check_settings_fit(model, config)
    check_block_size(model, args.block_size)
    loaded_quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    gguf_name = getattr(args, "gguf", None)
    if gguf_name:
        from ..formats.gguf_export import check_exportable

        check_exportable(model, tok)  # refuse before training, not after
    chat = chat_options(args) if splits.is_chat else None
    train_data, heldout_data = token_splits(
        tok, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size, chat=chat
    )
    train_blocks, train_labels = ids_and_labels(train_data)
    heldout, heldout_labels = ids_and_labels(heldout_data)
    if writer:
        what = ""
        if chat is not None:
            what = (
                f" ({train_data.examples} and {heldout_data.examples} examples, {'packed' if chat['packing'] == 'pack' else 'padded'}; loss and "
                f"perplexity on {'every token' if chat['all_tokens'] else 'the assistant tokens'})"
            )
        print(
            f"qalora: model {lm.source} loaded in {lm.load_seconds:.1f}s; data {splits.name}: "
            f"{len(train_blocks)} training and {len(heldout)} held-out blocks of {args.block_size} tokens{what}"
        )
    ppl_dense = perplexity(
        model,
        heldout,
        batch_size=args.batch_size,
        desc="perplexity: model as loaded" if loaded_quantized else "perplexity: dense model",
        labels=heldout_labels,
    )
    loaded_bytes = memory_bytes(model)  # parameters and buffers (quantized layers included)
    calibration = None
    if args.quantizer == "gptq" and chat is not None:  # GPTQ calibrates on blocks of the training data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QALoRAWarning)  # already said for the training split
            calibration = datasets.chat_blocks(
                tok, splits.train, args.block_size, max_blocks=args.calibration_blocks, **chat
            ).input_ids
    elif args.quantizer == "gptq":
        calibration = datasets.token_blocks(tok, splits.train, args.block_size, max_blocks=args.calibration_blocks)
    wrap(model, config, calibration=calibration)
    info = summary(model)
    imported = state_of(model).source.get("layers", {})
    unchanged = imported and all(name in imported for name, _ in quantized_layers(model, QALoRALinear))
    if unchanged and not config.quantize_embeddings:
        ppl_quant = ppl_dense  # zero-initialised adapters on the file's own layers: nothing changed
    else:
        ppl_quant = perplexity(
            model, heldout, batch_size=args.batch_size, desc="perplexity: quantized base", labels=heldout_labels
        )
    result = finetune(
        model,
        train_blocks,
        args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=bool(getattr(args, "bf16", False)),
        force_bf16=bool(getattr(args, "force_bf16", False)),
        labels=train_labels,
    )
    ppl_adapted = perplexity(
        model, heldout, batch_size=args.batch_size, desc="perplexity: with adapters", labels=heldout_labels
    )
    outputs = {
        "model_dir": os.path.join(out, "model"),
        "adapter_dir": os.path.join(out, "adapter"),
        "loss_curve": os.path.join(out, "loss_curve.png") if cli.plotting_available() else None,
        "report_json": os.path.join(out, "report.json"),
        "report_md": os.path.join(out, "report.md"),
        "gguf": (gguf_name if os.path.isabs(gguf_name) else os.path.join(out, gguf_name)) if gguf_name else None,
    }
    # Everything is written into a directory beside --out and swapped in at the end: a run
    # that fails leaves --out as it was. Launched as several processes, every rank merges and
    # evaluates (a shared computation) and rank 0 alone writes.
    with atomic_directory(out) if writer else contextlib.nullcontext() as work:
        if writer:
            save_adapter(model, os.path.join(work, "adapter"))
        merge(model)
        ppl_merged = perplexity(
            model, heldout, batch_size=args.batch_size, desc="perplexity: merged", labels=heldout_labels
        )
        if not writer:
            return {"outputs": outputs}
        save_pretrained(model, os.path.join(work, "model"), tokenizer=tok)
        gguf_report = None
        if outputs["gguf"]:
            from .export import write_gguf

            inside = not os.path.isabs(gguf_name)  # written with the rest, or where the user asked
            gguf_report = write_gguf(
                model, tok, os.path.join(work, gguf_name) if inside else gguf_name, other_type=args.other_type
            )
            # The file is written inside the temporary sibling of --out: name its final place.
            gguf_summary = gguf_report.summary().replace(work, out)
            print(gguf_summary)
        merged_info = summary(model)
        if outputs["loss_curve"]:
            plot_losses(
                {"QA-LoRA": result.losses},
                os.path.join(work, "loss_curve.png"),
                f"{', '.join(layer_layouts(model)) or f'{args.bits}-bit g{args.group_size}'}, rank {args.rank}",
            )
        report = {
            "model": lm.source,
            "data": splits.name,
            "config": config.to_dict(),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "block_size": args.block_size,
            "learning_rate": args.lr,
            "bf16_autocast": result.bf16,
            "heldout_blocks": len(heldout),
            "chat": None
            if chat is None
            else {
                "packing": chat["packing"],
                "loss_tokens": "all" if chat["all_tokens"] else "assistant",
                "training_examples": train_data.examples,
                "heldout_examples": heldout_data.examples,
                "truncated_examples": train_data.truncated + heldout_data.truncated,
                "chat_template": bool(datasets.has_chat_template(tok)),
            },
            "loaded_quantized": loaded_quantized,
            "layer_layouts": layer_layouts(model),
            "prompt_hint": prompt_hint(splits.heldout),
            "heldout_perplexity": {
                "dense_fp32": ppl_dense,
                "quantized_base": ppl_quant,
                "qalora_unmerged": ppl_adapted,
                "qalora_merged": ppl_merged,
            },
            "merge_perplexity_change": ppl_merged / ppl_adapted - 1,
            "merge_rounding": dict(state_of(model).merge_rounding),
            "quantization": qalora_state_quantization(model),
            "trainable_params": info.trainable_params,
            "total_params": info.total_params,
            "memory_bytes": {"loaded": loaded_bytes, "wrapped": info.memory_bytes, "merged": merged_info.memory_bytes},
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
        if gguf_report is not None:
            report["gguf"] = {
                "path": outputs["gguf"],
                "summary": gguf_summary,
                "bytes": gguf_report.bytes,
                "tensors": {h: gguf_report.count(h) for h in ("copied", "exact", "rounded", "converted", "dense")},
                "max_param_rel_change": gguf_report.max_param_rel_change,
                "max_rel_error": gguf_report.max_rel_error,
            }
        atomic_write_json(os.path.join(work, "report.json"), report)
        atomic_write_text(os.path.join(work, "report.md"), report_markdown(report))
    print(report_markdown(report))
    return report


def run_eval(args) -> float:
    """Perplexity on the text asked for: a ``--data`` file whole (or ``--heldout``'s), and
    without either the bundled data's held-out split (what finetune evaluates). Chat data is
    scored as finetune scores it by default: packed, on the assistant's tokens."""
    if args.heldout:
        texts, name = datasets.read_texts(args.heldout), args.heldout
    elif args.data not in (None, datasets.BUNDLED):
        texts, name = datasets.read_texts(args.data), args.data
    else:
        texts, name = datasets.load_dataset(None).heldout, datasets.BUNDLED
    lm = distributed.main_process_first(lambda: load_model(args.model))
    check_block_size(lm.model, args.block_size)
    if datasets.is_chat(texts):
        blocks = datasets.chat_blocks(lm.tokenizer, texts, args.block_size, max_blocks=args.eval_blocks)
        return perplexity(lm.model, blocks.input_ids, batch_size=args.batch_size, labels=blocks.labels)
    try:
        heldout = datasets.token_blocks(lm.tokenizer, texts, args.block_size, max_blocks=args.eval_blocks)
    except DataError as e:
        raise DataError(f"{os.path.basename(name)}: {e}; give more text or a smaller --block-size") from None
    return perplexity(lm.model, heldout, batch_size=args.batch_size)
