"""The former name of :mod:`qalora.formats.gptq_checkpoint` (GPTQ checkpoints in and out).

Importing this module gives that module itself (``qalora.formats.gptq is
qalora.formats.gptq_checkpoint``), so every name it holds, private ones included, is here,
and setting an attribute here (a test's ``monkeypatch``) sets the one its code reads.
"""

import sys

from . import gptq_checkpoint

sys.modules[__name__] = gptq_checkpoint
