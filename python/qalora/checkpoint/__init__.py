"""Checkpoints: a whole quantized model, or its adapters alone (safetensors + JSON, no pickle).

* :func:`save_pretrained` / :func:`from_pretrained`: a self-contained model directory:
  ``model.safetensors`` + ``qalora_config.json`` (qalora's config, the per-layer layout, a
  manifest of every file with its size and SHA-256), plus, for a Hugging Face model, its
  ``config.json`` / ``generation_config.json`` and the tokenizer files, so that
  ``from_pretrained(directory)`` alone rebuilds a ready model.
* :func:`save_adapter` / :func:`load_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json``.

Saves are atomic as a whole: the directory is written beside the target and swapped in
(:func:`qalora.io.atomic_directory`), so a crash leaves the complete old or the complete new
checkpoint. Loads treat the directory as untrusted input: regular files only, no symlink
out of the directory, size-capped JSON, every field checked against the schema
(:mod:`.schema`) and every tensor's declared dtype and shape checked before any tensor is
read, files checked against the manifest, float tensors checked finite. Every failure is a
:class:`~qalora.CheckpointError` naming the file and the field. Loaders check everything
before they change the caller's model, so a refused load leaves it as it was.

The package, by concern:

* :mod:`.schema`: the JSON files' names, versions and fields (validated on reading, written
  on saving), and the tensors each layer description implies;
* :mod:`.safetensors_header`: the weights file's header, parsed and checked before any
  tensor is read;
* :mod:`.directory`: the directory as a whole (recovered before a load, swapped in by a save);
* :mod:`.architecture`: a Hugging Face model rebuilt from the directory's ``config.json``;
* :mod:`.model`: :func:`save_pretrained` / :func:`from_pretrained`;
* :mod:`.adapters`: :func:`save_adapter` / :func:`load_adapter`;

and, outside it, :mod:`qalora.untrusted` (regular files, size-capped JSON, the manifest) and
:mod:`qalora.hf_skeleton` (the meta-device build).
"""

from __future__ import annotations

import sys
from types import ModuleType

from .. import untrusted
from ..untrusted import MAX_JSON_BYTES
from ..untrusted import scan_directory as _scan_directory  # noqa: F401  (the name loaders imported)
from . import architecture, safetensors_header, schema
from .adapters import load_adapter, save_adapter
from .architecture import MAX_CONFIG_INT
from .model import from_pretrained, save_pretrained
from .safetensors_header import MAX_HEADER_BYTES
from .schema import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    GENERATION_CONFIG,
    HF_CONFIG,
    MAX_FEATURES,
    MODEL_CONFIG,
    MODEL_FILES,
    MODEL_WEIGHTS,
    READABLE_VERSIONS,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "GENERATION_CONFIG",
    "HF_CONFIG",
    "MAX_CONFIG_INT",
    "MAX_FEATURES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "MODEL_CONFIG",
    "MODEL_FILES",
    "MODEL_WEIGHTS",
    "READABLE_VERSIONS",
    "from_pretrained",
    "load_adapter",
    "save_adapter",
    "save_pretrained",
]

# The caps above are read where they are used. Setting one here (as code written for the
# single-module checkpoint did, e.g. a test's monkeypatch of ``MAX_JSON_BYTES``) sets it there.
_CAPS: dict[str, ModuleType] = {
    "MAX_JSON_BYTES": untrusted,
    "MAX_HEADER_BYTES": safetensors_header,
    "MAX_FEATURES": schema,
    "MAX_CONFIG_INT": architecture,
}


class _Package(ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _CAPS:
            setattr(_CAPS[name], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
