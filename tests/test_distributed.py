"""Data-parallel training on CPU (gloo): two processes launched by torchrun train a tiny
wrapped Llama through qalora.train.finetune (DDP), FSDP2, Accelerate and the Hugging Face
Trainer, and `qalora finetune` runs under torchrun with rank 0 writing its outputs; each is
held to one process training on the same global batches.

Tolerance: the adapters agree to 1e-5 absolute (their values are of order 0.1-1 after
three AdamW steps at lr 1e-2). Gradients are summed across ranks in another order than one
process sums them, which moves float32 results by a few ulps (measured: 3e-7).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import qalora
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = pathlib.Path(__file__).parent
PYTHON_DIR = os.path.dirname(os.path.dirname(qalora.__file__))
ATOL = 1e-5
WAYS = ["qalora_finetune", "fsdp2", "accelerate", "trainer"]


def _env():
    env = dict(os.environ, QALORA_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, str(HERE), env.get("PYTHONPATH", "")])
    return env


def _run(cmd, cwd, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def test_two_processes_train_the_adapters_one_process_would(tmp_path):
    worker = str(HERE / "data_parallel_worker.py")
    _run([sys.executable, worker, str(tmp_path)], tmp_path)
    _run(torchrun(worker, str(tmp_path)), tmp_path)
    for way in WAYS:
        one, two = load_file(tmp_path / f"{way}-1.safetensors"), load_file(tmp_path / f"{way}-2.safetensors")
        assert one.keys() == two.keys() and len(one) == 42, way  # A, B and the offsets of 14 layers
        trained = [k for k in one if "lora_B" in k]
        assert all(one[k].abs().max() > 1e-3 for k in trained), f"{way}: the adapters did not train"
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=ATOL, msg=f"{way}: {name}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-dp"))


def _finetune_args(tiny_dir, out):
    return ["finetune", "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--batch-size", "4"]


def test_finetune_command_under_torchrun_writes_once_what_one_process_writes(tiny_dir, tmp_path):
    common = ["--block-size", "32", "--eval-blocks", "3", "--rank", "2", "--dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "qalora", *_finetune_args(tiny_dir, one), *common], tmp_path)
    r = _run(torchrun("-m", "qalora", *_finetune_args(tiny_dir, two), *common), tmp_path)
    assert r.stdout.count("qalora: outputs in") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray temporaries
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    report1, report2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert (report1["machine"]["processes"], report2["machine"]["processes"]) == (1, 2)
    for key in ("quantized_base", "qalora_unmerged", "qalora_merged"):
        a, b = report1["heldout_perplexity"][key], report2["heldout_perplexity"][key]
        assert abs(a - b) <= 1e-5 * a, key
    assert report1["losses"] == pytest.approx(report2["losses"], rel=1e-5)
    m1, m2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert m1.keys() == m2.keys()
    for name in m1:
        if m1[name].is_floating_point():
            torch.testing.assert_close(m2[name], m1[name], rtol=1e-5, atol=ATOL, msg=name)
        else:
            assert torch.equal(m1[name], m2[name]), name


def test_batch_that_does_not_split_across_processes_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun("-m", "qalora", "finetune", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "3")
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    assert "--batch-size 3 is the global batch and must split evenly across the 2 launched processes" in r.stderr
    assert not out.exists()


def test_a_collective_tensor_is_freed_by_its_caller():
    """all_reduce_sum returns only when the caller holds the last reference to the tensor it
    reduced (gloo's worker thread lets go of it just after waking the caller; freed by that
    thread during interpreter exit, it aborted one rank of finished torchrun jobs)."""
    import threading
    import time

    from qalora import distributed

    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    held = [t.view(2)]  # a second owner, as the backend's finished work is
    assert t._use_count() == 2
    threading.Timer(0.2, held.clear).start()
    start = time.monotonic()
    distributed._release_here(t)
    assert t._use_count() == 1 and time.monotonic() - start >= 0.15
