"""``qalora export`` and the GGUF step of ``finetune --gguf`` / ``demo``: write a model as a
GGUF file, its export report beside it, and tell the user how to run it."""

from __future__ import annotations

import os

from ..formats.gguf_export import GGUFExportReport, export_gguf, save_report
from ..io import atomic_write_text
from ..loaders import load_model


def report_path(gguf_path: str) -> str:
    return gguf_path + ".report.json"


def _modelfile_line(gguf_path: str) -> str:
    return f"FROM ./{os.path.basename(gguf_path)}\n"


def _written_by_qalora(path: str) -> bool:
    """A Modelfile qalora wrote: one ``FROM ./<file>.gguf`` line (any other text is the user's)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.splitlines()
    return len(lines) == 1 and lines[0].startswith("FROM ./") and lines[0].endswith(".gguf")


def modelfile_for(gguf_path: str) -> str | None:
    """The Ollama Modelfile beside ``gguf_path`` that names it (``Modelfile``, or
    ``<name>.Modelfile`` where ``Modelfile`` is the user's own), or None."""
    directory = os.path.dirname(os.path.abspath(gguf_path))
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    for name in ("Modelfile", f"{stem}.Modelfile"):
        candidate = os.path.join(directory, name)
        try:
            with open(candidate, encoding="utf-8") as f:
                if f.read(4096) == _modelfile_line(gguf_path):
                    return candidate
        except (OSError, UnicodeDecodeError):
            continue
    return None


def write_modelfile(gguf_path: str) -> str:
    """Writes (atomically) an Ollama Modelfile naming ``gguf_path`` beside it and returns its
    path: ``Modelfile``, unless one there holds text qalora did not write, which is kept,
    and then ``<name>.Modelfile``."""
    directory = os.path.dirname(os.path.abspath(gguf_path))
    path = os.path.join(directory, "Modelfile")
    if os.path.lexists(path) and not _written_by_qalora(path):
        stem = os.path.splitext(os.path.basename(gguf_path))[0]
        path = os.path.join(directory, f"{stem}.Modelfile")
    atomic_write_text(path, _modelfile_line(gguf_path))
    return path


def write_gguf(
    model, tokenizer, path: str, *, other_type: str = "q8_0", source=None, pre_tokenizer=None
) -> GGUFExportReport:
    """Exports, saves the report as ``<path>.report.json`` and an Ollama Modelfile naming the
    file beside it (:func:`write_modelfile`)."""
    report = export_gguf(
        model, path, tokenizer=tokenizer, other_type=other_type, source=source, pre_tokenizer=pre_tokenizer
    )
    save_report(report, report_path(path))
    write_modelfile(path)
    return report


def how_to_run(path: str, name: str = "qalora-model", prompt: str = "ROMEO.", chat: bool = False) -> str:
    """How to run the file: llama-cpp-python (what pip users have), llama.cpp's own CLI, and
    Ollama when a Modelfile beside the file names it. ``chat``: the model was tuned on chat
    data, so the examples chat (through the file's chat template)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    lines = [f"qalora: GGUF model written to {path}", f"  report: {report_path(path)}"]
    if chat:
        messages = [{"role": "user", "content": prompt}]
        lines += [
            "Chat with it through llama-cpp-python (pip install llama-cpp-python), which formats the chat with the "
            "file's template:",
            f'  python -c "from llama_cpp import Llama; print(Llama({path!r}, verbose=False).create_chat_completion('
            f"{messages!r}, max_tokens=64)['choices'][0]['message']['content'])\"",
            "or with llama.cpp's own CLI (conversation mode):",
            f"  llama-cli -m {path} -cnv",
        ]
    else:
        lines += [
            "Run it with llama-cpp-python (pip install llama-cpp-python):",
            f'  python -c "from llama_cpp import Llama; '
            f"print(Llama({path!r}, verbose=False)({prompt!r}, max_tokens=64)['choices'][0]['text'])\"",
            "or with llama.cpp's own CLI:",
            f"  llama-cli -m {path} -p {prompt!r} -n 64",
        ]
    modelfile = modelfile_for(path)
    if modelfile is not None:
        lines += [
            f"or with Ollama ({os.path.basename(modelfile)} beside it says FROM ./{os.path.basename(path)}):",
            f"  cd {directory} && ollama create {name} -f {os.path.basename(modelfile)} && ollama run {name}",
        ]
    lines.append("or open it in LM Studio.")
    return "\n".join(lines)


def run_export(args) -> GGUFExportReport:
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
