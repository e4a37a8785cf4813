"""What a run leaves behind for a person: the loss-curve plot and the Markdown report."""

from __future__ import annotations

import os

from ..io import atomic_path


def smoothed(losses: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average (the raw per-step loss is noisy at small batch sizes)."""
    out, acc = [], losses[0] if losses else 0.0
    for v in losses:
        acc = weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def plot_losses(curves: dict[str, list[float]], path: str, title: str) -> None:
    """One faint line per curve for the per-step loss and a solid one for its moving
    average, each in the legend; axes labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for label, losses in curves.items():
        steps = range(1, len(losses) + 1)
        (line,) = ax.plot(steps, losses, alpha=0.35, linewidth=1, label=f"{label}: loss per step")
        ax.plot(steps, smoothed(losses), color=line.get_color(), linewidth=2, label=f"{label}: moving average (0.8)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def dense_parts(model) -> list[dict]:
    """The tensors a wrapped or merged model keeps dense (outside qalora's quantized layers),
    grouped by module, with a note on why each kind stays dense."""
    from torch import nn

    from ..layers import QALoRALinear, QuantLinear
    from ..targets import is_linear_like, output_head_names

    heads = output_head_names(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QALoRALinear))]
    seen: dict[int, str] = {}
    parts = []
    other_params = other_bytes = 0
    for name, module in model.named_modules():
        if any(name == q or name.startswith(q + ".") for q in quantized):
            continue
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        size = sum(p.numel() for p in own)
        nbytes = sum(p.numel() * p.element_size() for p in own)
        key = own[0].data_ptr()
        if isinstance(module, nn.Embedding) or (is_linear_like(module) and name in heads):
            kind = "embedding" if isinstance(module, nn.Embedding) else "output head"
            tied = seen.get(key)
            seen.setdefault(key, name)
            parts.append(
                {
                    "name": name,
                    "kind": kind,
                    "shape": list(own[0].shape),
                    "dtype": str(own[0].dtype).replace("torch.", ""),
                    "params": 0 if tied else size,
                    "bytes": 0 if tied else nbytes,
                    "tied_to": tied,
                }
            )
        elif is_linear_like(module):
            parts.append(
                {
                    "name": name,
                    "kind": "linear left dense (excluded or indivisible)",
                    "shape": list(own[0].shape),
                    "dtype": str(own[0].dtype).replace("torch.", ""),
                    "params": size,
                    "bytes": nbytes,
                    "tied_to": None,
                }
            )
        else:
            other_params += size
            other_bytes += nbytes
    if other_params:
        parts.append(
            {
                "name": "(norms, biases and other small tensors)",
                "kind": "other",
                "shape": None,
                "dtype": None,
                "params": other_params,
                "bytes": other_bytes,
                "tied_to": None,
            }
        )
    return parts


WHY_DENSE = (
    "qalora quantizes linear layers. The embedding table is a lookup, not a matmul, and the output head "
    "(tied to the embedding table in many small models, so one matrix serves both) is left out by default "
    "because its rounding error goes straight into the logits; norms and biases are tiny. "
    "`--quantize-embeddings` (`QALoRAConfig(quantize_embeddings=True)`) stores the embedding at the run's bits "
    "and group size, and a head tied to it shares those codes (no second copy); it makes the model much "
    "smaller at some cost in perplexity (about +10% on SmolLM2-135M at 4-bit g32). An untied head stays dense "
    "unless named in the target modules."
)


def layout_text(r: dict) -> str:
    """The quantized layers' bits and group sizes as the model holds them."""
    layouts = r.get("layer_layouts") or {}
    if len(layouts) > 1:
        return "quantized layers " + ", ".join(f"{n} at {k}" for k, n in layouts.items())
    if len(layouts) == 1:
        bits, g = next(iter(layouts)).split("-bit g")
        return f"{bits}-bit, group size {g}"
    return f"{r['config']['bits']}-bit, group size {r['config']['group_size']}"


def merge_note(r: dict) -> str:
    """What the merge changed, and when the storage rounding is large next to the update,
    how to keep it."""
    change = r["merge_perplexity_change"]
    dtype = r["config"]["scale_dtype"]
    rounding = r.get("merge_rounding") or {}
    text = (
        f"Merge changed perplexity by {100 * change:+.4f}%: the merged scales and offsets are rounded once to their "
        f"{dtype} storage"
    )
    if rounding.get("offset_layer"):
        text += (
            f" (largest offset change {rounding['offset']:.3g} of its group's code step, in "
            f"`{rounding['offset_layer']}`; largest relative scale change {rounding['scale']:.2g})"
        )
    if rounding.get("grid_layers"):
        text += (
            f"; {rounding['grid_layers']} layer(s) imported from Q2_K/Q4_K/Q5_K tensors store them on their type's "
            "grid (float16 super-block factors times 6-bit integers, 4-bit for Q2_K), as the GGUF export writes them"
        )
    text += "."
    if abs(change) > 0.01 and dtype != "float32" and not rounding.get("grid_layers"):
        text += (
            f" That is large: what training changed is small next to {dtype}'s rounding (short runs, low learning "
            "rates). `qalora.merge(model, offset_dtype=torch.float32)` keeps the merged offsets exact (16 more bits "
            "per group; a GGUF Q4_1/Q5_1 file stores float16 offsets, so train longer for a GGUF)."
        )
    return text


def chat_line(chat: dict) -> str:
    basis = "every token" if chat["loss_tokens"] == "all" else "the assistant's tokens only"
    cut = f", {chat['truncated_examples']} cut to the block size" if chat.get("truncated_examples") else ""
    return (
        f"- chat data: {chat['training_examples']} training and {chat['heldout_examples']} held-out examples, "
        f"{'packed' if chat['packing'] == 'pack' else 'one per block, padded'}{cut}; loss and perplexity on {basis}"
    )


def report_markdown(r: dict) -> str:
    p = r["heldout_perplexity"]
    mib = 1 << 20
    c = r["config"]
    base_label = (
        "the loaded codes, adapters at zero" if r.get("loaded_quantized") else c.get("quantizer", "rtn").upper()
    )
    lines = [
        "# qalora fine-tuning report",
        "",
        f"Model `{os.path.basename(r['model'])}`, data `{r['data']}`, {layout_text(r)}, "
        f"rank {c['rank']}, alpha {c['alpha']}, {r['steps']} steps of {r['batch_size']}×{r['block_size']} tokens, lr {r['learning_rate']}.",
        "",
        "| held-out perplexity | value |",
        "| --- | --- |",
        f"| {'model as loaded (its own quantized layers)' if r.get('loaded_quantized') else 'dense fp32 model'} "
        f"| {p['dense_fp32']:.3f} |",
        f"| quantized base ({base_label}) | {p['quantized_base']:.3f} |",
        f"| QA-LoRA, adapters unmerged | {p['qalora_unmerged']:.3f} |",
        f"| QA-LoRA, merged into the low-bit weights | {p['qalora_merged']:.3f} |",
        "",
        merge_note(r),
        "",
        f"- trainable parameters: {r['trainable_params']:,} of {r['total_params']:,}",
        f"- memory: as loaded {r['memory_bytes']['loaded'] / mib:.1f} MiB, wrapped {r['memory_bytes']['wrapped'] / mib:.1f} MiB, "
        f"merged {r['memory_bytes']['merged'] / mib:.1f} MiB",
        f"- time per step: {r['seconds_per_step']:.2f} s ({r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads)",
        f"- final training loss: {r['final_loss']:.3f}",
        *([f"- GGUF: {r['gguf']['summary']}"] if r.get("gguf") else []),
        *([chat_line(r["chat"])] if r.get("chat") else []),
    ]
    if r.get("skipped_layers"):
        lines.append(f"- layers left dense as indivisible by the group size: {', '.join(r['skipped_layers'])}")
    parts = r.get("dense_parts") or []
    if parts:
        lines += [
            "",
            "## What stays dense in the merged model",
            "",
            "| tensor | kind | shape | dtype | MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for part in parts:
            shape = "×".join(map(str, part["shape"])) if part["shape"] else "-"
            size = f"tied to `{part['tied_to']}`" if part["tied_to"] else f"{part['bytes'] / mib:.1f}"
            lines.append(f"| `{part['name']}` | {part['kind']} | {shape} | {part['dtype'] or '-'} | {size} |")
        lines += ["", WHY_DENSE]
    lines.append("")
    return "\n".join(lines)
