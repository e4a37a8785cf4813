"""``qalora compare``: QA-LoRA vs QLoRA-style deployment at several bit widths (the paper's
Table 1 pattern), on each base quantizer asked for (RTN, GPTQ), with an fp32 model and an
fp32 dense LoRA as reference rows. With GPTQ, the QLoRA-style row is the paper's baseline:
dense LoRA merged, then the merged weight quantized again with GPTQ."""

from __future__ import annotations

import copy
import math
import os
import time

import torch
from torch import nn

from .. import cli, datasets
from ..config import QALoRAConfig
from ..io import atomic_directory, atomic_write_json, atomic_write_text
from ..loaders import load_model
from ..targets import replace_module, select_targets
from ..train import finetune, perplexity
from ..wrapping import merge, merge_requantize, wrap
from .finetune import check_settings_fit, token_splits
from .report import plot_losses


class DenseLoRALinear(nn.Module):
    """Standard LoRA on an unquantized linear layer: the fp32 reference row."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The dense weight with the update added (W + scaling·B·A), as a plain nn.Linear."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
            out.weight.copy_(self.base.weight.float() + delta)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.dtype).requires_grad_(False)


def _dense_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """The fp32 reference: a dense LoRA on the same layers :func:`qalora.wrap` picks."""
    targets = [(n, m) for n, m in select_targets(model) if isinstance(m, nn.Linear)]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in targets:
        replace_module(model, name, DenseLoRALinear(m, rank, alpha, dropout))
    return model


def run_compare(args) -> dict:
    out = os.path.abspath(args.out)
    settings = list(args.settings)
    splits = datasets.load_dataset(args.data, args.heldout)
    quantizers = list(args.quantizers)
    lm = load_model(args.model, dense=True)  # each setting re-quantizes the dense weights
    for bits, g in settings:  # every setting must fit the model before anything trains
        check_settings_fit(lm.model, QALoRAConfig(bits=bits, group_size=g, rank=args.rank, alpha=args.alpha))
    train_blocks, heldout = token_splits(
        lm.tokenizer, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size
    )
    calibration = None
    if "gptq" in quantizers:  # GPTQ calibrates on blocks of the training data
        calibration = datasets.token_blocks(
            lm.tokenizer, splits.train, args.block_size, max_blocks=args.calibration_blocks
        )

    def fresh():
        return copy.deepcopy(lm.model)  # lm.model itself is never wrapped

    ppl = lambda m, d: perplexity(m, heldout, batch_size=args.batch_size, desc=f"perplexity: {d}")
    train = lambda m, d: finetune(
        m, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, desc=f"train: {d}"
    )
    started = time.time()
    rows: list[dict] = []
    curves: dict[str, list[float]] = {}
    m = fresh()
    fp32 = ppl(m, "fp32")
    rows.append({"setting": "-", "quantizer": "-", "method": "fp32 model", "heldout_ppl": fp32})
    _dense_lora(m, args.rank, args.alpha)
    r = train(m, "fp32 LoRA")
    curves["fp32 LoRA"] = r.losses
    rows.append(
        {"setting": "-", "quantizer": "-", "method": "fp32 LoRA (reference)", "heldout_ppl": ppl(m, "fp32 LoRA")}
    )
    del m
    for bits, g in settings:
        tag = f"{bits}-bit g{g}"
        for q in quantizers:
            name = q.upper()
            cfg = dict(
                bits=bits,
                group_size=g,
                rank=args.rank,
                alpha=args.alpha,
                quantizer=q,
                damp_percent=args.damp_percent,
                act_order=args.act_order,
            )
            calib = {"calibration": calibration} if q == "gptq" else {}
            row = lambda method, value, tag=tag, name=name, **extra: rows.append(
                {"setting": tag, "quantizer": name, "method": method, "heldout_ppl": value, **extra}
            )
            start = time.time()
            m = wrap(fresh(), QALoRAConfig(**cfg), **calib)
            row(f"{name} quantized base", ppl(m, f"{tag} {name}"), quantize_seconds=time.time() - start)
            r = train(m, f"{tag} {name} QA-LoRA")
            curves[f"{tag} {name} QA-LoRA"] = r.losses
            row("QA-LoRA, before merge", ppl(m, f"{tag} {name} QA-LoRA"))
            merge(m)
            row("QA-LoRA, merged (deployed)", ppl(m, f"{tag} {name} merged"))
            del m
            m = wrap(fresh(), QALoRAConfig(adapter="lora", **cfg), **calib)
            r = train(m, f"{tag} {name} LoRA")
            curves[f"{tag} {name} QLoRA-style"] = r.losses
            row("QLoRA-style, before merge", ppl(m, f"{tag} {name} LoRA"))
            start = time.time()
            merge_requantize(m, quantizer=q, **calib)
            row(
                f"QLoRA-style, merged + re-quantized with {name} (deployed)",
                ppl(m, f"{tag} {name} requant"),
                quantize_seconds=time.time() - start,
            )
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
        "quantizers": quantizers,
        "calibration_blocks": len(calibration) if calibration is not None else 0,
        "damp_percent": args.damp_percent,
        "act_order": args.act_order,
        "heldout_blocks": len(heldout),
        "seconds": time.time() - started,
        "rows": rows,
    }
    table = ["| setting | base | method | held-out perplexity |", "| --- | --- | --- | --- |"]
    table += [f"| {r['setting']} | {r['quantizer']} | {r['method']} | {r['heldout_ppl']:.3f} |" for r in rows]
    with atomic_directory(out) as work:  # swapped in whole: a failed run leaves --out as it was
        atomic_write_json(os.path.join(work, "compare.json"), result)
        atomic_write_text(os.path.join(work, "compare.md"), "\n".join(table) + "\n")
        if cli.plotting_available():
            plot_losses(curves, os.path.join(work, "compare_losses.png"), "training loss")
    print("\n".join(table))
    print(f"qalora: comparison written to {out} ({result['seconds'] / 60:.1f} min)")
    return result
