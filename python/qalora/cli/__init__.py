"""The ``qalora`` command line: finetune, eval, demo, compare, export.

qalora demo                                   # bundled SmolLM2 + bundled Shakespeare, ends with model.gguf
qalora finetune --model smollm2 --data train.jsonl --bits 4 --group-size 32 --out run/ --gguf
qalora eval --model run/model --data heldout.txt
qalora compare --steps 40                     # the paper's comparison on SmolLM2
qalora export --model run/model --out run/model.gguf   # for llama.cpp, Ollama, LM Studio
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import QALoRAError

SMOKE_ENV = "QALORA_SMOKE"


def smoke() -> bool:
    """Smoke mode (CI, notebooks under test): tiny step and block counts."""
    return os.environ.get(SMOKE_ENV, "") not in ("", "0")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _add_run_options(p: argparse.ArgumentParser, out_required: bool) -> None:
    p.add_argument(
        "--model", default="smollm2", help="'smollm2' (bundled), a .gguf file or a Hugging Face model directory"
    )
    p.add_argument(
        "--data",
        default=None,
        help="training data: .jsonl (instruction/response or text) or .txt; default: bundled Shakespeare",
    )
    p.add_argument("--heldout", default=None, help="held-out data file (default: the last 10%% of --data)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8])
    p.add_argument("--group-size", type=_positive_int, default=32)
    p.add_argument("--rank", type=_positive_int, default=16)
    p.add_argument("--alpha", type=_positive_float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--steps", type=_positive_int, default=60)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--block-size", type=_positive_int, default=128, help="tokens per training sequence")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--eval-blocks", type=_positive_int, default=24, help="held-out blocks for perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=out_required, default=None, help="output directory")
    p.add_argument(
        "--gguf",
        nargs="?",
        const="model.gguf",
        default=None,
        help="also write the merged model as a GGUF file for llama.cpp / Ollama (default name model.gguf, "
        "inside --out unless absolute)",
    )
    p.add_argument("--other-type", default="q8_0", choices=["q8_0", "f16"], help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qalora", description="QA-LoRA: fine-tune on a low-bit base, merge exactly, ship a low-bit model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="quantize, wrap, train, merge and save a model")
    _add_run_options(ft, out_required=True)
    demo = sub.add_parser(
        "demo", help="finetune the bundled SmolLM2 on the bundled data (defaults), about 5 minutes on 2 cores"
    )
    _add_run_options(demo, out_required=False)
    ev = sub.add_parser("eval", help="held-out perplexity of a model (a qalora output directory or any model)")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default=None)
    ev.add_argument("--heldout", default=None)
    ev.add_argument("--block-size", type=_positive_int, default=128)
    ev.add_argument("--eval-blocks", type=_positive_int, default=24)
    ev.add_argument("--batch-size", type=_positive_int, default=4)
    cmp_ = sub.add_parser(
        "compare", help="QA-LoRA vs QLoRA-style deployment at several bit widths (the paper's Table 1 pattern)"
    )
    cmp_.add_argument("--model", default="smollm2")
    cmp_.add_argument("--data", default=None)
    cmp_.add_argument("--settings", default="4:64,3:32,2:32", help="comma-separated bits:group_size pairs")
    cmp_.add_argument("--steps", type=_positive_int, default=40)
    cmp_.add_argument("--batch-size", type=_positive_int, default=4)
    cmp_.add_argument("--block-size", type=_positive_int, default=128)
    cmp_.add_argument("--rank", type=_positive_int, default=16)
    cmp_.add_argument("--alpha", type=_positive_float, default=32.0)
    cmp_.add_argument("--lr", type=_positive_float, default=1e-3)
    cmp_.add_argument("--eval-blocks", type=_positive_int, default=24)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--out", default="qalora-compare")
    ex = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp, Ollama and LM Studio")
    ex.add_argument(
        "--model",
        required=True,
        help="a qalora output directory (finetune's model/), a .gguf file or a model directory",
    )
    ex.add_argument("--out", required=True, help="the .gguf file to write")
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
        "--pre-tokenizer", default=None, help="llama.cpp's pre-tokenizer name, for tokenizers qalora does not recognise"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command in ("finetune", "demo"):
            from .finetune import run_finetune

            if args.command == "demo":
                args.out = args.out or "qalora-demo"
                args.gguf = args.gguf or "model.gguf"  # the demo ends with a file llama.cpp runs
            if smoke():
                args.steps, args.eval_blocks = min(args.steps, 2), min(args.eval_blocks, 2)
            report = run_finetune(args)
            print(f"\nqalora: outputs in {os.path.abspath(args.out)}")
            for key in ("model_dir", "adapter_dir", "loss_curve", "report_json", "report_md", "gguf"):
                if report["outputs"].get(key):
                    print(f"  {key:12s} {report['outputs'][key]}")
            if report["outputs"].get("gguf"):
                from .export import how_to_run

                print("\n" + how_to_run(report["outputs"]["gguf"]))
        elif args.command == "eval":
            from .finetune import run_eval

            ppl = run_eval(args)
            print(json.dumps({"model": args.model, "heldout_perplexity": ppl}))
        elif args.command == "compare":
            from .compare import run_compare

            if smoke():
                args.steps, args.eval_blocks = min(args.steps, 2), min(args.eval_blocks, 2)
            run_compare(args)
        elif args.command == "export":
            from .export import run_export

            run_export(args)
    except QALoRAError as e:
        print(f"qalora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
