"""``qalora export`` and the GGUF step of ``finetune --gguf`` / ``demo``: write a model as a
GGUF file, its export report beside it, and tell the user how to run it."""

from __future__ import annotations

import os

from ..formats.gguf_export import ExportReport, export_gguf, save_report
from ..io import atomic_write_text
from ..loaders import load_model


def report_path(gguf_path: str) -> str:
    return gguf_path + ".report.json"


def write_gguf(
    model, tokenizer, path: str, *, other_type: str = "q8_0", source=None, pre_tokenizer=None
) -> ExportReport:
    """Exports, saves the report as ``<path>.report.json`` and an Ollama ``Modelfile`` beside
    the file (unless one is there already)."""
    report = export_gguf(
        model, path, tokenizer=tokenizer, other_type=other_type, source=source, pre_tokenizer=pre_tokenizer
    )
    save_report(report, report_path(path))
    modelfile = os.path.join(os.path.dirname(os.path.abspath(path)), "Modelfile")
    if not os.path.exists(modelfile):
        atomic_write_text(modelfile, f"FROM ./{os.path.basename(path)}\n")
    return report


def how_to_run(path: str, name: str = "qalora-model") -> str:
    path = os.path.abspath(path)
    directory, file = os.path.split(path)
    return "\n".join(
        [
            f"qalora: GGUF model written to {path}",
            f"  report: {report_path(path)}",
            "Run it with llama.cpp:",
            f'  llama-cli -m {path} -p "ROMEO." -n 64',
            "or with Ollama (a Modelfile that says FROM ./" + file + " is next to it):",
            f"  cd {directory} && ollama create {name} -f Modelfile && ollama run {name}",
            "or open it in LM Studio.",
        ]
    )


def run_export(args) -> ExportReport:
    lm = load_model(args.model)
    report = write_gguf(
        lm.model,
        lm.tokenizer,
        args.out,
        other_type=args.other_type,
        source=args.source,
        pre_tokenizer=args.pre_tokenizer,
    )
    print(report.summary())
    print(how_to_run(args.out))
    return report
