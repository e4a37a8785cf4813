"""Optional dependencies (the ``hf`` extra's transformers), imported where a feature needs
them, with one error that says what to install: the loaders of Hugging Face directories,
GGUF files and GPTQ checkpoints call :func:`require`."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ModelLoadError, QALoRAError


def require(
    module_name: str,
    purpose: str,
    *,
    needs: str | None = None,
    install: str | None = None,
    error: type[QALoRAError] = ModelLoadError,
) -> ModuleType:
    """The module ``module_name``, imported; if it is not installed, ``error`` (a
    :class:`~qalora.ModelLoadError` by default) saying "``purpose`` needs ``needs``: pip
    install ``install``" (``needs`` and ``install`` default to ``module_name``)."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise error(f"{purpose} needs {needs or module_name}: pip install {install or module_name}") from None
