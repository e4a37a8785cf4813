"""Text data for fine-tuning and evaluation: the bundled dataset, user files, token blocks.

User data:

* ``.jsonl``: one JSON object per line, either ``{"instruction": ..., "response": ...}``
  (optionally ``"input"``) or ``{"text": ...}``;
* ``.txt`` / ``.md``: plain text.

Without an explicit held-out file, the last 10% of the user's records is held out.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DataError

BUNDLED = "shakespeare"
_BUNDLED_FILE = os.path.join(os.path.dirname(__file__), "bundled", "shakespeare.json.gz")


@dataclass
class TextSplits:
    name: str
    train: list[str]
    heldout: list[str]


def bundled_dataset() -> TextSplits:
    """Five public-domain Shakespeare plays; the last ~10% of each is held out
    (see ``qalora/bundled/NOTICE.md``)."""
    with gzip.open(_BUNDLED_FILE, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return TextSplits(data["name"], [p["text"] for p in data["train"]], [p["text"] for p in data["heldout"]])


def _format_record(obj, path: str, line_no: int) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and isinstance(obj["text"], str):
        return obj["text"]
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("response", obj.get("output")), str):
        response = obj.get("response", obj.get("output"))
        extra = obj.get("input") or ""
        prompt = obj["instruction"] + (f"\n\n{extra}" if extra else "")
        return f"### Instruction:\n{prompt}\n\n### Response:\n{response}"
    raise DataError(
        f"{path}:{line_no}: a record needs a string 'text', or string 'instruction' and 'response' fields; got keys {sorted(obj)}"
    )


def read_texts(path) -> list[str]:
    """Records of a .jsonl file or the paragraphs-joined content of a text file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            if ext == ".jsonl":
                records = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                        records.append(_format_record(obj, path, i))
                texts = records
            elif ext in (".txt", ".md", ".text", ""):
                content = f.read()
                texts = [p for p in content.split("\n\n") if p.strip()]
            else:
                raise DataError(f"data file {path!r}: unsupported extension {ext!r}; use .jsonl or .txt")
    except UnicodeDecodeError:
        raise DataError(f"data file {path!r} is not UTF-8 text") from None
    if not texts:
        raise DataError(f"data file {path!r} holds no text")
    return texts


def load_dataset(spec: str | None = None, heldout: str | None = None) -> TextSplits:
    """``None`` or "shakespeare": the bundled dataset. A path: a user file (see module doc)."""
    if spec in (None, BUNDLED):
        return bundled_dataset()
    texts = read_texts(spec)
    if heldout is not None:
        return TextSplits(os.path.basename(spec), texts, read_texts(heldout))
    if len(texts) < 2:
        # One long document: hold out its last 10% of characters.
        cut = int(len(texts[0]) * 0.9)
        return TextSplits(os.path.basename(spec), [texts[0][:cut]], [texts[0][cut:]])
    cut = max(1, int(len(texts) * 0.9))
    return TextSplits(os.path.basename(spec), texts[:cut], texts[cut:])


def token_blocks(tokenizer, texts: Sequence[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenizes the texts (joined by EOS) into a (num_blocks, block_size) LongTensor."""
    if block_size < 2:
        raise DataError(f"block_size: got {block_size}, it must be at least 2")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_blocks is not None and len(ids) >= (max_blocks + 1) * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"the data holds {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
