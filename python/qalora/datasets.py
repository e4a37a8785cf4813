"""Data for fine-tuning and evaluation: the bundled dataset, user files, token blocks.

User data:

* ``.jsonl``: one JSON object per line, any of

  - ``{"text": ...}`` and ``{"instruction": ..., "response": ...}`` (optionally ``"input"``):
    text records, read as strings;
  - ``{"messages": [{"role": ..., "content": ...}, ...]}`` (TRL / OpenAI chat style): a
    :class:`Conversation`, rendered with the tokenizer's chat template;
  - ``{"prompt": ..., "completion": ...}``: strings give a :class:`PromptCompletion` (plain
    text, no template, as TRL reads them); lists of messages give a :class:`Conversation`
    whose completion's assistant messages alone are trained;
* ``.txt`` / ``.md``: plain text.

Text records become one token stream cut into blocks (:func:`token_blocks`). Chat records
(a file may mix them with text records) become :class:`LabeledBlocks` (:func:`chat_blocks`):
whole examples packed into blocks or padded one per block, with labels that make the loss
cover the assistant's tokens only (or every token, ``all_tokens=True``).

Without an explicit held-out file, the last 10% of the user's records is held out.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import DataError, QALoRAWarning

BUNDLED = "shakespeare"
_BUNDLED_FILE = os.path.join(os.path.dirname(__file__), "bundled", "shakespeare.json.gz")


IGNORE_INDEX = -100  # a label the loss skips (the value torch's cross-entropy and transformers use)
PACKING = ("pack", "pad")


@dataclass(frozen=True)
class Conversation:
    """A chat record: ``messages`` (dicts with a string ``role`` and ``content``, other keys
    kept for the template), rendered with the tokenizer's chat template. Assistant messages
    at index ``train_from`` or later are what the loss covers by default. ``where`` is the
    record's place (``file:line``), for messages."""

    messages: tuple
    where: str = "<conversation>"
    train_from: int = 0


@dataclass(frozen=True)
class PromptCompletion:
    """A plain-text prompt and its completion (no chat template): the loss covers the
    completion and the EOS token after it by default."""

    prompt: str
    completion: str
    where: str = "<record>"


@dataclass
class TextSplits:
    name: str
    train: list  # of str, or (chat data) of str / Conversation / PromptCompletion
    heldout: list

    @property
    def is_chat(self) -> bool:
        """Whether any record is a chat record (then :func:`chat_blocks` tokenizes them)."""
        return is_chat(self.train) or is_chat(self.heldout)


def is_chat(records) -> bool:
    return any(isinstance(r, (Conversation, PromptCompletion)) for r in records)


def bundled_dataset() -> TextSplits:
    """Five public-domain Shakespeare plays; the last ~10% of each is held out
    (see ``qalora/bundled/NOTICE.md``)."""
    with gzip.open(_BUNDLED_FILE, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return TextSplits(data["name"], [p["text"] for p in data["train"]], [p["text"] for p in data["heldout"]])


RECORD_FORMS = (
    "a string 'text'; string 'instruction' and 'response'; 'messages' (a list of {\"role\": ..., \"content\": ...} "
    "objects); or 'prompt' and 'completion' (both strings, or both such lists)"
)


def _messages(value, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: \'{name}\' must be a non-empty list of {{"role": ..., "content": ...}} objects, '
            f"got {type(value).__name__ if not isinstance(value, list) else 'an empty list'}"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {name}[{j}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}: {name}[{j}] needs a non-empty string 'role' (e.g. system, user, assistant)")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: {name}[{j}] ({role}) needs a string 'content', got "
                f"{'none' if content is None else type(content).__name__}"
            )
        out.append(dict(m))
    return out


def _chat_record(obj: dict, where: str):
    if "messages" in obj:
        messages = _messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no 'assistant' message, so there is nothing to learn")
        return Conversation(tuple(messages), where)
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DataError(f"{where}: 'completion' is empty")
        return PromptCompletion(prompt, completion, where)
    if isinstance(prompt, list) and isinstance(completion, list):
        first = _messages(prompt, where, "prompt")
        rest = _messages(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in rest):
            raise DataError(f"{where}: 'completion' has no 'assistant' message, so there is nothing to learn")
        return Conversation(tuple(first + rest), where, train_from=len(first))
    raise DataError(
        f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages; got "
        f"{type(prompt).__name__} and {type(completion).__name__}"
    )


def _format_record(obj, path: str, line_no: int):
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and isinstance(obj["text"], str):
        return obj["text"]
    if "messages" in obj or ("prompt" in obj and "completion" in obj):
        return _chat_record(obj, f"{path}:{line_no}")
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("response", obj.get("output")), str):
        response = obj.get("response", obj.get("output"))
        extra = obj.get("input") or ""
        prompt = obj["instruction"] + (f"\n\n{extra}" if extra else "")
        return f"### Instruction:\n{prompt}\n\n### Response:\n{response}"
    raise DataError(f"{path}:{line_no}: a record needs {RECORD_FORMS}; got keys {sorted(obj)}")


def read_texts(path) -> list:
    """Records of a .jsonl file (strings, and :class:`Conversation` / :class:`PromptCompletion`
    for chat records) or the paragraphs of a text file."""
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
        if is_chat(texts):
            raise DataError(
                f"{spec}: one chat record cannot be split into training and held-out data; give more records or a "
                f"separate held-out file"
            )
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
        if not isinstance(text, str):
            raise DataError(
                f"{getattr(text, 'where', 'a record')}: a chat record ('messages' or 'prompt'/'completion'); "
                f"token_blocks takes text only: use chat_blocks (qalora finetune and eval read chat data)"
            )
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


# --------------------------------------------------------------------------- chat data


@dataclass
class LabeledBlocks:
    """Token blocks with their labels: ``input_ids`` and ``labels`` are (num_blocks,
    block_size) LongTensors; a label of :data:`IGNORE_INDEX` is not trained or scored
    (prompts, system and user turns, padding). ``examples`` is how many records the blocks
    hold, ``truncated`` how many of them were cut to the block size, ``dropped`` how many
    were left out because nothing trained was left after the cut."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    packing: str = "pack"
    all_tokens: bool = False
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


NO_TEMPLATE = (
    "chat records ('messages', or 'prompt'/'completion' lists of messages) are rendered with the tokenizer's chat "
    "template, and this tokenizer has none (a base model's usually has none): fine-tune an instruct model that has "
    "one (the bundled smollm2 has), write the data as 'text' records or string 'prompt'/'completion' records, or, in "
    "Python, set tokenizer.chat_template to a Jinja template first"
)


def has_chat_template(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and hasattr(tokenizer, "apply_chat_template")


def _render(tokenizer, messages, where: str, generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own refusals (jinja2's TemplateError, raise_exception)
        raise DataError(
            f"{where}: the tokenizer's chat template refused this conversation ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the tokenizer's chat template gave {type(text).__name__}, not text")
    return text


def _assistant_spans(tokenizer, conv: Conversation, full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` (the rendered conversation) that the trained assistant
    messages produced: each from the end of the conversation before it (rendered with the
    generation prompt, so the assistant header stays a prompt) to the end of the
    conversation up to it (its end-of-turn tokens included, so the model learns to stop)."""
    spans = []
    msgs = conv.messages
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < conv.train_from:
            continue
        upto = _render(tokenizer, msgs[: i + 1], conv.where)
        start = None
        if i > 0:
            for generation_prompt in (True, False):
                before = _render(tokenizer, msgs[:i], conv.where, generation_prompt)
                if upto.startswith(before):
                    start = len(before)
                    break
        else:
            start = 0
        if start is None or not full.startswith(upto):
            raise DataError(
                f"{conv.where}: the chat template does not render this conversation turn by turn as a growing text "
                f"(message {i} changes what comes before it), so the assistant's tokens cannot be told apart; "
                f"train on every token (--train-on-all-tokens, all_tokens=True) or change the template"
            )
        spans.append((start, len(upto)))
    return spans


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokens_with_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """``text`` tokenized whole, each token marked when it starts inside a span. Tokenizers
    without character offsets (slow ones) tokenize the pieces between span edges instead."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        offsets = None
    if offsets is not None:
        ids = list(enc["input_ids"])
        mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        return ids, mask
    ids, mask, pos = [], [], 0
    for a, b in spans:
        for lo, hi, trained in ((pos, a, False), (a, b, True)):
            piece = _tokens(tokenizer, text[lo:hi]) if hi > lo else []
            ids += piece
            mask += [trained] * len(piece)
        pos = b
    tail = _tokens(tokenizer, text[pos:]) if pos < len(text) else []
    return ids + tail, mask + [False] * len(tail)


def encode_record(tokenizer, record, *, all_tokens: bool = False) -> tuple[list[int], list[bool]]:
    """One record's token ids and which of them the loss covers: a :class:`Conversation`
    rendered with the chat template (the trained assistant messages and their end-of-turn
    tokens), a :class:`PromptCompletion` as prompt + completion + EOS (the completion and
    EOS), a text record + EOS (every token). ``all_tokens=True`` covers every token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if isinstance(eos, int) else []
    if isinstance(record, Conversation):
        if not has_chat_template(tokenizer):
            raise DataError(f"{record.where}: {NO_TEMPLATE}")
        full = _render(tokenizer, record.messages, record.where)
        if all_tokens:
            ids = _tokens(tokenizer, full)
            return ids, [True] * len(ids)
        return _tokens_with_mask(tokenizer, full, _assistant_spans(tokenizer, record, full))
    if isinstance(record, PromptCompletion):
        prompt, completion = _tokens(tokenizer, record.prompt), _tokens(tokenizer, record.completion) + tail
        return prompt + completion, [all_tokens] * len(prompt) + [True] * len(completion)
    if isinstance(record, str):
        ids = _tokens(tokenizer, record) + tail
        return ids, [True] * len(ids)
    raise DataError(f"a record must be text, a Conversation or a PromptCompletion, got {type(record).__name__}")


def chat_blocks(
    tokenizer,
    records: Sequence,
    block_size: int,
    *,
    packing: str = "pack",
    all_tokens: bool = False,
    max_blocks: int | None = None,
    pad_token_id: int | None = None,
) -> LabeledBlocks:
    """Chat (and text) records as :class:`LabeledBlocks` of ``block_size`` tokens.

    ``packing="pack"``: whole examples, in order, go into a block while they fit; the rest of
    a block is padding (no example is split across blocks; examples in one block see the
    earlier ones, as in TRL's packing without position resets). ``"pad"``: one example per
    block, padded. An example longer than ``block_size`` keeps its first ``block_size``
    tokens, with one :class:`~qalora.QALoRAWarning` that counts them; an example left with
    no trained token is left out. Padding (``pad_token_id``, default the tokenizer's pad,
    else EOS, else 0) is never trained or scored; with right padding and causal attention
    it changes nothing before it, so no attention mask is needed.

    Raises:
        DataError: a bad ``block_size`` or ``packing``; a conversation but no chat template;
            a template that refuses a conversation; no example with a trained token.
    """
    if block_size < 2:
        raise DataError(f"block_size: got {block_size}, it must be at least 2")
    if packing not in PACKING:
        raise DataError(f"packing: got {packing!r}, allowed: {', '.join(PACKING)}")
    if pad_token_id is None:
        for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None), 0):
            if isinstance(candidate, int):
                pad_token_id = candidate
                break
    rows: list[tuple[list[int], list[int], int, int]] = []  # ids, labels, examples, cut examples
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_examples = cur_cut = dropped = dropped_cut = 0
    for record in records:
        if max_blocks is not None and len(rows) >= max_blocks:
            break
        ids, mask = encode_record(tokenizer, record, all_tokens=all_tokens)
        cut = len(ids) > block_size
        if cut:
            ids, mask = ids[:block_size], mask[:block_size]
        if not any(mask[1:]):  # the first token of an example is never a target of its own
            dropped, dropped_cut = dropped + 1, dropped_cut + cut
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if packing == "pad" or len(cur_ids) + len(ids) > block_size:
            if cur_ids:
                rows.append((cur_ids, cur_labels, cur_examples, cur_cut))
            cur_ids, cur_labels, cur_examples, cur_cut = [], [], 0, 0
        cur_ids, cur_labels = cur_ids + ids, cur_labels + labels
        cur_examples, cur_cut = cur_examples + 1, cur_cut + cut
    if cur_ids and (max_blocks is None or len(rows) < max_blocks):
        rows.append((cur_ids, cur_labels, cur_examples, cur_cut))
    if not rows:
        raise DataError(
            f"no example holds a trained token within a block of {block_size} tokens "
            f"({dropped} left out after the cut); give a larger block size"
        )
    n = len(rows)
    input_ids = torch.full((n, block_size), pad_token_id, dtype=torch.long)
    labels_t = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels, _, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels_t[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    examples, truncated = sum(r[2] for r in rows), sum(r[3] for r in rows) + dropped_cut
    out = LabeledBlocks(input_ids, labels_t, examples, truncated, dropped, packing, all_tokens)
    parts = []
    if truncated:
        parts.append(
            f"{truncated} of {examples + dropped} examples are longer than the block of {block_size} tokens and were "
            f"cut to it (a larger block size, --block-size, keeps them whole)"
        )
    if dropped:
        parts.append(f"{dropped} examples kept no trained token and were left out")
    if parts:
        out.notes.append("; ".join(parts))
        warnings.warn(QALoRAWarning(out.notes[-1]), stacklevel=2)
    return out
