"""Data-parallel training across processes with ``torch.distributed``.

A wrapped model trains under ``DistributedDataParallel`` like any other module: only the
adapters require grad, so only their gradients are all-reduced. The frozen low-bit weights
are buffers that never change; pass ``broadcast_buffers=False`` (as :func:`data_parallel`
does) so DDP does not re-send the whole quantized model before every forward. FSDP2
(``torch.distributed.fsdp.fully_shard``) works too and shards the parameters (adapters,
embeddings, norms); the packed weights, being buffers, stay whole on every rank. The older
``FullyShardedDataParallel`` wrapper needs an accelerator and ``use_orig_params=True`` (a
quantized layer mixes frozen and trainable parameters).

:func:`qalora.train.finetune` and :func:`qalora.train.perplexity` use the process group
when one is initialized: the global batch is split across ranks (so a run gives the same
adapters as one process would on the same global batch), and held-out blocks are shared
out and their losses summed. The command line joins the group that ``torchrun`` or
``accelerate launch`` describes in the environment (:func:`init_from_environment`) and
writes its outputs from rank 0 only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

__all__ = [
    "all_reduce_sum",
    "barrier",
    "data_parallel",
    "init_from_environment",
    "is_main_process",
    "launched_world_size",
    "main_process_first",
    "rank_and_world",
    "shutdown",
]


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, ``accelerate launch``) started, from the
    ``WORLD_SIZE`` it sets; 1 when none did."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def init_from_environment() -> bool:
    """Joins the process group a launcher describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU training, nccl when
    CUDA is available. Returns whether this process is one of several; does nothing when
    launched alone or when a group already exists."""
    if launched_world_size() < 2:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes outputs and prints results (rank 0, or the only one)."""
    return rank_and_world()[0] == 0


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` ready for data-parallel training in the current process group: as it is when
    alone or already distributed (DDP, FSDP), else wrapped in ``DistributedDataParallel``
    without buffer broadcasts (the quantized weights are frozen buffers)."""
    if rank_and_world()[1] < 2 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return model
    device = _device_of(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """The sums of ``values`` over all ranks (the values themselves without a group)."""
    if rank_and_world()[1] < 2:
        return [float(v) for v in values]
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    sums = t.tolist()
    _release_here(t)
    return sums


#: Longest wait for a backend thread to let go of a finished collective's tensor (it takes
#: microseconds; the bound only keeps a misbehaving backend from stalling the caller).
_RELEASE_WAIT_S = 10.0


def _release_here(t: torch.Tensor) -> None:
    """Waits until this caller holds the only reference to ``t``, a tensor a collective has
    just finished with, so that ``t`` is freed by this (Python) thread.

    Gloo's worker thread drops its reference to a finished collective's tensors just after it
    wakes the caller. A tensor that Python has seen keeps a Python object, and whichever
    thread frees the tensor last must take the GIL to release it. When that is the worker
    and the caller has meanwhile returned and begun interpreter shutdown (the last
    collective of a run, then exit), the worker cannot take the GIL: Python ends the thread,
    the C++ unwind crosses a noexcept destructor and the process aborts ("terminate called
    without an active exception", SIGABRT, one rank of a torchrun job that had finished).
    """
    use_count = getattr(t, "_use_count", None)
    if use_count is None:
        return
    deadline = time.monotonic() + _RELEASE_WAIT_S
    while use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)


def barrier() -> None:
    """Waits for every rank (nothing without a group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def main_process_first(work: Callable[[], T]) -> T:
    """Runs ``work`` on rank 0 before the other ranks, so that what it fills once (a GGUF
    conversion cached on disk) is then read by them, not raced."""
    if not is_main_process():
        barrier()
    result = work()
    if is_main_process():
        barrier()
    return result


def shutdown() -> None:
    """Leaves the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
