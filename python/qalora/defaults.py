"""Defaults of the :class:`qalora.QALoRAConfig` fields that say what trains, in a module that
imports nothing (the command line shows them in ``--help`` without loading torch).
Chosen from measurements: benches/RESULTS.md, "The exact route against re-quantization"."""

TRAIN_SCALES = False
TRAIN_OFFSETS = False
TRAIN_NORMS = False
GROUP_LR_SCALE = 1.0
