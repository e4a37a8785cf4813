"""The checkpoint directory as a whole: found before a load (after recovering from a save
that was interrupted), and replaced atomically by a save (:func:`qalora.io.atomic_directory`),
keeping files that belong to something else (an adapter saved beside a model).
"""

from __future__ import annotations

import os

from ..errors import CheckpointError
from ..io import DirectoryError, atomic_directory, recover_directory
from ..untrusted import read_json_file


def _checkpoint_dir(directory) -> str:
    directory = recover_directory(os.path.realpath(os.fspath(directory)))
    if not os.path.exists(directory):
        raise CheckpointError(f"{directory} does not exist")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    return directory


def _old_manifest_files(directory: str, config_name: str) -> set[str]:
    """Files the checkpoint already in ``directory`` lists (they are replaced, not kept)."""
    try:
        data = read_json_file(os.path.realpath(directory), config_name, "previous checkpoint")
    except (CheckpointError, OSError, ValueError):  # ValueError: a NUL byte (the save refuses it)
        return set()
    files = data.get("files")
    return set(files) if isinstance(files, dict) else set()


def _save_directory(directory, owned: set[str], write) -> None:
    try:
        with atomic_directory(directory, keep=lambda name: name not in owned) as tmp:
            write(tmp)
    except DirectoryError as e:
        raise CheckpointError(f"cannot save into {os.fspath(directory)}: {e}") from None
