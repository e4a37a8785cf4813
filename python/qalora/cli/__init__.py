"""The ``qalora`` command line: finetune, eval, demo, compare, export.

qalora demo                                   # bundled SmolLM2 + bundled Shakespeare, ends with model.gguf
qalora finetune --model smollm2 --data train.jsonl --bits 4 --group-size 32 --out run/ --gguf
qalora eval --model run/model --data heldout.txt
qalora compare --steps 40                     # the paper's comparison on SmolLM2

Everything a run needs is checked before the slow work starts (arguments, the model path,
the data, ``--out``, whether the settings fit the model's layers). Outputs are written
beside ``--out`` and moved into place when the run succeeds, so a failed run leaves
``--out`` as it was. torch and transformers are imported only once a command runs, so
``--help`` is fast.
qalora export --model run/model --out run/model.gguf   # for llama.cpp, Ollama, LM Studio
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

from .. import defaults

SMOKE_ENV = "QALORA_SMOKE"


def smoke() -> bool:
    """Smoke mode (CI, notebooks under test): tiny step and block counts."""
    return os.environ.get(SMOKE_ENV, "") not in ("", "0")


class UsageError(ValueError):
    """A command-line value that cannot work (reported in one line before any work). Not a
    QALoRAError: qalora.errors loads the extension (and torch), which --help must not."""


# ------------------------------------------------------------------ argument types


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _int_up_to(limit: int):
    """An argument type: a positive integer of at most ``limit`` (larger values are typos that
    would only fail later, inside an allocation)."""

    def parse(text: str) -> int:
        v = _positive_int(text)
        if v > limit:
            raise argparse.ArgumentTypeError(f"got {v}, allowed: 1..{limit}")
        return v

    parse.__name__ = "positive integer"  # what argparse names in its messages
    return parse


#: Upper bounds of the size options (what no run on one machine comes near).
MAX_BATCH = 1 << 16
MAX_BLOCK = 1 << 20
MAX_STEPS = 1 << 30
MAX_BLOCKS = 1 << 24
MAX_THREADS = 1 << 12


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        bits, sep, g = item.strip().partition(":")
        try:
            pair = (int(bits), int(g))
        except ValueError:
            pair = None
        if not sep or pair is None or pair[1] <= 0:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not BITS:GROUP_SIZE (e.g. 4:64); expected comma-separated pairs such as 4:64,3:32"
            )
        out.append(pair)
    return out


def _quantizers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("rtn", "gptq")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated quantizers from rtn, gptq; got {text!r}")
    return list(dict.fromkeys(names))


def _methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in defaults.EXACT_METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated methods from {', '.join(defaults.EXACT_METHODS)}; got {text!r}"
        )
    return list(dict.fromkeys(names))


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. lm_head,mlp.down_proj")
    return names


# ------------------------------------------------------------------ parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return super()._get_help_string(action)


BITS_HELP = "bits per weight code: one of qalora.ops.SUPPORTED_BITS (2, 3, 4, 5, 6, 8 in this release)"


def _add_model_data(p: argparse.ArgumentParser, model_default: str | None, scores_whole_file: bool = False) -> None:
    if model_default is None:
        p.add_argument(
            "--model",
            required=True,
            help="a directory written by qalora (finetune's model/, or qalora.save_pretrained), a Hugging Face "
            "model directory, a .gguf file, or 'smollm2' (bundled); required, no default",
        )
    else:
        p.add_argument(
            "--model",
            default=model_default,
            help="'smollm2' (the bundled SmolLM2-135M-Instruct), a .gguf file, a Hugging Face model directory, "
            "or a directory written by qalora",
        )
    if scores_whole_file:
        p.add_argument(
            "--data",
            default=None,
            help="the text to score, whole: .jsonl (instruction/response or text records; chat records score "
            "their assistant tokens) or .txt (default: the bundled Shakespeare's held-out split, the one finetune "
            "evaluates)",
        )
        p.add_argument("--heldout", default=None, help="the same as --data (kept for symmetry with finetune)")
        return
    p.add_argument(
        "--data",
        default=None,
        help="training data: .jsonl (text, instruction/response, chat 'messages' or prompt/completion records) or "
        ".txt (default: the bundled Shakespeare)",
    )
    p.add_argument(
        "--heldout", default=None, help="held-out data file for perplexity (default: the last 10%% of --data)"
    )


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=_int_up_to(MAX_THREADS), default=None, help="torch CPU threads (default: torch's own choice)"
    )


def _add_run_options(p: argparse.ArgumentParser, out_default: str | None) -> None:
    _add_model_data(p, "smollm2")
    p.add_argument(
        "--bits", type=_int_arg, default=None, help=BITS_HELP + " (default: 4; on a GGUF model, the file's own)"
    )
    p.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        help="input columns per quantization group (default: 32; on a GGUF model, the file's own)",
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="on a GGUF model: quantize its (dequantized) layers again at --bits / --group-size instead of "
        "training on the file's own codes (loses what the file's quantizer chose; default: off)",
    )
    p.add_argument(
        "--rank",
        type=_int_up_to(defaults.MAX_RANK),
        default=16,
        help="adapter rank (at most min(in_features, out_features) of the adapted layers)",
    )
    p.add_argument("--alpha", type=_positive_float, default=32.0, help="adapter alpha (scaling = alpha / rank)")
    p.add_argument("--dropout", type=_probability, default=0.05, help="dropout on the adapter input, in [0, 1)")
    p.add_argument(
        "--scale-dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype of the group scales and offsets",
    )
    p.add_argument(
        "--quantizer",
        default="rtn",
        choices=["rtn", "gptq"],
        help="how the base is quantized: min-max round-to-nearest, or GPTQ calibrated on the training data",
    )
    _add_quantizer_options(p)
    p.add_argument(
        "--exclude",
        type=_names,
        default=None,
        help="comma-separated layers to leave dense: names, suffixes or parent names, e.g. mlp.down_proj "
        "(default: none excluded)",
    )
    p.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="also quantize the token embedding (and an output head tied to it, sharing the same codes) with "
        "--bits / --group-size, frozen, without adapters; smaller model, slightly higher perplexity "
        "(default: off, both stay dense)",
    )
    _add_trainable_options(p)
    p.add_argument(
        "--on-indivisible",
        default="raise",
        choices=["raise", "skip"],
        help="a layer whose in_features the group size does not divide: refuse the run, or leave that layer dense",
    )
    p.add_argument(
        "--fixed-offset-layers",
        default="skip",
        choices=["skip", "adapt"],
        help="GGUF layers stored as Q3_K / Q6_K / Q8_0 (offset fixed by the scale): leave them without adapters "
        "(default: the export keeps their bytes) or adapt them (the export then re-quantizes them to Q8_0)",
    )
    p.add_argument("--steps", type=_int_up_to(MAX_STEPS), default=60, help="training steps")
    p.add_argument("--batch-size", type=_int_up_to(MAX_BATCH), default=4, help="sequences per training step")
    p.add_argument(
        "--block-size",
        type=_int_up_to(MAX_BLOCK),
        default=128,
        help="tokens per sequence (at most the model's max_position_embeddings)",
    )
    p.add_argument(
        "--packing",
        default="pack",
        choices=["pack", "pad"],
        help="chat data ('messages' or 'prompt'/'completion' records): pack whole examples into each --block-size "
        "block, or pad one example per block; an example longer than a block is cut to it with a warning that "
        "counts them (text data is always one token stream cut into blocks)",
    )
    p.add_argument(
        "--train-on-all-tokens",
        action="store_true",
        help="chat data: train and score held-out perplexity on every token (system and user turns, template "
        "markup) instead of the assistant's replies alone (default: off, assistant tokens only)",
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--eval-blocks", type=_int_up_to(MAX_BLOCKS), default=24, help="held-out sequences for perplexity")
    p.add_argument("--seed", type=_int_arg, default=0, help="random seed (adapter init, batch order)")
    _add_threads(p)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="train under torch.autocast bfloat16: the frozen base runs bf16 GEMMs, the adapters keep float32 "
        "weights, gradients and optimizer state (fastest on CPUs with native bf16; on a CPU without it, "
        "e.g. AVX2-only, a step would be ~35x slower, so training stays float32 with a warning unless "
        "--force-bf16; default: float32)",
    )
    p.add_argument(
        "--force-bf16",
        action="store_true",
        help="with --bf16: use bf16 autocast even on a CPU without native bf16 arithmetic (slow there)",
    )
    if out_default is None:
        p.add_argument(
            "--out", required=True, help="output directory (a new or empty one, or a previous run's); required"
        )
    else:
        p.add_argument(
            "--out",
            default=out_default,
            help=f"output directory (a new or empty one, or a previous run's) (default: ./{out_default}, "
            f"which the repository's .gitignore covers)",
        )


def _add_trainable_options(p: argparse.ArgumentParser) -> None:
    # Defaults are QALoRAConfig's, so the command line and the Python API train the same.
    on_off = lambda v: "on" if v else "off"
    p.add_argument(
        "--train-scales",
        action=argparse.BooleanOptionalAction,
        default=defaults.TRAIN_SCALES,
        help="also train each quantized layer's per-group scales; they are stored in the low-bit format, so the "
        f"merge stays exact (default: {on_off(defaults.TRAIN_SCALES)})",
    )
    p.add_argument(
        "--train-offsets",
        action=argparse.BooleanOptionalAction,
        default=defaults.TRAIN_OFFSETS,
        help="also train the per-group offsets at full rank beside the pooled adapter; exact after the merge "
        f"(default: {on_off(defaults.TRAIN_OFFSETS)})",
    )
    p.add_argument(
        "--train-norms",
        action=argparse.BooleanOptionalAction,
        default=defaults.TRAIN_NORMS,
        help="also train the normalization layers' weights, which every format stores as they are "
        f"(default: {on_off(defaults.TRAIN_NORMS)})",
    )
    _add_lr_scales(p)


def _add_lr_scales(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--offset-lr-scale",
        type=_positive_float,
        default=defaults.OFFSET_LR_SCALE,
        help="learning rate of trained offsets relative to --lr (their unit: one code step of the group)",
    )
    p.add_argument(
        "--scale-lr-scale",
        type=_positive_float,
        default=defaults.SCALE_LR_SCALE,
        help="learning rate of trained scales relative to --lr (their unit: a relative change of the scale)",
    )


def _add_quantizer_options(p: argparse.ArgumentParser, gguf: bool = True) -> None:
    p.add_argument(
        "--calibration-blocks",
        type=_int_up_to(MAX_BLOCKS),
        default=128,
        help="GPTQ: training-data blocks (of --block-size tokens) to calibrate on",
    )
    p.add_argument(
        "--damp-percent",
        type=_positive_float,
        default=0.01,
        help="GPTQ dampening, a fraction of the mean Hessian diagonal",
    )
    p.add_argument(
        "--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal, static groups"
    )
    if not gguf:
        return
    p.add_argument(
        "--gguf",
        nargs="?",
        const="model.gguf",
        default=None,
        help="also write the merged model as a GGUF file for llama.cpp / Ollama (name model.gguf when given "
        "without one; inside --out unless absolute; default: no GGUF)",
    )
    p.add_argument("--other-type", default="q8_0", choices=["q8_0", "f16"], help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qalora",
        description="QA-LoRA: fine-tune on a low-bit base, merge exactly, ship a low-bit model.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ft = sub.add_parser(
        "finetune",
        help="quantize, wrap, train, merge and save a model",
        description="Quantize a model, train QA-LoRA adapters, merge them into the low-bit weights and write "
        "model/, adapter/, loss_curve.png and report.json/report.md into --out.",
        formatter_class=_HelpFormatter,
    )
    _add_run_options(ft, out_default=None)
    demo = sub.add_parser(
        "demo",
        help="finetune the bundled SmolLM2 on the bundled data (about 5 minutes on a quiet 2-core machine)",
        description="qalora finetune with the bundled SmolLM2-135M-Instruct and the bundled Shakespeare data.",
        formatter_class=_HelpFormatter,
    )
    _add_run_options(demo, out_default="qalora-demo")
    ev = sub.add_parser(
        "eval",
        help="held-out perplexity of a model (a qalora output directory or any model)",
        description="Held-out perplexity of a model; prints one JSON line.",
        formatter_class=_HelpFormatter,
    )
    _add_model_data(ev, None, scores_whole_file=True)
    ev.add_argument("--block-size", type=_int_up_to(MAX_BLOCK), default=128, help="tokens per sequence")
    ev.add_argument("--eval-blocks", type=_int_up_to(MAX_BLOCKS), default=24, help="held-out sequences for perplexity")
    ev.add_argument("--batch-size", type=_int_up_to(MAX_BATCH), default=4, help="sequences per forward pass")
    _add_threads(ev)
    cmp_ = sub.add_parser(
        "compare",
        help="QA-LoRA vs QLoRA-style deployment at several bit widths (the paper's Table 1 pattern)",
        description="Trains QA-LoRA and a QLoRA-style dense adapter at each setting, deploys both (exact merge vs "
        "merge + re-quantization) and compares held-out perplexity.",
        formatter_class=_HelpFormatter,
    )
    _add_model_data(cmp_, "smollm2")
    cmp_.add_argument(
        "--settings",
        type=_settings,
        default=_settings("4:64,3:32,2:32"),
        help="comma-separated BITS:GROUP_SIZE pairs (default: 4:64,3:32,2:32)",
    )
    cmp_.add_argument(
        "--quantizers",
        type=_quantizers,
        default=["rtn"],
        help="comma-separated base quantizers to compare: rtn, gptq (default: rtn)",
    )
    cmp_.add_argument(
        "--methods",
        type=_methods,
        default=["qalora", "qalora+offsets", "qalora+scales+offsets", "qalora+scales+offsets+norms"],
        help="comma-separated exact methods to train (each is the pooled QA-LoRA adapter plus the group "
        "parameters named): qalora, qalora+offsets, qalora+scales, qalora+scales+offsets, qalora+norms, "
        "qalora+offsets+norms, qalora+scales+offsets+norms",
    )
    _add_lr_scales(cmp_)
    cmp_.add_argument(
        "--gguf",
        action="store_true",
        help="also export each exact method's merged model as GGUF and quantize the dense LoRA baseline with "
        "llama.cpp to Q4_1 and Q4_K_M, every file scored by llama.cpp (needs llama-cpp-python)",
    )
    _add_quantizer_options(cmp_, gguf=False)
    cmp_.add_argument("--steps", type=_int_up_to(MAX_STEPS), default=40, help="training steps per method and setting")
    cmp_.add_argument("--batch-size", type=_int_up_to(MAX_BATCH), default=4, help="sequences per training step")
    cmp_.add_argument("--block-size", type=_int_up_to(MAX_BLOCK), default=128, help="tokens per sequence")
    cmp_.add_argument("--rank", type=_int_up_to(defaults.MAX_RANK), default=16, help="adapter rank")
    cmp_.add_argument("--alpha", type=_positive_float, default=32.0, help="adapter alpha (scaling = alpha / rank)")
    cmp_.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate")
    cmp_.add_argument(
        "--eval-blocks", type=_int_up_to(MAX_BLOCKS), default=24, help="held-out sequences for perplexity"
    )
    cmp_.add_argument("--seed", type=_int_arg, default=0, help="random seed")
    cmp_.add_argument(
        "--no-reference",
        action="store_true",
        help="skip training the fp32 dense LoRA reference (a row that deploys nothing; saves one training run)",
    )
    _add_threads(cmp_)
    cmp_.add_argument(
        "--out",
        default="qalora-compare",
        help="output directory (a new or empty one, or a previous comparison's) (default: ./qalora-compare)",
    )
    ex = sub.add_parser(
        "export",
        help="write a model as a GGUF file for llama.cpp, Ollama and LM Studio",
        description="Write a model as GGUF: merged QA-LoRA layers exactly as Q4_1/Q5_1, tensors training did not "
        "change copied from the source GGUF byte for byte.",
        formatter_class=_HelpFormatter,
    )
    ex.add_argument(
        "--model",
        required=True,
        help="a qalora output directory (finetune's model/), a .gguf file or a model directory; required",
    )
    ex.add_argument("--out", required=True, help="the .gguf file to write; required")
    ex.add_argument(
        "--source",
        default=None,
        help="GGUF file to take metadata and unchanged tensors from (default: the file the model came from)",
    )
    ex.add_argument(
        "--other-type",
        default="q8_0",
        choices=["q8_0", "f16"],
        help="type of weights Q4_1/Q5_1 cannot hold exactly (6/8-bit codes, groups of 16, dense layers)",
    )
    ex.add_argument(
        "--pre-tokenizer",
        default=None,
        help="llama.cpp's pre-tokenizer name, for tokenizers qalora does not recognise (default: detected)",
    )
    return parser


# ------------------------------------------------------------------ checks before any work

#: The file each command leaves in --out: an --out holding it may be replaced by a new run.
OUT_MARKERS = {"finetune": "report.json", "demo": "report.json", "compare": "compare.json"}


def check_out_dir(path: str, marker: str) -> str:
    """``--out`` must be creatable and writable, and (if it exists) an empty directory or a
    previous output of the same command: a run replaces it as a whole."""
    out = os.path.abspath(path)
    probe = out
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if probe != out and not os.path.isdir(probe):
        raise UsageError(f"--out {path}: {probe} is a file, not a directory")
    if probe == out:
        if not os.path.isdir(out):
            raise UsageError(f"--out {path} is a file, not a directory")
        entries = os.listdir(out)
        if entries and marker not in entries:
            raise UsageError(
                f"--out {path} holds other files ({', '.join(sorted(entries)[:3])}...); a run replaces its --out "
                f"as a whole, so give a new or empty directory, or a previous output of this command"
            )
        cwd = os.path.abspath(os.getcwd())
        if cwd == out or cwd.startswith(out + os.sep):
            raise UsageError(f"--out {path} is the current directory; give a subdirectory")
        probe = os.path.dirname(out)
    try:
        os.makedirs(probe, exist_ok=True)
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write in {probe}: {e.strerror}") from None
    return out


def _check_bits(parser: argparse.ArgumentParser, args) -> None:
    from ..ops import SUPPORTED_BITS

    bits = [args.bits] if hasattr(args, "bits") else [b for b, _ in getattr(args, "settings", [])]
    bits = [b for b in bits if b is not None]  # None: resolved later (resolve_layout)
    for b in bits:
        if b not in SUPPORTED_BITS:
            option = "--bits" if hasattr(args, "bits") else "--settings"
            parser.error(f"argument {option}: got {b} bits; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def preflight(parser: argparse.ArgumentParser, args) -> None:
    """Everything that can be checked before the model is loaded or any training starts."""
    from ..loaders import check_model_spec

    check_model_spec(args.model)
    for option in ("data", "heldout"):  # missing files are named before torch or a model loads
        path = getattr(args, option, None)
        if path and path != "shakespeare" and not os.path.exists(path):
            raise UsageError(f"--{option} {path}: no such file or directory")
    if args.command in OUT_MARKERS and os.path.isfile(os.path.join(args.model, "qalora_config.json")):
        raise UsageError(
            f"--model {args.model} is a model saved by qalora (already quantized); {args.command} starts from a "
            f"dense model: give the original one (qalora eval takes saved models)"
        )
    if args.command in OUT_MARKERS:
        check_out_dir(args.out, OUT_MARKERS[args.command])
        if not plotting_available():
            print(
                "qalora: matplotlib is not installed, so no loss-curve plot will be drawn "
                "(pip install matplotlib, or pip install 'qalora[hf]')",
                file=sys.stderr,
            )
    from ..distributed import launched_world_size

    world = launched_world_size()  # torchrun / accelerate launch started several processes
    if world > 1 and getattr(args, "batch_size", 0) % world:
        raise UsageError(
            f"--batch-size {args.batch_size} is the global batch and must split evenly across the {world} "
            f"launched processes; use a multiple of {world}"
        )
    _check_bits(parser, args)  # imports torch (the supported set comes from the kernels)
    if args.command in ("finetune", "demo"):
        resolve_layout(args)


def _gguf_path(spec: str | None) -> str | None:
    from ..loaders import DEFAULT_MODEL, bundled_gguf_path

    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return bundled_gguf_path()
    return spec if spec.endswith(".gguf") else None


def gguf_layer_layouts(path: str) -> dict[tuple[int, int], list[str]]:
    """(bits, group size) -> the GGUF file's quantized block matrices of that layout, read
    from its header alone (no tensor data, no torch)."""
    from ..formats.gguf_blocks import FORMATS
    from ..formats.gguf_file import read_header

    layouts: dict[tuple[int, int], list[str]] = {}
    for name, entry in read_header(path).tensors.items():
        fmt = FORMATS.get(entry.ggml_type)
        if fmt is not None and name.startswith("blk.") and name.endswith(".weight"):
            layouts.setdefault((fmt.bits, fmt.group_size), []).append(name)
    return layouts


def resolve_layout(args) -> None:
    """--bits / --group-size: on a GGUF model whose layers the file already quantizes, they
    must say what those layers are (or --requantize must ask for a new quantization), so that
    no report or config says something the model is not. Checked from the file's header,
    before anything loads; fills in the defaults (4-bit g32, or the file's own layout)."""
    path = _gguf_path(args.model)
    quantizes = args.requantize or getattr(args, "quantizer", "rtn") == "gptq"
    layouts = gguf_layer_layouts(path) if path is not None else {}
    if not layouts or quantizes:
        if args.requantize and path is None:
            raise UsageError(
                "--requantize applies to a GGUF model (its layers are quantized already); this model's dense "
                "layers are quantized at --bits / --group-size anyway"
            )
        args.bits = 4 if args.bits is None else args.bits
        args.group_size = 32 if args.group_size is None else args.group_size
        args.file_layouts = None
        return
    main_layout = max(layouts, key=lambda k: len(layouts[k]))
    args.file_layouts = {f"{b}-bit g{g}": len(names) for (b, g), names in sorted(layouts.items())}
    want = (args.bits if args.bits is not None else main_layout[0], args.group_size or main_layout[1])
    if (args.bits is not None or args.group_size is not None) and set(layouts) != {want}:
        have = ", ".join(f"{n} matrices at {layout}" for layout, n in args.file_layouts.items())
        raise UsageError(
            f"--bits {want[0]} / --group-size {want[1]}: {os.path.basename(path)} already quantizes its layers ({have}); "
            f"they train on their own codes. Leave out --bits / --group-size to train them as they are, or add "
            f"--requantize to quantize their dequantized weights again at {want[0]}-bit g{want[1]} (a second "
            f"rounding: expect a higher perplexity than the file's own)"
        )
    args.bits, args.group_size = want


# ------------------------------------------------------------------ errors a person reads


def _log_internal_error(exc: BaseException) -> str:
    """Writes the full traceback to a file and returns its path."""
    directory = os.path.join(tempfile.gettempdir(), "qalora-logs")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"qalora {' '.join(sys.argv[1:])}\n\n")
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors end here, before torch loads
    from .. import distributed
    from ..errors import QALoRAError

    try:
        preflight(parser, args)
        from ..allocator import limit_heap_retention

        limit_heap_retention()  # large temporaries go back to the system (qalora/allocator.py)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        # Launched by torchrun / accelerate launch: train data-parallel, rank 0 writes.
        if args.command == "compare" and distributed.launched_world_size() > 1:
            raise UsageError("compare runs in one process; launch it without torchrun / accelerate launch")
        distributed.init_from_environment()
        main_process = distributed.is_main_process()
        if args.command in ("finetune", "demo"):
            from .finetune import run_finetune

            if args.command == "demo":
                args.gguf = args.gguf or "model.gguf"  # the demo ends with a file llama.cpp runs
            if smoke():
                args.steps, args.eval_blocks = min(args.steps, 2), min(args.eval_blocks, 2)
                args.calibration_blocks = min(args.calibration_blocks, 4)
            report = run_finetune(args)
            if main_process:
                print(f"\nqalora: outputs in {os.path.abspath(args.out)}")
                for key in ("model_dir", "adapter_dir", "loss_curve", "report_json", "report_md", "gguf"):
                    if report["outputs"].get(key):
                        print(f"  {key:12s} {report['outputs'][key]}")
                if report["outputs"].get("gguf"):
                    from .export import how_to_run

                    print(
                        "\n"
                        + how_to_run(
                            report["outputs"]["gguf"],
                            prompt=report.get("prompt_hint", "ROMEO."),
                            chat=bool(report.get("chat")),
                        )
                    )
        elif args.command == "eval":
            from .finetune import run_eval

            ppl = run_eval(args)
            if main_process:
                print(json.dumps({"model": args.model, "heldout_perplexity": ppl}))
        elif args.command == "compare":
            from .compare import run_compare

            if smoke():
                args.steps, args.eval_blocks = min(args.steps, 2), min(args.eval_blocks, 2)
                args.calibration_blocks = min(args.calibration_blocks, 4)
            run_compare(args)
        elif args.command == "export":
            from .export import run_export

            run_export(args)
    except (QALoRAError, UsageError) as e:
        print(f"qalora: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "qalora: error: out of memory: the model, the data or the sizes asked for (--batch-size, "
            "--block-size, --rank) need more memory than this machine has; a damaged or hostile model file "
            "can claim such sizes too",
            file=sys.stderr,
        )
        return 2
    except RecursionError:
        print(
            "qalora: error: a file is nested too deeply to be read (a damaged or hostile JSON or model file)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("qalora: interrupted; --out is left as it was", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a library's error: one line here, the trace in a file
        path = _log_internal_error(e)
        print(
            f"qalora: internal error: {type(e).__name__}: {_first_line(e)}\n"
            f"qalora: the full traceback is in {path}; please report it",
            file=sys.stderr,
        )
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
