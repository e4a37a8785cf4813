"""Putting adapters on a model and folding them in: wrap, merge, and what a wrapped model holds.

Every function here checks everything it needs before it changes the model, so a refused
call leaves the model exactly as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import cpu_features, embeddings, gptq_quantizer, ops
from .config import QALoRAConfig
from .errors import (
    ConfigError,
    DTypeError,
    GroupSizeError,
    MergeError,
    NoTargetModulesError,
    QALoRAWarning,
)
from .formats.gguf_blocks import FIXED_OFFSET_TYPES, FORMATS, K_OFFSET_TYPE_NAMES, fit_k_quant
from .layers import (
    QALoRALinear,
    QuantEmbedding,
    QuantLinear,
    check_activations,
    check_group_size,
    scale_dtype_of,
)
from .progress import progress
from .state import QALoRAState, attach_state, require_state, state_of
from .targets import FilterFn, dense_weight, quantized_layers, replace_module, select_targets
from .ties import storage_key


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            yield t


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


@dataclass
class ModelSummary:
    """Parameter and memory counts of a model (quantized weights count as parameters)."""

    trainable_params: int
    total_params: int
    memory_bytes: int
    memory_bytes_before_wrap: int | None
    quantized_layers: int
    adapter_layers: int
    quantized_embeddings: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        mib = 1 << 20
        text = (
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%) | quantized layers: {self.quantized_layers} "
            f"(with adapter: {self.adapter_layers})"
        )
        if self.quantized_embeddings:
            text += f" | quantized embeddings: {self.quantized_embeddings}"
        text += f" | memory: {self.memory_bytes / mib:.2f} MiB"
        if self.memory_bytes_before_wrap:
            text += (
                f" (before wrap: {self.memory_bytes_before_wrap / mib:.2f} MiB, "
                f"{self.memory_bytes / self.memory_bytes_before_wrap:.1%})"
            )
        return text


def summary(model: nn.Module) -> ModelSummary:
    """Trainable vs total parameters and memory, before and after :func:`wrap`."""
    params = {id(p): p for p in model.parameters()}.values()
    quant = [m for _, m in quantized_layers(model, QuantLinear)]
    quant += [m.base_layer for _, m in quantized_layers(model, QALoRALinear)]
    tables = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    # A head tied to a quantized embedding holds the table's tensors: count them once.
    stored = {id(m.packed): m.in_features * m.out_features for m in [*quant, *tables]}
    state = state_of(model)
    return ModelSummary(
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params) + sum(stored.values()),
        memory_bytes=memory_bytes(model),
        memory_bytes_before_wrap=state.memory_before_wrap if state else None,
        quantized_layers=len(quant),
        adapter_layers=sum(1 for _ in quantized_layers(model, QALoRALinear)),
        quantized_embeddings=len(tables),
    )


def checked_targets(
    model: nn.Module, config: QALoRAConfig, filter_fn: FilterFn | None
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The layers to wrap, and the names of those left dense as indivisible.

    Raises, as :func:`wrap` does, GroupSizeError (``on_indivisible="raise"``) and
    NoTargetModulesError."""
    keep, skipped, fixed = [], [], []
    state = state_of(model)
    imported = (state.source.get("layers", {}) if state is not None else {}) or {}
    for name, module in select_targets(model, config.target_modules, config.exclude_modules, filter_fn):
        if isinstance(module, QuantLinear):
            kind = (imported.get(name) or {}).get("type")
            if config.fixed_offset_layers == "skip" and kind in FIXED_OFFSET_TYPES:
                fixed.append((name, kind))
                continue
            keep.append((name, module))  # already quantized: its own bits and group size hold
            continue
        weight, _ = dense_weight(module)
        try:
            check_group_size(weight.shape[1], config.bits, config.group_size, name)
            keep.append((name, module))
        except GroupSizeError as e:
            if config.on_indivisible == "raise":
                raise
            skipped.append(name)
            warnings.warn(f"{e}; left unquantized (on_indivisible='skip')", QALoRAWarning, stacklevel=3)
    if fixed:
        kinds = sorted({k for _, k in fixed})
        message = (
            f"{len(fixed)} layer(s) stored as {'/'.join(kinds)} in the GGUF file (a type whose offset is fixed by its "
            f"scale, so a merged adapter could only be written by re-quantizing it) get no adapter "
            f"(fixed_offset_layers='skip'; 'adapt' adapts them and the export writes them as Q8_0): "
            f"{', '.join(n for n, _ in fixed[:4])}{' ...' if len(fixed) > 4 else ''}"
        )
        if not keep:
            raise NoTargetModulesError(f"no layer left to adapt: {message}")
        warnings.warn(message, QALoRAWarning, stacklevel=3)
    if not keep:
        raise NoTargetModulesError(
            f"every matched layer was skipped as indivisible by group_size={config.group_size}: {skipped}"
        )
    _check_rank(keep, config.rank)
    return keep, skipped


def _check_rank(layers: list[tuple[str, nn.Module]], rank: int) -> None:
    """An adapter's rank is at most min(in_features, out_features) of its layer: a larger
    one adds nothing and (a mistyped 10**9) would try to allocate what no machine has."""
    sizes = {}
    for name, module in layers:
        if isinstance(module, QuantLinear):
            sizes[name] = (module.out_features, module.in_features)
        else:
            sizes[name] = tuple(dense_weight(module)[0].shape)
    name = min(sizes, key=lambda n: min(sizes[n]))
    limit = min(sizes[name])
    if rank > limit:
        out_f, in_f = sizes[name]
        raise ConfigError(
            f"rank: got {rank}; layer {name!r} has in_features {in_f} and out_features {out_f}, so its adapter "
            f"rank is at most {limit}; allowed: 1..{limit} (or exclude that layer)"
        )


#: The name :func:`checked_targets` had.
_checked_targets = checked_targets


def wrap(
    model: nn.Module,
    config: QALoRAConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    show_progress: bool | None = None,
    calibration: torch.Tensor | None = None,
    calibration_batch_size: int = 8,
) -> nn.Module:
    """Quantize the targeted linear layers and attach trainable adapters, in place.

    Each targeted ``nn.Linear`` / ``Conv1D`` becomes a :class:`QALoRALinear` holding the
    frozen quantized base (packed codes, scales, offsets, bias) and ``lora_A``/``lora_B``;
    its dense weight is released. A layer that is already a :class:`QuantLinear` (e.g.
    imported from a quantized file) keeps its codes, bits and group size, and its adapter
    pools over its own groups. Every other parameter is frozen, so only adapters train.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face model, a plain MLP, ...).
        config: a :class:`QALoRAConfig` (default: 4-bit, group 32, rank 16).
        filter_fn: optional ``filter_fn(module, qualified_name) -> bool`` choosing layers
            (with ``config.target_modules``, both must accept a layer; alone, it replaces
            the default "every linear layer but the output head").
        show_progress: progress bar over layers (default: when there are more than 8).
        calibration: inputs for ``config.quantizer == "gptq"``: a LongTensor of token ids
            (batch, seq) for a language model (any tensor the model takes as its first
            argument otherwise). GPTQ runs the model on it layer by layer.
        calibration_batch_size: calibration rows per forward pass (memory vs speed).

    Returns:
        The same model object. If the call raises, the model is unchanged.

    Raises:
        NoTargetModulesError: nothing matched (the message lists the linear-like modules).
        GroupSizeError: a layer's in_features is not divisible by group_size and
            ``config.on_indivisible == "raise"``.
        InvalidValueError: a targeted weight is not finite (or overflows the scale dtype).
        ConfigError: ``quantizer="gptq"`` without ``calibration`` (or calibration with RTN).
    """
    config = config if config is not None else QALoRAConfig()
    if not isinstance(config, QALoRAConfig):
        raise ConfigError(f"config: expected a QALoRAConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise ConfigError(f"filter_fn: expected a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    previous = state_of(model)
    if config.quantize_embeddings and previous is not None and previous.merged:
        raise ConfigError(
            "quantize_embeddings: this model is merged already; quantize the embedding when wrapping the original "
            "model (dense, or as imported)"
        )
    if (previous is not None and previous.config is not None) or any(
        True for _ in quantized_layers(model, QALoRALinear)
    ):
        raise ConfigError("this model is already wrapped; wrap a fresh model or load adapters with qalora.load_adapter")
    if (
        isinstance(calibration_batch_size, bool)
        or not isinstance(calibration_batch_size, int)
        or calibration_batch_size < 1
    ):
        raise ConfigError(f"calibration_batch_size: got {calibration_batch_size!r}, it must be a positive int")
    if config.quantizer == "gptq" and calibration is None:
        raise ConfigError(
            "quantizer='gptq' needs calibration inputs: qalora.wrap(model, config, calibration=token_ids)"
        )
    if config.quantizer != "gptq" and calibration is not None:
        raise ConfigError(
            f"calibration is only used by quantizer='gptq'; this config has quantizer={config.quantizer!r}"
        )
    keep, skipped = checked_targets(model, config, filter_fn)
    embedding_plan = embeddings.plan(model, config, keep)

    before = memory_bytes(model)
    scale_dtype = scale_dtype_of(config.scale_dtype)
    # Build every new layer before swapping any in: a layer that fails to quantize (a
    # non-finite weight, say) then leaves the model untouched.
    calibrated, report = {}, None
    dense = [(name, m) for name, m in keep if not isinstance(m, QuantLinear)]
    if config.quantizer == "gptq" and keep and not dense:
        raise ConfigError(
            "quantizer='gptq' quantizes dense layers, but every targeted layer is already quantized (e.g. "
            "imported from a GGUF file): load the model with qalora.load_model(path, dense=True), or use "
            "quantizer='rtn' to train on the layers as they are"
        )
    if config.quantizer == "gptq" and dense:
        calibrated, report = gptq_quantizer.quantize_model(
            model,
            dense,
            bits=config.bits,
            group_size=config.group_size,
            scale_dtype=scale_dtype,
            calibration=calibration,
            damp_percent=config.damp_percent,
            act_order=config.act_order,
            batch_size=calibration_batch_size,
            show_progress=show_progress,
        )
    new_layers = []
    for name, module in progress(keep, desc="qalora: quantizing layers", enabled=show_progress, min_items=9):
        if isinstance(module, QuantLinear):
            base = module
        elif name in calibrated:
            base = calibrated[name]
        else:
            weight, bias = dense_weight(module)
            base = QuantLinear.from_weight(weight, bias, config.bits, config.group_size, scale_dtype, name)
        # Adapters are created in float32 whatever the model's dtype: they are what trains.
        new_layers.append(
            (
                name,
                QALoRALinear(
                    base,
                    config.rank,
                    config.alpha,
                    config.dropout,
                    config.adapter,
                    train_scales=config.train_scales,
                    train_offsets=config.train_offsets,
                ),
            )
        )
    table = embeddings.build(embedding_plan, config, scale_dtype) if embedding_plan is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers:
        replace_module(model, name, layer)
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.requires_grad_(True)
    if config.train_norms:
        for p in norm_parameters(model):
            p.requires_grad_(True)
    if table is not None:
        embeddings.apply(model, embedding_plan, *table)
    attach_state(
        model,
        QALoRAState(
            config=config,
            skipped=skipped,
            memory_before_wrap=before,
            source=dict(previous.source) if previous is not None else {},
            quantization=report.to_dict() if report is not None else {"quantizer": config.quantizer},
        ),
    )
    return model


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the model's normalization layers (``LayerNorm``, ``RMSNorm``
    and the Hugging Face classes named ``...Norm``): what ``train_norms`` trains. Deployed
    formats store them as they are (GGUF: float32), so training them keeps the merge exact."""
    seen, out = set(), []
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or name.endswith(("Norm", "RMSNorm")):
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups for a wrapped model's trainable parameters, at the learning
    rates :func:`qalora.train.finetune` uses: trained offsets (``delta_offsets``) at ``lr``
    times the config's ``offset_lr_scale``, trained scales at ``lr`` times ``scale_lr_scale``,
    everything else (adapters, norms) at ``lr``. For another training loop, e.g. Hugging Face's
    ``Trainer`` or TRL's ``SFTTrainer``, which otherwise give every parameter one rate::

        trainer = SFTTrainer(model, args, ..., optimizers=(torch.optim.AdamW(qalora.param_groups(model, 2e-4)), None))

    Raises:
        ConfigError: ``lr`` is not a finite positive number, or nothing is trainable.
    """
    from .train import _param_groups

    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr: got {lr!r}, it must be a finite positive number")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters; wrap it with qalora.wrap first")
    return _param_groups(model, float(lr))


def merge(model: nn.Module, offset_dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every QA-LoRA adapter into its layer's offsets (exact; codes unchanged), in place.

    Each :class:`QALoRALinear` becomes a plain :class:`QuantLinear`: the model is then a pure
    low-bit model with no adapter. ``m' = m + scaling * (B A) / group_size``, computed in
    float32 and stored in the offsets' dtype (float16 rounding of the offsets is the only
    difference from the unmerged model). Trained group parameters (``train_scales``,
    ``train_offsets``) are folded in the same way: the trained float32 scales and offsets,
    rounded once to their storage dtypes; a layer imported from a Q2_K / Q4_K / Q5_K GGUF
    tensor stores them on that type's grid (float16 super-block factors times 6-bit, for
    Q2_K 4-bit, integers), fitted as :func:`qalora.export_gguf` writes them, so the merged
    model is the file that export writes. ``qalora.state_of(model).merge_rounding`` then
    says the largest change that rounding made (relative, for a scale; in steps of the
    group's scale, for an offset) and where.

    Args:
        offset_dtype: store the merged offsets in this dtype (default: keep theirs).
            ``torch.float32`` keeps a small update that float16 would round away, at 16 more
            bits per group.

    A layer whose merged offsets would overflow their dtype (float16 holds at most 65504)
    gets float32 offsets instead, with a :class:`QALoRAWarning` naming it.

    Raises:
        MergeError: the model holds dense LoRA adapters (``adapter="lora"``), use
            :func:`merge_requantize`; or an adapter holds non-finite values. The model is
            unchanged.
    """
    if offset_dtype is not None and offset_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DTypeError(f"offset_dtype: got {offset_dtype!r}, allowed: torch.float16, torch.bfloat16, torch.float32")
    state = require_state(model)
    layers = list(quantized_layers(model, QALoRALinear))
    merged, widened = [], []
    rounding: dict[str, Any] = {
        "scale": 0.0,
        "scale_layer": None,
        "offset": 0.0,
        "offset_layer": None,
        "grid_layers": 0,  # layers whose parameters went onto a K-quant grid
    }
    imported = state.source.get("layers", {}) or {}
    for name, layer in layers:  # all built and checked before any swap
        new = layer.merged(offset_dtype)
        if not bool(torch.isfinite(new.offsets).all()) and new.offsets.dtype != torch.float32:
            # The update overflows this offset dtype (float16 tops out at 65504): keep
            # this layer exact with float32 offsets rather than store Inf.
            new = layer.merged(torch.float32)
            widened.append(name)
        if not bool(torch.isfinite(new.offsets).all()):
            raise MergeError(
                f"layer {name!r}: the merged offsets are not finite even in float32; the adapter weights "
                f"(lora_A, lora_B) hold NaN/Inf or huge values"
            )
        rounding["grid_layers"] += _onto_source_grid(new, (imported.get(name) or {}).get("type"), name)
        merged.append((name, new))
        for kind, change in layer.storage_rounding(new).items():
            if change > rounding[kind] or rounding[f"{kind}_layer"] is None:
                rounding[kind], rounding[f"{kind}_layer"] = change, name
    for name, new in merged:
        replace_module(model, name, new)
    state.merged = True
    state.merge_rounding = rounding
    if widened:
        warnings.warn(
            f"merge: the update overflows the offsets' dtype in {len(widened)} layer(s) "
            f"({', '.join(widened[:5])}{', ...' if len(widened) > 5 else ''}); those layers keep float32 offsets",
            QALoRAWarning,
            stacklevel=2,
        )
    return model


@torch.no_grad()
def _onto_source_grid(layer: QuantLinear, kind: str | None, name: str) -> bool:
    """A merged layer imported from a Q2_K / Q4_K / Q5_K tensor stores its group parameters
    on that type's grid (float16 super-block factors times small integers), which is what
    its GGUF export writes: fitting them here, in place, makes the merged model the deployed
    one (the merge's rounding report then includes the fit). The layer then holds them
    factored, at the file's size (QuantLinear.factor_). Returns whether it did."""
    ggml_type = K_OFFSET_TYPE_NAMES.get(kind)
    if ggml_type is None or layer.scales.dtype != torch.float32 or layer.offsets.dtype != torch.float32:
        return False  # not a K-quant import, or parameters narrowed on purpose (offset_dtype=)
    fmt = FORMATS[ggml_type]
    k = layer.in_features
    if (layer.bits, layer.group_size) != (fmt.bits, fmt.group_size) or k % fmt.block_weights:
        return False
    packed, scales, offsets = layer.canonical()
    n, groups, blocks = layer.out_features, k // fmt.group_size, k // fmt.block_weights
    sub_scales, sub_offsets = (torch.empty(n, groups, dtype=torch.uint8) for _ in range(2))
    super_scales, super_offsets = (torch.empty(n, blocks, dtype=torch.float16) for _ in range(2))
    step = max(1, (1 << 20) // k)  # rows per slice: the fit's float64 temporaries stay small
    for a in range(0, n, step):
        b = min(n, a + step)
        codes = ops.unpack(packed[a:b].cpu(), layer.bits, k).numpy()
        fit = fit_k_quant(ggml_type, codes, scales[a:b].cpu().numpy(), offsets[a:b].cpu().numpy(), name)
        sub_scales[a:b], super_scales[a:b] = torch.from_numpy(fit.sc), torch.from_numpy(fit.d)
        sub_offsets[a:b], super_offsets[a:b] = torch.from_numpy(fit.mn), torch.from_numpy(-fit.dmin)
    device = packed.device
    layer.factor_(sub_scales.to(device), super_scales.to(device), sub_offsets.to(device), super_offsets.to(device))
    return True


def merge_requantize(
    model: nn.Module,
    *,
    quantizer: str | None = None,
    calibration: torch.Tensor | None = None,
    calibration_batch_size: int = 8,
    show_progress: bool | None = None,
) -> nn.Module:
    """QLoRA-style deployment, for comparison: add each adapter's dense update to the
    dequantized weight and quantize the result again at the same bits and group size.
    Lossy for dense LoRA adapters; in place.

    Args:
        quantizer: "rtn" or "gptq" (default: the one the model was wrapped with). GPTQ is
            the paper's baseline (QLoRA, merged, then GPTQ): it runs on ``calibration``
            with every merged layer dense, quantizing them in forward order.
        calibration: token ids for GPTQ (see :func:`wrap`).

    Raises:
        ConfigError: GPTQ without calibration, or an unknown quantizer.
    """
    state = require_state(model)
    config = state.config
    quantizer = quantizer if quantizer is not None else config.quantizer
    if quantizer not in ("rtn", "gptq"):
        raise ConfigError(f"quantizer: got {quantizer!r}, allowed: 'rtn', 'gptq'")
    layers = list(quantized_layers(model, QALoRALinear))
    if quantizer == "rtn":
        requantized = [(name, layer.requantized()) for name, layer in layers]
    else:
        if calibration is None:
            raise ConfigError("merge_requantize(quantizer='gptq') needs calibration inputs (token ids)")
        dense = [(name, layer.merged_dense()) for name, layer in layers]
        for name, linear in dense:
            replace_module(model, name, linear)
        try:
            result, _ = gptq_quantizer.quantize_model(
                model,
                dense,
                bits=config.bits,
                group_size=config.group_size,
                scale_dtype=scale_dtype_of(config.scale_dtype),
                layer_settings={
                    name: (layer.base_layer.bits, layer.base_layer.group_size, layer.base_layer.param_dtypes[0])
                    for name, layer in layers
                },
                calibration=calibration,
                damp_percent=config.damp_percent,
                act_order=config.act_order,
                batch_size=calibration_batch_size,
                show_progress=show_progress,
            )
        finally:
            for name, layer in layers:
                replace_module(model, name, layer)
        requantized = [(name, result[name]) for name, _ in layers]
    for name, new in requantized:
        replace_module(model, name, new)
    state.merged = True
    return model


def set_activations(model: nn.Module, mode: str, *, tile: bool = True, force: bool = False) -> int:
    """Choose how every quantized layer of ``model`` multiplies small CPU batches (up to 16
    rows, i.e. generation): ``"exact"`` (the default), ``"int8"`` (activations quantized
    to int8 per block of up to 128 values, integer dot products) or ``"bf16"``
    (activations rounded to bfloat16, float32 accumulation); the errors of the last two
    are bounded as described in :func:`qalora.ops.qmatmul`. A run-time choice: it is not
    saved with the model.

    With ``"int8"`` and ``tile=True`` every layer that can (4-bit CPU weights, group size a
    multiple of 32, out_features a multiple of 8, float16 scales and offsets) is stored
    once in the int8 route's tiled layout, which *replaces* its canonical tensors in memory
    (:meth:`QuantLinear.tile_`): the fastest route for generation. Any other mode puts the
    canonical layout back.

    ``"bf16"`` on a CPU without AVX-512 (F, VL, VNNI; e.g. AVX2-only machines such as AMD
    Zen 3) has no wide kernel and runs the exact kernel on rounded inputs, slower than the
    exact route itself (0.80x torch's int4 kernel at g32 on Zen 3, where the int8 route is
    1.75-2.85x): CPU layers then get ``"int8"``, the fastest route there, with a
    :class:`~qalora.QALoRAWarning`, unless ``force=True``.

    Returns:
        The number of quantized layers set.

    Raises:
        InvalidValueError: ``mode`` is not one of ``"exact"``, ``"int8"``, ``"bf16"``.
        ConfigError: the model holds no qalora layer.
    """
    check_activations(mode)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ConfigError("this model holds no qalora layer; wrap it with qalora.wrap first")
    bf16_fast = mode != "bf16" or force or cpu_features.wide_kernels()
    if not bf16_fast:
        on_cpu = [m for m in layers if next(m.buffers()).device.type == "cpu"]
        if on_cpu:
            warnings.warn(
                QALoRAWarning(
                    f'activations="bf16": this CPU lacks AVX-512 (F/VL/VNNI), where the bf16 route is slower '
                    f'than the exact one; the {len(on_cpu)} CPU layers get "int8", the fastest route here '
                    f'(set_activations(..., force=True) insists; "exact" is exact and also faster than bf16 here)'
                ),
                stacklevel=2,
            )
    # A head tied to a quantized embedding shares its codes with the table; tiling it would
    # hold the weight twice and untie it in saved files.
    heads = embeddings.tied_heads(model)
    tied = {id(m) for name, m in model.named_modules() if name in heads}
    for m in layers:
        layer_mode = mode if bf16_fast or next(m.buffers()).device.type != "cpu" else "int8"
        m.activations = layer_mode
        if layer_mode == "int8" and tile and id(m) not in tied:
            m.tile_()
        else:
            m.untile_()
    return len(layers)
