"""The former name of :mod:`qalora.gptq_quantizer` (GPTQ's calibration runner and per-layer
quantizer; GPTQ *checkpoints* are :mod:`qalora.formats.gptq_checkpoint`).

Importing this module gives that module itself (``qalora.gptq is qalora.gptq_quantizer``), so
every name it holds, private ones included, is here, and setting an attribute here (a test's
``monkeypatch``) sets the one its code reads.
"""

import sys

from . import gptq_quantizer

sys.modules[__name__] = gptq_quantizer
