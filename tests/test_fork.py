"""Kernels in forked processes. A child forked after the parent ran a kernel on its thread pool
(a DataLoader worker with the default fork start method) inherits the pool's state but not
its threads; kernels there must still run, not wait forever for workers that do not exist."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import qalora

PYTHON_DIR = os.path.dirname(os.path.dirname(qalora.__file__))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

SCRIPT = """
import os, sys, time
import torch
import qalora
from qalora import ops

torch.manual_seed(0)
# Sizes above every kernel's parallel threshold, so each one runs on the thread pool.
W = torch.randn(1024, 512)
P, S, M = ops.quantize(W, 4, 32)
X = torch.randn(4, 512)
A, B = torch.randn(8, 16), torch.randn(1024, 8)


def run_kernels():
    p, s, m = ops.quantize(W, 4, 32)
    codes = ops.unpack(p, 4, 512)
    return torch.stack([
        ops.pack(codes, 4).float().sum(),
        ops.dequantize(p, s, m, 4, 32).sum(),
        ops.qmatmul(X, p, s, m, 4, 32).sum(),
        ops.qmatmul(X, p, s, m, 4, 32, activations="int8").sum(),
        ops.qmatmul(torch.randn(40, 512, generator=torch.Generator().manual_seed(1)), p, s, m, 4, 32).sum(),
        ops.group_pool(W, 32).sum(),
        ops.merge_offsets(m, A, B, 0.5, 32).float().sum(),
    ])


WANT = run_kernels()  # the parent's pool has run
POOL = qalora._core.thread_pool()  # torch's OpenMP team where torch uses libgomp


class Kernels(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        # A forked child never runs on the parent's OpenMP team: rayon, its own pool.
        assert qalora._core.thread_pool() == "rayon"
        return run_kernels()


# The default start method on Linux is fork; the timeout turns a hang into an error.
loader = torch.utils.data.DataLoader(Kernels(), batch_size=1, num_workers=2, timeout=120)
got = list(loader)
assert len(got) == 4 and all(torch.equal(g[0], WANT) for g in got), (got, WANT)
print("dataloader workers ok", flush=True)


def in_child(body, deadline_s=120):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"


def child():
    # torch's own OpenMP pool hangs a forked child the same way unless it is cut to one
    # thread there, as DataLoader workers do; qalora's pool needs nothing of the kind.
    torch.set_num_threads(1)
    # The child builds its own pool, then forks a grandchild, which must build another.
    if not torch.equal(run_kernels(), WANT):
        return 2
    if qalora._core.thread_pool() != "rayon":
        return 5
    return 0 if in_child(lambda: 0 if torch.equal(run_kernels(), WANT) else 3) == 0 else 4


print("fork and grandchild:", in_child(child), flush=True)
assert torch.equal(run_kernels(), WANT)  # the parent's pool still works
assert qalora._core.thread_pool() == POOL
print("parent ok")
"""


def test_kernels_run_in_forked_dataloader_workers_and_grandchildren():
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.splitlines() == ["dataloader workers ok", "fork and grandchild: 0", "parent ok"], r.stdout
