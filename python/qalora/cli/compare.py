"""``qalora compare``: every exact route against the re-quantization pipeline it replaces.

For each setting (bits, group size) and base quantizer (RTN, GPTQ) the base is quantized
once; then, from copies of that base and with the same data, steps and learning-rate
schedule:

* each exact method (:data:`EXACT_METHODS`: the pooled QA-LoRA adapter, with trained group
  offsets, scales, norms) is trained and merged: the deployed model *is* the trained model up
  to the storage rounding of its group parameters (``"exact": true``);
* the baseline, a dense LoRA on the same quantized base, is trained, merged into the
  dequantized weights and quantized again with RTN and with GPTQ (the QA-LoRA paper's
  baseline); with ``--gguf``, also written as F16 GGUF and quantized by llama.cpp to Q4_1
  and Q4_K_M, evaluated by llama.cpp (``"exact": false``).

An fp32 model and an fp32 dense LoRA are reference rows. Everything goes to
``compare.json`` (each row flagged ``deployed`` and ``exact``, with the bits per weight of
its quantized layers), ``compare.md`` and the loss curves side by side."""

from __future__ import annotations

import copy
import math
import os
import time

import torch
from torch import nn

from .. import cli, datasets, defaults
from ..config import QALoRAConfig
from ..io import atomic_directory, atomic_write_json, atomic_write_text
from ..layers import QuantLinear
from ..loaders import load_model
from ..state import QALoRAState, attach_state, state_of
from ..targets import replace_module, select_targets
from ..train import finetune, perplexity
from ..wrapping import merge, merge_requantize, wrap
from .finetune import check_block_size, check_settings_fit, token_splits
from .report import plot_losses

EXACT_METHODS = defaults.EXACT_METHODS
# Each method names everything it trains: nothing follows from QALoRAConfig's defaults.
NOTHING_MORE = {"train_scales": False, "train_offsets": False, "train_norms": False}


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


def bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits per weight of the model's quantized layers (codes, scales and offsets
    as held), or None when it holds none."""
    stored, weights = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            packed, scales, offsets = m.canonical()
            stored += 8 * sum(t.numel() * t.element_size() for t in (packed, scales, offsets))
            weights += m.in_features * m.out_features
    return stored / weights if weights else None


def _unwrapped(model: nn.Module) -> nn.Module:
    """A merged model made wrappable again (its layers stay as quantized)."""
    state = state_of(model)
    attach_state(model, QALoRAState(config=None, source=dict(state.source) if state else {}))
    return model


def run_compare(args) -> dict:
    out = os.path.abspath(args.out)
    settings = list(args.settings)
    methods = list(args.methods)
    splits = datasets.load_dataset(args.data, args.heldout)
    quantizers = list(args.quantizers)
    use_gguf = bool(getattr(args, "gguf", False))
    if use_gguf:
        from ..formats import llama_cpp_eval

        llama_cpp_eval.require()
    lm = load_model(args.model, dense=True)  # each setting re-quantizes the dense weights
    check_block_size(lm.model, args.block_size)
    for bits, g in settings:  # every setting must fit the model before anything trains
        check_settings_fit(lm.model, QALoRAConfig(bits=bits, group_size=g, rank=args.rank, alpha=args.alpha))
    train_blocks, heldout = token_splits(
        lm.tokenizer, splits, args.block_size, args.eval_blocks, args.steps * args.batch_size
    )
    # GPTQ (a base quantizer, and the baseline's re-quantizer) calibrates on training blocks.
    calibration = datasets.token_blocks(lm.tokenizer, splits.train, args.block_size, max_blocks=args.calibration_blocks)

    def fresh():
        return copy.deepcopy(lm.model)  # lm.model itself is never wrapped

    ppl = lambda m, d: perplexity(m, heldout, batch_size=args.batch_size, desc=f"perplexity: {d}")

    def train(m, d):
        start = time.time()
        r = finetune(
            m, train_blocks, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, desc=f"train: {d}"
        )
        return r, (time.time() - start) / args.steps

    started = time.time()
    rows: list[dict] = []
    curves: dict[str, list[float]] = {}

    def row(setting, quantizer, method, value, *, deployed, exact, model=None, **extra):
        bpw = bits_per_weight(model) if model is not None and deployed else None
        rows.append(
            {
                "setting": setting,
                "quantizer": quantizer,
                "method": method,
                "heldout_ppl": value,
                "deployed": deployed,
                "exact": exact,
                "bits_per_weight": bpw,
                **extra,
            }
        )

    m = fresh()
    row("-", "-", "fp32 model", ppl(m, "fp32"), deployed=False, exact=False)
    if not getattr(args, "no_reference", False):
        _dense_lora(m, args.rank, args.alpha)
        r, per_step = train(m, "fp32 LoRA")
        curves["fp32 LoRA"] = r.losses
        row(
            "-",
            "-",
            "fp32 LoRA (reference)",
            ppl(m, "fp32 LoRA"),
            deployed=False,
            exact=False,
            seconds_per_step=per_step,
        )
    del m
    gguf_dir = os.path.join(out + ".gguf-work") if use_gguf else None
    for bits, g in settings:
        tag = f"{bits}-bit g{g}"
        for q in quantizers:
            name = q.upper()
            base_cfg = dict(bits=bits, group_size=g, rank=args.rank, alpha=args.alpha)
            start = time.time()
            base = wrap(
                fresh(),
                QALoRAConfig(**base_cfg, quantizer=q, damp_percent=args.damp_percent, act_order=args.act_order),
                **({"calibration": calibration} if q == "gptq" else {}),
            )
            merge(base)  # nothing trained yet: the quantized base, as deployed
            _unwrapped(base)
            row(
                tag,
                name,
                "quantized base",
                ppl(base, f"{tag} {name}"),
                deployed=True,
                exact=True,
                model=base,
                quantize_seconds=time.time() - start,
            )
            for method in methods:
                label = f"{tag} {name} {method}"
                m = wrap(
                    copy.deepcopy(base),
                    QALoRAConfig(
                        **base_cfg,
                        offset_lr_scale=args.offset_lr_scale,
                        scale_lr_scale=args.scale_lr_scale,
                        **{**NOTHING_MORE, **EXACT_METHODS[method]},
                    ),
                )
                r, per_step = train(m, label)
                curves[label] = r.losses
                row(
                    tag,
                    name,
                    f"{method}, before merge",
                    ppl(m, label),
                    deployed=False,
                    exact=False,
                    seconds_per_step=per_step,
                )
                merge(m)
                row(
                    tag,
                    name,
                    f"{method}, merged",
                    ppl(m, f"{label} merged"),
                    deployed=True,
                    exact=True,
                    model=m,
                    merge_rounding=dict(state_of(m).merge_rounding),
                )
                if use_gguf:
                    _gguf_exact_row(row, m, lm, tag, name, method, heldout, gguf_dir)
                del m
            # The baseline: a dense LoRA on the same quantized base, merged and re-quantized.
            label = f"{tag} {name} dense LoRA"
            trained = wrap(copy.deepcopy(base), QALoRAConfig(**base_cfg, adapter="lora", **NOTHING_MORE))
            r, per_step = train(trained, label)
            curves[label] = r.losses
            row(
                tag,
                name,
                "dense LoRA, before merge",
                ppl(trained, label),
                deployed=False,
                exact=False,
                seconds_per_step=per_step,
            )
            for rq in ("rtn", "gptq"):
                m = copy.deepcopy(trained)
                start = time.time()
                merge_requantize(m, quantizer=rq, **({"calibration": calibration} if rq == "gptq" else {}))
                row(
                    tag,
                    name,
                    f"dense LoRA, merged + re-quantized with {rq.upper()}",
                    ppl(m, f"{label} {rq} requant"),
                    deployed=True,
                    exact=False,
                    model=m,
                    quantize_seconds=time.time() - start,
                )
                del m
            if use_gguf:
                _gguf_baseline_rows(row, trained, lm, tag, name, heldout, gguf_dir)
            del trained, base
    result = {
        "model": lm.source,
        "data": splits.name,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "offset_lr_scale": args.offset_lr_scale,
        "scale_lr_scale": args.scale_lr_scale,
        "methods": methods,
        "quantizers": quantizers,
        "calibration_blocks": len(calibration),
        "damp_percent": args.damp_percent,
        "act_order": args.act_order,
        "heldout_blocks": len(heldout),
        "seconds": time.time() - started,
        "rows": rows,
        "losses": curves,
    }
    table = [
        "| setting | base | method | deployed | exact | bits/weight | held-out perplexity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        bits = r["bits_per_weight"] or r.get("gguf_bits")
        bpw = f"{bits:.3f}" if bits else "-"
        table.append(
            f"| {r['setting']} | {r['quantizer']} | {r['method']} | {'yes' if r['deployed'] else 'no'} | "
            f"{'yes' if r['exact'] else 'no'} | {bpw} | {r['heldout_ppl']:.3f} |"
        )
    with atomic_directory(out) as work:  # swapped in whole: a failed run leaves --out as it was
        atomic_write_json(os.path.join(work, "compare.json"), result)
        atomic_write_text(os.path.join(work, "compare.md"), "\n".join(table) + "\n")
        if cli.plotting_available():
            plot_losses(curves, os.path.join(work, "compare_losses.png"), "training loss, every method")
    if gguf_dir is not None:
        import shutil

        shutil.rmtree(gguf_dir, ignore_errors=True)
    print("\n".join(table))
    print(f"qalora: comparison written to {out} ({result['seconds'] / 60:.1f} min)")
    return result


def _gguf_exact_row(row, model, lm, tag, name, method, heldout, work_dir) -> None:
    """The merged model exported as GGUF (its own codes, Q4_1/Q5_1) and scored by llama.cpp."""
    from ..formats.gguf_export import export_gguf

    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, "exact.gguf")
    report = export_gguf(model, path, tokenizer=lm.tokenizer, show_progress=False)
    ppl, scored = _score_gguf(path, heldout)
    row(
        tag,
        name,
        f"{method}, merged, exported GGUF (llama.cpp)",
        ppl,
        deployed=True,
        exact=True,
        **scored,
        gguf_summary=report.summary(),
    )


def _score_gguf(path: str, heldout) -> tuple[float, dict]:
    """llama.cpp's perplexity of a GGUF file and its sizes; the file is removed after."""
    from ..formats import llama_cpp_eval

    scored = {"gguf_bits": _gguf_layer_bits(path), "gguf_bytes": os.path.getsize(path)}
    ppl = llama_cpp_eval.perplexity(path, heldout)
    os.remove(path)
    return ppl, scored


def _gguf_layer_bits(path: str) -> float:
    """Bits per weight of a GGUF file's block matrices (the layers qalora quantizes)."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) > 1]
    return 8 * sum(int(t.n_bytes) for t in tensors) / max(1, sum(int(t.n_elements) for t in tensors))


def _gguf_baseline_rows(row, trained, lm, tag, name, heldout, work_dir) -> None:
    """The dense LoRA merged into the dequantized weights, written as F16 GGUF, quantized by
    llama.cpp's own quantizer to Q4_1 and Q4_K_M and scored by llama.cpp: the route in use
    today for GGUF users."""
    from ..formats import llama_cpp_eval
    from ..formats.gguf_export import export_gguf
    from ..layers import QALoRALinear
    from ..targets import quantized_layers

    os.makedirs(work_dir, exist_ok=True)
    dense = copy.deepcopy(trained)
    for layer_name, layer in list(quantized_layers(dense, QALoRALinear)):
        replace_module(dense, layer_name, layer.merged_dense())
    state_of(dense).source = {}  # written from its config: every weight F16, as converters do
    f16 = os.path.join(work_dir, "dense-f16.gguf")
    export_gguf(dense, f16, tokenizer=lm.tokenizer, other_type="f16", show_progress=False)
    del dense
    for type_name in ("Q4_1", "Q4_K_M"):
        path = os.path.join(work_dir, f"dense-{type_name}.gguf")
        llama_cpp_eval.quantize(f16, path, type_name)
        ppl, scored = _score_gguf(path, heldout)
        row(
            tag,
            name,
            f"dense LoRA, merged + quantized by llama.cpp to {type_name}",
            ppl,
            deployed=True,
            exact=False,
            **scored,
        )
    os.remove(f16)
