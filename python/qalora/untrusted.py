"""Reading files that may be hostile: a checkpoint directory (or a Hugging Face model
directory handed to a loader) is untrusted input.

Regular files only, no symlink out of the directory, and no special file (a FIFO, a device,
a socket) anywhere at the directory's top level, where other readers (a tokenizer loader)
would follow it; JSON read with a size cap before it is parsed; every file checked against
the manifest a checkpoint's JSON records (size and SHA-256). Every refusal is a
:class:`~qalora.CheckpointError` naming the file. :mod:`qalora.checkpoint` reads its files
through here, and :func:`qalora.load_model` scans a Hugging Face directory with
:func:`scan_directory` before transformers reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import CheckpointError

#: Cap that keeps a hostile JSON file from exhausting memory before it is validated.
MAX_JSON_BYTES = 64 << 20


def safe_file(directory: str, name: str, what: str) -> str:
    """The real path of ``directory/name``, which must be a regular file inside
    ``directory`` (a symlink may point elsewhere inside it, never out of it)."""
    path = os.path.join(directory, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} ({what}) does not exist; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{path} ({what}): cannot read it: {e.strerror}") from None
    real = path
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)
        if os.path.commonpath([real, directory]) != directory:
            raise CheckpointError(f"{path} ({what}) is a symlink out of the checkpoint directory (to {real})")
        try:
            st = os.stat(real)
        except OSError as e:
            raise CheckpointError(f"{path} ({what}) is a dangling symlink: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} ({what}) is not a regular file")
    return real


@contextmanager
def open_regular(path: str, what: str) -> Iterator[Any]:
    """``path`` opened for reading in binary mode, refused unless it is a regular file."""
    # O_NONBLOCK: a FIFO swapped in after the check does not block the open; fstat then
    # refuses it.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path} ({what}): cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} ({what}) is not a regular file")
        yield f


def read_json_file(directory: str, name: str, what: str) -> dict:
    """The JSON object in ``directory/name`` (a regular file of at most
    :data:`MAX_JSON_BYTES`)."""
    path = safe_file(directory, name, what)
    with open_regular(path, what) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} ({what}) is larger than {MAX_JSON_BYTES >> 20} MiB; not a qalora file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}): expected a JSON object, got {type(data).__name__}")
    return data


def scan_directory(directory: str) -> None:
    """Refuses special files (FIFOs, devices, sockets) and symlinks out of the directory
    anywhere at its top level: other readers (e.g. a tokenizer loader) would follow them."""
    try:
        entries = os.listdir(directory)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot list it: {e.strerror}") from None
    for entry in entries:
        path = os.path.join(directory, entry)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            safe_file(directory, entry, "checkpoint entry")


def _sha256(path: str, what: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open_regular(path, what) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file in ``directory`` (what a save records)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        size, digest = _sha256(os.path.join(directory, name), name)
        files[name] = {"bytes": size, "sha256": digest}
    return files


def verify_manifest(directory: str, files: dict[str, dict], config_name: str) -> None:
    """Checks each file ``files`` lists (a manifest ``config_name`` records) against its
    recorded size and SHA-256."""
    for name, entry in files.items():
        path = safe_file(directory, name, f"listed in {config_name}")
        size, digest = _sha256(path, name)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: {size} bytes with sha256 {digest[:16]}..., but {config_name} field 'files.{name}' "
                f"records {entry['bytes']} bytes with sha256 {entry['sha256'][:16]}...: the file is damaged "
                f"or was changed after the save"
            )
