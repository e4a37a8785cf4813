"""GPTQ (Frantar et al., 2022): the quantizer the QA-LoRA paper puts under its adapters.
(Reading and writing GPTQ checkpoint files is :mod:`qalora.formats.gptq_checkpoint`.)

Round-to-nearest rounds every weight on its own. GPTQ rounds the columns of a layer one at
a time and moves the columns not yet rounded so that the layer's output on calibration
inputs changes as little as possible (a second-order update through the inverse of the
Hessian ``H = 2 XᵀX / n`` of the squared output error). The arithmetic of one layer runs in
the Rust binding on libtorch (CPU or CUDA tensors): Hessian accumulation, dampening, the
Cholesky factor of the inverse, blocks of columns with lazy batch updates, and asymmetric
min-max group parameters computed when a group's first column comes up. The result is the
same ``(packed, scales, offsets)`` layout as RTN, so everything downstream is unchanged.

This module runs a model layer by layer in forward order: each layer's Hessian comes from
inputs produced by the layers before it *after* those were quantized. Models built of a
list of blocks (every Hugging Face decoder) are run one block at a time on the calibration
set, so memory holds one block's activations plus one Hessian; within a block, layers
that read the same tensor (q/k/v, gate/up) share one Hessian and one pass.

Columns whose Hessian diagonal is zero (the calibration set never drives that input) keep
their weight and are rounded to nearest: zeroing them, as GPTQ's reference code does,
would be wrong on inputs the calibration set did not show.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _core, ops
from .errors import DTypeError, InvalidValueError, QALoRAWarning, ShapeError
from .layers import QuantLinear
from .progress import progress
from .targets import dense_weight, model_embedding, replace_module

# --------------------------------------------------------------------------- one layer


def hessian_update(hessian: torch.Tensor, x: torch.Tensor, seen: int) -> int:
    """Adds a batch of layer inputs ``x`` (..., K) to the running Hessian ``2 XᵀX / n``
    (K, K, float32 or float64, contiguous), in place, and returns the new number of rows
    seen."""
    return _core.gptq_hessian_update(hessian, x, seen)


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    *,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ for one (N, K) weight given its (K, K) Hessian (on the same device).

    Computes in float64 when ``hessian`` is float64, else in float32. ``block_size``: columns
    per lazy-update block (default 128; a multiple of the group size without act-order).
    ``backend``: "auto" runs the column loop in the Rust core for float32 CPU work and as
    libtorch operations otherwise ("core" / "torch" force one; they give the same bits).

    Returns ``(packed, scales, offsets, damp)``: the canonical layout of
    :func:`qalora.ops.quantize` and the dampening actually used (raised tenfold, up to three
    times, when the dampened Hessian is not positive definite in the working precision).
    """
    return _core.gptq_quantize(
        weight, hessian, bits, group_size, scale_dtype, damp_percent, act_order, block_size, backend
    )


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, rows: int = 128) -> float:
    """Relative squared output error on the calibration inputs, tr(Δ H Δᵀ) / tr(W H Wᵀ),
    over at most ``rows`` evenly spaced output rows (each costs K² multiply-adds; a
    diagnostic, not part of the algorithm)."""
    pick = torch.linspace(0, weight.shape[0] - 1, min(rows, weight.shape[0]), device=weight.device).round().long()
    w = weight.detach()[pick].to(hessian.dtype)
    delta = w - approx[pick].to(hessian.dtype)
    base = float(((w @ hessian) * w).sum())
    return float(((delta @ hessian) * delta).sum()) / base if base > 0 else 0.0


# --------------------------------------------------------------------------- a model


@dataclass
class LayerRecord:
    """What GPTQ did to one layer: relative squared output error on the calibration
    inputs (GPTQ and, for comparison, RTN; over up to 128 of the layer's output rows) and
    the dampening."""

    name: str
    error: float
    rtn_error: float
    damp: float
    calibration_rows: int


@dataclass
class GPTQReport:
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = ""

    def to_dict(self) -> dict:
        return {
            "quantizer": "gptq",
            "mode": self.mode,
            "seconds": self.seconds,
            "layers": {
                r.name: {
                    "error": r.error,
                    "rtn_error": r.rtn_error,
                    "damp": r.damp,
                    "calibration_rows": r.calibration_rows,
                }
                for r in self.layers
            },
        }


class _Stop(Exception):
    """Raised from a hook once a pass has produced what it was run for."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise InvalidValueError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _strip_cache(kwargs: dict) -> dict:
    kw = dict(kwargs)
    for name in _CACHE_KWARGS:
        if name in kw:
            kw[name] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def check_calibration(model: nn.Module, calibration) -> torch.Tensor:
    """A (batch, ...) tensor with at least one row; token ids within the vocabulary when the
    model has input embeddings."""
    if not isinstance(calibration, torch.Tensor):
        raise DTypeError(
            f"calibration: expected a torch.Tensor of token ids (batch, seq), got {type(calibration).__name__}"
        )
    if calibration.dim() < 2 or calibration.shape[0] == 0 or calibration.numel() == 0:
        raise ShapeError(f"calibration: got shape {tuple(calibration.shape)}, expected (batch, seq) with batch >= 1")
    if not calibration.is_floating_point():
        emb = model_embedding(model, "get_input_embeddings")
        vocab = getattr(emb, "num_embeddings", None)
        lo, hi = int(calibration.min()), int(calibration.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise InvalidValueError(
                f"calibration: token ids span [{lo}, {hi}], the model's vocabulary is [0, {vocab})"
                if vocab is not None
                else f"calibration: token ids must be >= 0, got {lo}"
            )
    return calibration


def _model_call(model: nn.Module) -> Callable[[torch.Tensor], object]:
    """model(batch), with the key/value cache off when the model takes ``use_cache``."""
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    extra = {"use_cache": False} if takes_cache else {}
    return lambda batch: model(batch, **extra)


def _block_list(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList holding every target layer (the decoder's blocks), if there is one."""
    best = None
    for list_name, m in model.named_modules():
        if not list_name or not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if all(n.startswith(list_name + ".") for n in names) and (best is None or len(m) > len(best[1])):
            best = (list_name, m)
    return best


def _chained(model_call, blocks: nn.ModuleList, batch: torch.Tensor) -> bool:
    """True if one forward pass calls the blocks once each, in list order, each block
    reading the previous block's output: then they can be run one at a time."""
    calls: list[tuple[int, torch.Tensor | None]] = []
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: calls.append((i, _hidden_of(args, kwargs))), with_kwargs=True
            )
        )
        handles.append(block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out)))
    try:
        model_call(batch)
    finally:
        for h in handles:
            h.remove()
    if [i for i, _ in calls] != list(range(len(blocks))) or calls[0][1] is None:
        return False
    for i in range(1, len(blocks)):
        try:
            prev = _first_tensor(outputs[i - 1])
        except InvalidValueError:
            return False
        if calls[i][1] is not prev:
            return False
    return True


class _Segment:
    """A piece of the model run on every calibration batch: one block, or the whole model."""

    def __init__(self, module: nn.Module, run: Callable[[int], object], batches: int, layers: list[str]) -> None:
        self.module, self.run, self.batches, self.layers = module, run, batches, layers


def _stages(model: nn.Module, segment: _Segment) -> tuple[list[list[str]], list[str]]:
    """The segment's target layers grouped by input, in call order: consecutive calls that
    read the very same tensor share a stage (and a Hessian). Also returns the layers that
    the first batch never calls."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name in segment.layers:
        module = model.get_submodule(name)

        def hook(mod, args, name=name):
            if not any(n == name for n, _ in seen):
                seen.append((name, args[0]))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        segment.run(0)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for name, x in seen:
        if last is not None and x is last:
            stages[-1].append(name)
        else:
            stages.append([name])
            last = x
    called = {n for n, _ in seen}
    return stages, [n for n in segment.layers if n not in called]


def quantize_model(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Module]],
    *,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    calibration: torch.Tensor,
    damp_percent: float = 0.01,
    act_order: bool = False,
    batch_size: int = 8,
    show_progress: bool | None = None,
    layer_settings: dict[str, tuple[int, int, torch.dtype]] | None = None,
) -> tuple[dict[str, QuantLinear], GPTQReport]:
    """GPTQ-quantizes the dense ``targets`` of ``model`` on ``calibration`` inputs, at
    ``bits`` / ``group_size`` / ``scale_dtype`` or, per layer name, the
    ``layer_settings`` given.

    Layers are quantized in forward order, each on inputs produced by the already-quantized
    layers before it (which are swapped into the model while this runs). On return, success
    or not, the model holds its original modules again; the caller swaps the returned
    :class:`QuantLinear` layers in.
    """
    started = time.perf_counter()
    calibration = check_calibration(model, calibration)
    names = [n for n, _ in targets]
    originals = dict(targets)
    device = next(iter(originals.values())).weight.device
    batches = list(calibration.split(batch_size))
    model_call = _model_call(model)
    report = GPTQReport()
    results: dict[str, QuantLinear] = {}
    settings = {name: (bits, group_size, scale_dtype) for name in names}
    settings.update(layer_settings or {})
    bar = progress([], desc="qalora: GPTQ", enabled=show_progress, min_items=9, total=len(names))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            found = _block_list(model, names)
            blocks = found[1] if found is not None else None
            if blocks is not None and not _chained(model_call, blocks, batches[0].to(device)):
                blocks = None
            if blocks is None:
                report.mode = "whole model per stage"
                segment = _Segment(model, lambda b: model_call(batches[b].to(device)), len(batches), names)
                _quantize_segment(model, segment, results, report, bar, settings, damp_percent, act_order)
            else:
                report.mode = "block by block"
                list_name = found[0]
                inputs = _block_inputs(model_call, blocks[0], batches, device)
                for index, block in enumerate(blocks):
                    prefix = f"{list_name}.{index}."
                    layers = [n for n in names if n.startswith(prefix)]

                    def run(b, block=block, inputs=inputs):
                        args, kwargs = inputs[b]
                        return block(*args, **kwargs)

                    if layers:
                        segment = _Segment(block, run, len(inputs), layers)
                        _quantize_segment(model, segment, results, report, bar, settings, damp_percent, act_order)
                    if index + 1 < len(blocks):
                        inputs = [_with_hidden(*inputs[b], _first_tensor(run(b))) for b in range(len(inputs))]
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)
        model.train(was_training)
        bar.close()
    report.seconds = time.perf_counter() - started
    return results, report


def _block_inputs(model_call, first_block: nn.Module, batches, device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each calibration batch hands the first block."""
    captured: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        captured.append((tuple(args), _strip_cache(kwargs)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model_call(batch.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise InvalidValueError("the model did not reach its first block on every calibration batch")
    return captured


def _quantize_segment(model, segment: _Segment, results, report, bar, settings, damp_percent, act_order) -> None:
    stages, uncalled = _stages(model, segment)
    if uncalled:
        warnings.warn(
            f"layers {uncalled} are not called on the calibration data; they are rounded to nearest "
            f"(a zero Hessian makes GPTQ round-to-nearest)",
            QALoRAWarning,
            stacklevel=4,
        )
        stages.append(uncalled)
    for stage in stages:
        first = model.get_submodule(stage[0])
        k = dense_weight(first)[0].shape[1]
        device = dense_weight(first)[0].device
        h = torch.zeros(k, k, dtype=torch.float32, device=device)
        seen = [0]

        def hook(mod, args, h=h, seen=seen):
            seen[0] = hessian_update(h, args[0], seen[0])
            raise _Stop

        if stage is not uncalled:
            handle = first.register_forward_pre_hook(hook)
            try:
                for b in range(segment.batches):
                    try:
                        segment.run(b)
                    except _Stop:
                        pass
            finally:
                handle.remove()
        for name in stage:
            module = model.get_submodule(name)
            bits, group_size, scale_dtype = settings[name]
            weight, bias = dense_weight(module)
            if weight.shape[1] != k:
                raise ShapeError(f"layer {name!r}: in_features {weight.shape[1]} differs from its stage's {k}")
            packed, scales, offsets, damp = quantize_weight(
                weight, h, bits, group_size, scale_dtype, damp_percent=damp_percent, act_order=act_order
            )
            layer = QuantLinear(
                weight.shape[1], weight.shape[0], bits, group_size, bias is not None, scale_dtype, device, name
            )
            layer.packed.copy_(packed)
            layer.scales.copy_(scales)
            layer.offsets.copy_(offsets)
            if bias is not None:
                layer.bias.data = bias.detach().clone()
            rtn = ops.dequantize(*ops.quantize(weight.detach(), bits, group_size, scale_dtype), bits, group_size)
            report.layers.append(
                LayerRecord(
                    name,
                    output_error(weight, layer.dequantize(), h),
                    output_error(weight, rtn, h),
                    damp,
                    seen[0],
                )
            )
            results[name] = layer
            replace_module(model, name, layer)
            bar.update(1)
            bar.set_postfix(
                layer=name, error_vs_rtn=f"{report.layers[-1].error / max(report.layers[-1].rtn_error, 1e-30):.2f}"
            )
