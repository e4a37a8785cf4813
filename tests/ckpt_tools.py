"""Helpers for tests that damage checkpoints on purpose."""

from __future__ import annotations

import hashlib
import json
import os


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
