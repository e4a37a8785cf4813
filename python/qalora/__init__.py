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
import sys
from typing import TYPE_CHECKING


class _TorchBeforeExtension:  # a meta path finder (importlib.abc would cost 0.25 s of imports)
    """Imports torch before the extension (and ``qalora.errors``, which hands its classes
    to the extension when imported): the extension links the libtorch inside torch."""

    def find_spec(self, fullname, path, target=None):
        if fullname in (f"{__name__}._core", f"{__name__}.errors"):
            import torch  # noqa: F401
        return None  # the ordinary finders load the module


if not any(isinstance(f, _TorchBeforeExtension) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchBeforeExtension())

# name -> submodule that defines it (None: the name is the submodule). Imported on first
# use, so that ``qalora --help`` starts without torch.
_LAZY = {
    "ops": None,
    "errors": None,
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
    "param_groups": "wrapping",
    "summary": "wrapping",
    "memory_bytes": "wrapping",
    "limit_heap_retention": "allocator",
    "set_activations": "wrapping",
    "prepare_for_generation": "generation",
    "quantize_head": "generation",
    "save_pretrained": "checkpoint",
    "from_pretrained": "checkpoint",
    "save_adapter": "checkpoint",
    "load_adapter": "checkpoint",
    "load_model": "loaders",
    "LoadedModel": "loaded",
    "load_gguf": "formats.gguf",
    "export_gguf": "formats.gguf_export",
    "ExportReport": "formats.gguf_export",
}


def __getattr__(name: str):
    if name == "__all__":
        from . import errors

        value = ["__version__", *_LAZY, *errors.__all__]
    elif name == "__version__":
        from . import _core

        value = _core.__version__
    elif name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = module if _LAZY[name] is None else getattr(module, name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, e.g. qalora.targets
    else:
        from . import errors

        if name not in errors.__all__:
            raise AttributeError(f"module 'qalora' has no attribute {name!r}")
        value = getattr(errors, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from . import errors, ops  # noqa: F401
    from .allocator import limit_heap_retention  # noqa: F401
    from .checkpoint import from_pretrained, load_adapter, save_adapter, save_pretrained  # noqa: F401
    from .config import CONFIG_VERSION, QALoRAConfig  # noqa: F401
    from .errors import *  # noqa: F403
    from .formats.gguf import load_gguf  # noqa: F401
    from .formats.gguf_export import ExportReport, export_gguf  # noqa: F401
    from .generation import prepare_for_generation, quantize_head  # noqa: F401
    from .layers import QALoRALinear, QuantLinear  # noqa: F401
    from .loaded import LoadedModel  # noqa: F401
    from .loaders import load_model  # noqa: F401
    from .state import QALoRAState, state_of  # noqa: F401
    from .wrapping import ModelSummary, memory_bytes, merge, merge_requantize, set_activations, summary, wrap  # noqa: F401
