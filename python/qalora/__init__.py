"""qalora: QA-LoRA (quantization-aware low-rank adaptation) for PyTorch and Hugging Face.

Fine-tune small adapters on a frozen group-wise INT-b base, then merge them exactly into
the quantized weights and ship a pure low-bit model::

    import qalora
    model = qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=16))
    ...train (only the adapters require grad)...
    qalora.merge(model)
    qalora.save_pretrained(model, "out/")
"""

# torch must be imported before the extension: the extension links the libtorch inside it.
import torch  # noqa: F401

from . import _core, errors, ops
from .checkpoint import from_pretrained, load_adapter, save_adapter, save_pretrained
from .config import CONFIG_VERSION, QALoRAConfig
from .errors import *  # noqa: F403
from .formats.gguf import load_gguf
from .formats.gguf_export import ExportReport, export_gguf
from .layers import QALoRALinear, QuantLinear
from .loaders import LoadedModel, load_model
from .state import QALoRAState, state_of
from .wrapping import ModelSummary, memory_bytes, merge, merge_requantize, set_activations, summary, wrap

__version__ = _core.__version__

__all__ = [
    "__version__",
    "ops",
    "errors",
    "QALoRAConfig",
    "CONFIG_VERSION",
    "QALoRALinear",
    "QuantLinear",
    "QALoRAState",
    "state_of",
    "ModelSummary",
    "wrap",
    "merge",
    "merge_requantize",
    "summary",
    "memory_bytes",
    "save_pretrained",
    "from_pretrained",
    "save_adapter",
    "load_adapter",
    "set_activations",
    "load_model",
    "LoadedModel",
    "load_gguf",
    "export_gguf",
    "ExportReport",
    *list(errors.__all__),
]
