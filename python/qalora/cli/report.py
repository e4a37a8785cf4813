"""What a run leaves behind for a person: the loss-curve plot and the Markdown report."""

from __future__ import annotations

import os

from ..io import atomic_path


def plot_losses(curves: dict[str, list[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, losses in curves.items():
        steps = range(1, len(losses) + 1)
        (line,) = ax.plot(steps, losses, label=label, alpha=0.35 if len(losses) > 10 else 0.9)
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


def report_markdown(r: dict) -> str:
    p = r["heldout_perplexity"]
    mib = 1 << 20
    c = r["config"]
    return "\n".join(
        [
            "# qalora fine-tuning report",
            "",
            f"Model `{os.path.basename(r['model'])}`, data `{r['data']}`, {c['bits']}-bit, group size {c['group_size']}, "
            f"rank {c['rank']}, alpha {c['alpha']}, {r['steps']} steps of {r['batch_size']}×{r['block_size']} tokens, lr {r['learning_rate']}.",
            "",
            "| held-out perplexity | value |",
            "| --- | --- |",
            f"| {'model as loaded (its own quantized layers)' if r.get('loaded_quantized') else 'dense fp32 model'} | {p['dense_fp32']:.3f} |",
            f"| quantized base ({'the loaded codes, adapters at zero' if r.get('loaded_quantized') else 'RTN'}) | {p['quantized_base']:.3f} |",
            f"| QA-LoRA, adapters unmerged | {p['qalora_unmerged']:.3f} |",
            f"| QA-LoRA, merged into the low-bit weights | {p['qalora_merged']:.3f} |",
            "",
            f"Merge changed perplexity by {100 * r['merge_perplexity_change']:+.4f}% (fp16 rounding of the offsets only).",
            "",
            f"- trainable parameters: {r['trainable_params']:,} of {r['total_params']:,}",
            f"- memory: as loaded {r['memory_bytes']['loaded'] / mib:.1f} MiB, wrapped {r['memory_bytes']['wrapped'] / mib:.1f} MiB, "
            f"merged {r['memory_bytes']['merged'] / mib:.1f} MiB",
            f"- time per step: {r['seconds_per_step']:.2f} s ({r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads)",
            f"- final training loss: {r['final_loss']:.3f}",
            *([f"- GGUF: {r['gguf']['summary']}"] if r.get("gguf") else []),
            "",
        ]
    )
