"""Defaults of the :class:`qalora.QALoRAConfig` fields that say what trains, in a module that
imports nothing (the command line shows them in ``--help`` without loading torch).
Chosen from measurements: benches/RESULTS.md, "The exact route against re-quantization"."""

TRAIN_SCALES = False
TRAIN_OFFSETS = True
TRAIN_NORMS = False
OFFSET_LR_SCALE = 10.0
SCALE_LR_SCALE = 1.0

#: Largest adapter rank a config takes: a sane cap before any model is seen (a layer further
#: limits it to min(in_features, out_features)).
MAX_RANK = 1 << 16

#: The exact methods ``qalora compare --methods`` chooses from: what each trains besides the
#: pooled QA-LoRA adapter (every one merges exactly: docs/design.md §1).
EXACT_METHODS: dict[str, dict[str, bool]] = {
    "qalora": {},
    "qalora+offsets": {"train_offsets": True},
    "qalora+scales": {"train_scales": True},
    "qalora+scales+offsets": {"train_scales": True, "train_offsets": True},
    "qalora+norms": {"train_norms": True},
    "qalora+offsets+norms": {"train_offsets": True, "train_norms": True},
    "qalora+scales+offsets+norms": {"train_scales": True, "train_offsets": True, "train_norms": True},
}
