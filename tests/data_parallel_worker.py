"""Trains a tiny wrapped Llama the ways people scale out, as one process of several (under
torchrun) or alone, and writes the adapters rank 0 ends with: ``python data_parallel_worker.py
OUT_DIR``. ``test_distributed.py`` runs it both ways and compares.

Every way trains on the same global batches (4 sequences per step, split evenly across the
processes), with dropout off, so the adapters must come out the same whatever the number of
processes, up to float32 summation order.
"""

from __future__ import annotations

import os
import sys

import qalora
import torch
import torch.distributed as dist
import transformers
from qalora import distributed
from qalora.train import finetune
from safetensors.torch import save_file
from tiny_models import tiny_llama

STEPS, GLOBAL_BATCH, SEQ, LR = 3, 4, 16, 1e-2


def wrapped_llama():
    model = tiny_llama(0)
    return qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=4, alpha=8, dropout=0.0))


def blocks():
    return torch.randint(0, 96, (STEPS * GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def adapters(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous().clone()
    return out


def with_qalora_finetune():
    """qalora.train.finetune, which wraps the model in DDP itself."""
    model = wrapped_llama()
    finetune(model, blocks(), STEPS, batch_size=GLOBAL_BATCH, lr=LR, warmup=1, show_progress=False)
    return adapters(model)


def with_fsdp2():
    """FSDP2: each decoder layer and the root sharded with fully_shard, then finetune."""
    model = wrapped_llama()
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    finetune(model, blocks(), STEPS, batch_size=GLOBAL_BATCH, lr=LR, warmup=1, show_progress=False)
    return adapters(model)


def with_accelerate():
    """A plain loop prepared by Hugging Face Accelerate (DDP under several processes)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = wrapped_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    data, per = blocks(), GLOBAL_BATCH // world
    for step in range(STEPS):
        ids = data[step * GLOBAL_BATCH + rank * per : step * GLOBAL_BATCH + (rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
    return adapters(accelerator.unwrap_model(model))


def with_trainer(out_dir):
    """Hugging Face Trainer (DDP through Accelerate under several processes)."""
    _, world = distributed.rank_and_world()
    data = blocks()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    model = wrapped_llama()
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return adapters(model)


def main(out_dir):
    distributed.init_from_environment()
    rank, world = distributed.rank_and_world()
    results = {
        "qalora_finetune": with_qalora_finetune(),
        "fsdp2": with_fsdp2(),
        "accelerate": with_accelerate(),
        "trainer": with_trainer(out_dir),
    }
    if rank == 0:
        for name, tensors in results.items():
            save_file(tensors, os.path.join(out_dir, f"{name}-{world}.safetensors"))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("QALORA_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1])
    # Everything is written. Leave without interpreter shutdown: the Trainer's and
    # Accelerate's own collectives (not qalora's, which wait for gloo to let go of their
    # tensors, see qalora.distributed._release_here) can leave a gloo worker thread freeing a
    # Python-owned tensor while the interpreter finalizes, which aborts the rank ("terminate
    # called without an active exception") after its work is done; seen once in a CI run on a
    # loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
