"""qalora: QA-LoRA (quantization-aware low-rank adaptation) for PyTorch and Hugging Face.

Fine-tune small adapters on a frozen group-wise INT-b base, then merge them exactly into
the quantized weights and ship a pure low-bit model.
"""

# torch must be imported before the extension: the extension links the libtorch inside it.
import torch  # noqa: F401

from . import _core, errors, ops
from .errors import *  # noqa: F401,F403

__version__ = _core.__version__

__all__ = ["__version__", "ops", "errors"] + list(errors.__all__)
