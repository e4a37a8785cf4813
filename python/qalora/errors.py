"""The qalora exception hierarchy.

Every error the library raises on purpose derives from :class:`QALoRAError`, and also from
the built-in type that fits (``ValueError`` or ``TypeError``; ``OSError`` for
:class:`OutputError`), so ``except ValueError`` in
user code keeps working. The Rust kernels raise these same classes: this module hands them to
the extension when it is imported (see the end of the file).
"""

from __future__ import annotations

__all__ = [
    "AdapterMismatchError",
    "CheckpointError",
    "CodeRangeError",
    "ConfigError",
    "DTypeError",
    "DataError",
    "DeviceError",
    "FormatError",
    "GroupSizeError",
    "InternalError",
    "InvalidValueError",
    "MergeError",
    "ModelLoadError",
    "NoDenseWeightError",
    "NoTargetModulesError",
    "OutputError",
    "QALoRAError",
    "QALoRAWarning",
    "ShapeError",
    "UnsupportedBitsError",
]


class QALoRAError(Exception):
    """Base class of every error raised by qalora."""


class ShapeError(QALoRAError, ValueError):
    """A tensor has the wrong shape, length or memory layout."""


class DTypeError(QALoRAError, TypeError):
    """An argument has a type or dtype the operation does not take."""


class DeviceError(QALoRAError, ValueError):
    """Tensors are on different devices, or on one the operation does not support."""


class UnsupportedBitsError(QALoRAError, ValueError):
    """The bit width is not one of 2, 3, 4, 5, 6, 8."""


class GroupSizeError(QALoRAError, ValueError):
    """The group size is zero, does not divide in_features, or breaks the packed layout."""


class CodeRangeError(QALoRAError, ValueError):
    """A code handed to ``pack`` is outside [0, 2**bits - 1]."""


class InvalidValueError(QALoRAError, ValueError):
    """A value is not acceptable (non-finite weights, a bad option string, ...)."""


class ConfigError(QALoRAError, ValueError):
    """A :class:`qalora.QALoRAConfig` is invalid or cannot be read."""


class NoTargetModulesError(ConfigError):
    """``wrap`` matched no layer; the message lists the linear-like modules it saw."""


class AdapterMismatchError(QALoRAError, ValueError):
    """A saved adapter or model does not fit the model it is loaded into."""


class MergeError(QALoRAError, ValueError):
    """An adapter cannot be merged exactly (a dense LoRA adapter: use ``merge_requantize``)."""


class NoDenseWeightError(QALoRAError, AttributeError):
    """Code read ``.weight`` off a quantized layer (``QuantLinear``, ``QuantEmbedding``) or an
    adapted one (``QALoRALinear``), which hold no dense weight matrix. Also an
    ``AttributeError``, so ``hasattr(layer, "weight")`` stays False."""


class CheckpointError(QALoRAError, ValueError):
    """A checkpoint directory is missing, incomplete or unreadable."""


class DataError(QALoRAError, ValueError):
    """A data file is missing, malformed, or too small."""


class ModelLoadError(QALoRAError, ValueError):
    """A model could not be found or loaded (missing package, file or directory)."""


class FormatError(QALoRAError, ValueError):
    """A model file (GGUF) is malformed, or holds a tensor type, architecture or tokenizer
    this qalora cannot read or write; the message names it and lists what is supported."""


class OutputError(QALoRAError, OSError):
    """A file or directory cannot be written: the target is a directory, a device, a symlink
    or a bad name, or the file system refused (permission, no space, file too large). Also an
    ``OSError``, whose ``errno`` it keeps where the system gave one."""


class InternalError(QALoRAError, RuntimeError):
    """A bug inside qalora (a Rust panic caught at the boundary). Please report it."""


class QALoRAWarning(UserWarning):
    """Something worth knowing that did not stop the operation (e.g. a layer left dense)."""


def _register_with_core() -> None:
    # The extension keeps these classes and maps each of its error kinds onto one of them;
    # it looks nothing up by name and has no fallback class.
    from . import _core

    _core.register_errors(
        shape=ShapeError,
        dtype=DTypeError,
        device=DeviceError,
        bits=UnsupportedBitsError,
        group_size=GroupSizeError,
        code_range=CodeRangeError,
        value=InvalidValueError,
        internal=InternalError,
    )


_register_with_core()
