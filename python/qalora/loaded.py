"""What a loader returns (:class:`LoadedModel`) and where loaders cache what they derive from
a model file (:func:`cache_root`).

A leaf module: :mod:`qalora.loaders` (which picks a loader for a model spec) and the format
loaders below it (:mod:`qalora.formats.gguf`) both import it, so that no loader imports the
dispatcher above it. It imports nothing else from qalora.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module; torch is imported only when a model is loaded
    tokenizer: object
    source: str
    load_seconds: float
    from_cache: bool = False
    qalora_checkpoint: bool = False


def cache_root() -> str:
    return os.environ.get("QALORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qalora", "models")
