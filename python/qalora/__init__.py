"""qalora: QA-LoRA (quantization-aware low-rank adaptation) for PyTorch and Hugging Face.

Fine-tune small adapters on a frozen group-wise INT-b base, then merge them exactly into
the quantized weights and ship a pure low-bit model::

    import qalora
    model = qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=16))
    ...train (only the adapters require grad)...
    qalora.merge(model)
    qalora.save_pretrained(model, "out/", tokenizer=tokenizer)
    model = qalora.from_pretrained("out/")

The public names are imported on first use, so that ``qalora --help`` (and ``import
qalora.errors``) start without loading torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from . import errors
from .errors import *  # noqa: F403

# name -> submodule that defines it. torch is imported (before the extension, which links
# the libtorch inside it) by the first of these a program touches.
_LAZY = {
    "ops": None,
    "QALoRAConfig": "config",
    "CONFIG_VERSION": "config",
    "QALoRALinear": "layers",
    "QuantLinear": "layers",
    "QALoRAState": "state",
    "state_of": "state",
    "ModelSummary": "wrapping",
    "wrap": "wrapping",
    "merge": "wrapping",
    "merge_requantize": "wrapping",
    "summary": "wrapping",
    "memory_bytes": "wrapping",
    "set_activations": "wrapping",
    "save_pretrained": "checkpoint",
    "from_pretrained": "checkpoint",
    "save_adapter": "checkpoint",
    "load_adapter": "checkpoint",
    "load_model": "loaders",
    "LoadedModel": "loaders",
}

__all__ = ["__version__", "errors", *_LAZY, *list(errors.__all__)]  # noqa: F405  (__version__ is lazy)


def __getattr__(name: str):
    if name == "__version__":
        import torch  # noqa: F401  (before the extension)

        from . import _core

        value = _core.__version__
    elif name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = module if _LAZY[name] is None else getattr(module, name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, e.g. qalora.targets
    else:
        raise AttributeError(f"module 'qalora' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from . import ops  # noqa: F401
    from .checkpoint import from_pretrained, load_adapter, save_adapter, save_pretrained  # noqa: F401
    from .config import CONFIG_VERSION, QALoRAConfig  # noqa: F401
    from .layers import QALoRALinear, QuantLinear  # noqa: F401
    from .loaders import LoadedModel, load_model  # noqa: F401
    from .state import QALoRAState, state_of  # noqa: F401
    from .wrapping import ModelSummary, memory_bytes, merge, merge_requantize, set_activations, summary, wrap  # noqa: F401
