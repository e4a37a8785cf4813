"""Helpers for tests that damage checkpoints on purpose."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from contextlib import contextmanager


@contextmanager
def deadline(seconds: int = 20):
    """Fails the test instead of hanging it (a FIFO opened for reading blocks forever, a
    hostile file must not make a load loop): a TimeoutError after ``seconds``."""

    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s: the loader blocked or looped")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def resign(directory, config_name: str = "qalora_config.json") -> None:
    """Rewrites the manifest of ``directory`` to match its files as they are now, as a
    hostile writer would: the loader must then catch the damage by validation alone."""
    directory = os.fspath(directory)
    path = os.path.join(directory, config_name)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    files = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name == config_name or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            blob = f.read()
        files[name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    data["files"] = files
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
