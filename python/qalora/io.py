"""Atomic file writes: write a temporary file beside the target, fsync, rename over it.

A crash or an error mid-write leaves the old file (or none), never a truncated one.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@functools.cache
def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 less the umask).
    Read once: the umask can only be read by setting it, which is not thread-safe later on."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yields a temporary path in the target's directory; renames it onto ``path`` on success.
    The file ends up with the permissions an ordinary write would give it (mkstemp's 0600
    would hide a model file from, say, an Ollama server running as another user)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors wants contiguous CPU tensors that share no storage.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata=metadata)


def atomic_write_with(path, write: Callable[[str], None]) -> None:
    """Runs ``write(tmp_path)`` and moves the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
