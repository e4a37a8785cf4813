"""A small, plain training loop and held-out perplexity, used by the command line and the
notebooks (any other loop, or Hugging Face's Trainer, works on a wrapped model too). Both
run data-parallel when a ``torch.distributed`` process group is initialized (see
:mod:`qalora.distributed`)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import cpu_features, distributed
from .cpu_features import native_bf16  # noqa: F401  (defined here before)
from .errors import ConfigError, InvalidValueError, QALoRAWarning
from .progress import progress
from .state import state_of


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0
    steps: int = 0
    bf16: bool = False  # whether the steps ran under bf16 autocast


IGNORE_INDEX = -100  # a label that is neither trained nor scored


def _causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _labeled_nll_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not ``IGNORE_INDEX``."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _check_labels(blocks: torch.Tensor, labels: torch.Tensor | None) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.shape != blocks.shape:
        raise ConfigError(
            f"labels: got {getattr(labels, 'shape', type(labels).__name__)}, they must be a tensor shaped like the "
            f"blocks {tuple(blocks.shape)}"
        )


def _param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """The optimizer's parameter groups: trained offsets and scales (``delta_offsets``,
    ``delta_scales``) at ``lr`` times the config's ``offset_lr_scale`` / ``scale_lr_scale``,
    everything else trainable at ``lr``."""
    state = state_of(model)
    config = state.config if state is not None else None
    scale_of = {
        ".delta_offsets": config.offset_lr_scale if config is not None else 1.0,
        ".delta_scales": config.scale_lr_scale if config is not None else 1.0,
    }
    groups: dict[str, list] = {"": [], ".delta_offsets": [], ".delta_scales": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = next((k for k in scale_of if name.endswith(k)), "")
            groups[kind].append(p)
    return [{"params": params, "lr": lr * scale_of.get(kind, 1.0)} for kind, params in groups.items() if params]


def finetune(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 4,
    lr: float = 2e-4,
    warmup: int = 5,
    seed: int = 0,
    show_progress: bool | None = None,
    desc: str = "qalora: training",
    bf16: bool = False,
    force_bf16: bool = False,
    labels: torch.Tensor | None = None,
) -> TrainResult:
    """AdamW on the trainable parameters, linear warm-up then cosine decay, batches drawn
    from ``blocks`` (num_blocks, block_size) in a seeded shuffled order.

    With ``bf16=True`` each forward pass runs under ``torch.autocast(device, torch.bfloat16)``
    (on CPU the frozen quantized base then runs bf16 GEMMs on dequantized bf16 tiles); the
    trainable parameters, their gradients and the optimizer state stay float32. On a CPU
    without native bf16 (no AVX-512 BF16 or AMX, e.g. AVX2-only machines) torch emulates
    the bf16 GEMMs and a step is about 35 times slower than float32, so there the loop
    warns (:class:`~qalora.QALoRAWarning`) and trains in float32, unless ``force_bf16``.

    In a ``torch.distributed`` process group each step's ``batch_size`` sequences (the
    global batch) are split evenly across the ranks and the model is trained under
    ``DistributedDataParallel`` (unless it already is, or is FSDP-sharded); every rank
    must pass the same ``blocks`` and ``seed``. The adapters then end as one process would
    train them on the same global batches, and the recorded losses are the global ones.

    ``labels`` (shaped like ``blocks``, e.g. :class:`qalora.datasets.LabeledBlocks`'s): the
    next-token targets, where ``-100`` marks a token that is not trained (a prompt, padding);
    the loss is then the mean over the global batch's trained tokens. Without them every
    token is a target.

    Raises:
        ConfigError: ``lr`` is not a finite positive number, nothing is trainable, or
            ``batch_size`` does not split evenly across the ranks.
        InvalidValueError: the training loss became NaN or Inf (the step that produced it
            is not applied, on any rank); a lower learning rate usually helps.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr: got {lr!r}, it must be a finite positive number")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; wrap it with qalora.wrap first")
    _check_labels(blocks, labels)
    param_groups = _param_groups(model, lr)
    rank, world = distributed.rank_and_world()
    if batch_size % world:
        raise ConfigError(
            f"batch_size: got {batch_size}, which does not split evenly across {world} processes; "
            f"use a multiple of {world}"
        )
    per_rank = batch_size // world
    device = next(model.parameters()).device
    if bf16 and device.type == "cpu" and not force_bf16 and not cpu_features.native_bf16():
        warnings.warn(
            QALoRAWarning(
                f"bf16 autocast: {cpu_features.no_bf16_reason()} and a training step would be about 35x "
                f"slower than float32; training in float32 instead (force_bf16=True, or --force-bf16 on the "
                f"command line, insists)"
            ),
            stacklevel=2,
        )
        bf16 = False
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0)
    trained = distributed.data_parallel(model)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    model.train()
    result = TrainResult(bf16=bf16)
    start = time.perf_counter()
    bar = progress(range(steps), desc=desc, enabled=show_progress if rank == 0 else False)
    for step in bar:
        first = step * batch_size + rank * per_rank  # this rank's share of the global batch
        idx = [order[(first + i) % len(order)].item() for i in range(per_rank)]
        batch = blocks[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if labels is None:
                loss = _causal_lm_loss(trained, batch)
            else:
                # Every rank knows the whole global batch, so each divides its summed loss by the
                # global count of trained tokens (times the ranks, which DDP's mean undoes).
                every = [order[(step * batch_size + i) % len(order)].item() for i in range(batch_size)]
                count = max(1, int((labels[every][:, 1:] != IGNORE_INDEX).sum()))
                loss = _labeled_nll_sum(trained, batch, labels[idx].to(device)) * (world / count)
        # The global loss (equal shares, so the mean of the ranks' means), which every rank
        # then checks alike: all stop together or none does.
        (global_loss,) = distributed.all_reduce_sum([loss.item() / world])
        if not math.isfinite(global_loss):
            model.eval()
            raise InvalidValueError(
                f"the training loss became {global_loss} at step {step + 1} of {steps} (lr {lr:g}); training "
                f"stopped before applying it. Lower the learning rate."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(global_loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{global_loss:.3f}")
    result.steps = steps
    result.seconds_per_step = (time.perf_counter() - start) / max(steps, 1)
    model.eval()
    return result


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    show_progress: bool | None = None,
    desc: str = "qalora: perplexity",
    labels: torch.Tensor | None = None,
) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``blocks``, or with
    ``labels`` (shaped like ``blocks``) over the tokens whose label is not ``-100`` (e.g. the
    assistant's replies of chat data). In a ``torch.distributed`` process group the batches
    are shared out across the ranks (each must pass the same ``blocks``) and every rank
    returns the same, global value."""
    _check_labels(blocks, labels)
    model.eval()
    device = next(model.parameters()).device
    rank, world = distributed.rank_and_world()
    total_nll, total_tokens = 0.0, 0
    batches = list(range(0, len(blocks), batch_size))[rank::world]
    for i in progress(batches, desc=desc, enabled=show_progress if rank == 0 else False):
        ids = blocks[i : i + batch_size].to(device)
        if labels is not None:
            targets = labels[i : i + batch_size].to(device)
            total_nll += _labeled_nll_sum(model, ids, targets).item()
            total_tokens += int((targets[:, 1:] != IGNORE_INDEX).sum())
            continue
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    total_nll, total_tokens = distributed.all_reduce_sum([total_nll, total_tokens])
    if labels is not None and total_tokens == 0:
        raise InvalidValueError("perplexity: the labels mark no token to score")
    return math.exp(total_nll / total_tokens)
