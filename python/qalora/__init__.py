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
from .config import CONFIG_VERSION, QALoRAConfig
from .errors import *  # noqa: F401,F403
from .layers import QALoRALinear, QuantLinear
from .model import (
    ModelSummary,
    from_pretrained,
    load_adapter,
    memory_bytes,
    merge,
    merge_requantize,
    save_adapter,
    save_pretrained,
    set_activations,
    summary,
    wrap,
)

__version__ = _core.__version__

__all__ = [
    "__version__",
    "ops",
    "errors",
    "QALoRAConfig",
    "CONFIG_VERSION",
    "QALoRALinear",
    "QuantLinear",
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
] + list(errors.__all__)
