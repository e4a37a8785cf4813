"""Chat data: 'messages' and 'prompt'/'completion' records, rendered with the tokenizer's chat
template, packed or padded into blocks whose labels train the assistant's tokens only; the
training loss and held-out perplexity on that basis; the template kept in saved models and
GGUF files."""

from __future__ import annotations

import json
import warnings

import pytest
import qalora
import torch
from qalora import datasets, train
from qalora.cli import main
from qalora.cli.finetune import prompt_hint, token_splits

pytest.importorskip("transformers")
from tiny_models import char_tokenizer, tiny_llama

#: A ChatML-like template over the character tokenizer: each turn is <role>content<eos>.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer(template: str | None = TEMPLATE):
    tok = char_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def conv(*turns, train_from=0):
    roles = ("user", "assistant")
    return datasets.Conversation(
        tuple({"role": roles[i % 2], "content": t} for i, t in enumerate(turns)), "test:1", train_from
    )


def trained_text(tok, ids, mask) -> str:
    return "".join(tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- reading records


def test_reads_messages_prompt_completion_and_text_records(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "bot"}]},
        {"prompt": "2+2=", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}],
        },
        {"text": "plain"},
        {"instruction": "Say", "response": "ok"},
    ] * 2
    records = datasets.read_texts(write_jsonl(tmp_path / "c.jsonl", rows))
    c, pc, c2, text, inst = records[:5]
    assert isinstance(c, datasets.Conversation) and c.train_from == 0 and c.where.endswith("c.jsonl:1")
    assert c.messages[1] == {"role": "assistant", "content": "yo", "name": "bot"}  # other keys kept for the template
    assert pc == datasets.PromptCompletion("2+2=", "4", pc.where) and pc.where.endswith(":2")
    assert isinstance(c2, datasets.Conversation) and c2.train_from == 2 and len(c2.messages) == 3
    assert text == "plain" and inst.startswith("### Instruction:")
    ds = datasets.load_dataset(str(tmp_path / "c.jsonl"))
    assert ds.is_chat and len(ds.train) == 9 and len(ds.heldout) == 1
    assert not datasets.load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])).is_chat


@pytest.mark.parametrize(
    "row,fragment",
    [
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ({"messages": [{"content": "x"}]}, r"messages\[0\] needs a non-empty string 'role'"),
        (
            {"messages": [{"role": "user", "content": None}]},
            r"messages\[0\] \(user\) needs a string 'content', got none",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no 'assistant' message"),
        ({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}, "both be strings or both be lists"),
        ({"prompt": "x", "completion": ""}, "'completion' is empty"),
        (
            {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
            "'completion' has no 'assistant' message",
        ),
        ({"prompt": "x"}, "needs a string 'text'.*'messages'.*'prompt' and 'completion'"),
    ],
)
def test_bad_chat_records_name_file_line_and_what_is_allowed(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(qalora.DataError, match=f"bad.jsonl:2: .*{fragment}"):
        datasets.read_texts(path)


def test_one_chat_record_cannot_be_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(qalora.DataError, match=r"one chat record cannot be split"):
        datasets.load_dataset(path)


# --------------------------------------------------------------------------- what the loss covers


def test_conversation_trains_the_assistant_replies_and_their_end_of_turn():
    tok = chat_tokenizer()
    c = conv("hi", "yo", "more?", "ok")
    ids, mask = datasets.encode_record(tok, c)
    assert tok.decode(ids) == "<user>hi<eos><assistant>yo<eos><user>more?<eos><assistant>ok<eos>"
    assert trained_text(tok, ids, mask) == "yo<eos>ok<eos>"
    ids_all, mask_all = datasets.encode_record(tok, c, all_tokens=True)
    assert ids_all == ids and all(mask_all)
    # Conversational prompt/completion: the prompt's assistant turn is context, not trained.
    ids, mask = datasets.encode_record(tok, conv("hi", "yo", "more?", "ok", train_from=2))
    assert trained_text(tok, ids, mask) == "ok<eos>"


def test_prompt_completion_and_text_records():
    tok = chat_tokenizer(None)  # plain text: no template needed
    ids, mask = datasets.encode_record(tok, datasets.PromptCompletion("2+2=", "4"))
    assert tok.decode(ids) == "2+2=4<eos>" and trained_text(tok, ids, mask) == "4<eos>"
    ids, mask = datasets.encode_record(tok, datasets.PromptCompletion("2+2=", "4"), all_tokens=True)
    assert all(mask)
    ids, mask = datasets.encode_record(tok, "abc")
    assert tok.decode(ids) == "abc<eos>" and all(mask)


def test_tokenizer_without_offsets_gives_the_same_tokens_and_mask():
    class NoOffsets:
        """A tokenizer that cannot give character offsets (like transformers' slow ones)."""

        def __init__(self, tok):
            self.tok, self.chat_template, self.eos_token_id = tok, tok.chat_template, tok.eos_token_id

        def apply_chat_template(self, *a, **kw):
            return self.tok.apply_chat_template(*a, **kw)

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError("no offsets")
            return self.tok(text, add_special_tokens=add_special_tokens)

    tok = chat_tokenizer()
    c = conv("hi", "yo", "more?", "ok")
    assert datasets.encode_record(NoOffsets(tok), c) == datasets.encode_record(tok, c)


def test_no_template_refused_with_what_to_do(tmp_path):
    with pytest.raises(qalora.DataError, match=r"test:1: .*has none.*'text' records.*tokenizer.chat_template"):
        datasets.encode_record(chat_tokenizer(None), conv("hi", "yo"))


def test_template_errors_and_templates_that_rewrite_earlier_turns():
    strict = "{% if messages|length < 3 %}{{ raise_exception('needs three messages') }}{% endif %}" + TEMPLATE
    with pytest.raises(qalora.DataError, match=r"test:1: the tokenizer's chat template refused.*needs three messages"):
        datasets.encode_record(chat_tokenizer(strict), conv("hi", "yo"))
    # A template that says how many turns there are up front changes the text before each turn.
    counting = "[{{ messages|length }}]" + TEMPLATE
    with pytest.raises(qalora.DataError, match=r"turn by turn.*--train-on-all-tokens"):
        datasets.encode_record(chat_tokenizer(counting), conv("hi", "yo"))
    ids, mask = datasets.encode_record(chat_tokenizer(counting), conv("hi", "yo"), all_tokens=True)
    assert all(mask) and chat_tokenizer().decode(ids).startswith("[2]<user>")


# --------------------------------------------------------------------------- blocks


def test_pack_keeps_examples_whole_and_pad_puts_one_per_block():
    tok = chat_tokenizer()
    records = [conv(f"q{i}", f"a{i}" * (1 + i % 3)) for i in range(10)]
    lengths = [len(datasets.encode_record(tok, r)[0]) for r in records]
    packed = datasets.chat_blocks(tok, records, 48)
    assert packed.examples == 10 and packed.truncated == packed.dropped == 0
    assert len(packed) < 10  # several examples share a block
    # Every example starts in a block and ends in the same one: rows hold whole examples.
    rows = [row[row != tok.eos_token_id] for row in packed.input_ids]  # padding is EOS here
    assert sum(len(r) for r in rows) == sum(n - 2 for n in lengths)  # two <eos> per example
    assert sum(tok.decode(r.tolist()).count("<user>") for r in rows) == 10
    for row in packed.input_ids:
        text = tok.decode(row.tolist())
        assert text.startswith("<user>") and text.rstrip("<eos>").endswith(tuple(f"a{i}" for i in range(10)))
    padded = datasets.chat_blocks(tok, records, 48, packing="pad")
    assert len(padded) == 10
    for labels, n in zip(padded.labels, lengths):
        assert (labels[n:] == datasets.IGNORE_INDEX).all() and (labels[:n] != datasets.IGNORE_INDEX).sum() > 0
    # Labels are the ids where trained and -100 elsewhere (prompts, padding).
    trained = packed.labels != datasets.IGNORE_INDEX
    assert torch.equal(packed.labels[trained], packed.input_ids[trained])
    assert datasets.chat_blocks(tok, records, 48, packing="pad", max_blocks=3).input_ids.shape == (3, 48)


def test_long_examples_are_cut_with_one_warning_that_counts_them():
    tok = chat_tokenizer()
    records = [conv("q", "short"), conv("q" * 20, "long answer"), conv("q" * 60, "lost")]
    with pytest.warns(
        qalora.QALoRAWarning, match=r"2 of 3 examples are longer than the block of 40 tokens.*1 examples"
    ):
        blocks = datasets.chat_blocks(tok, records, 40)
    assert blocks.examples == 2 and blocks.truncated == 2 and blocks.dropped == 1 and len(blocks.notes) == 1
    with pytest.raises(qalora.DataError, match=r"no example holds a trained token within a block of 8"):
        datasets.chat_blocks(tok, records, 8)
    with pytest.raises(qalora.DataError, match=r"packing: got 'zip'"):
        datasets.chat_blocks(tok, records, 40, packing="zip")


def test_text_commands_refuse_chat_records(tmp_path):
    with pytest.raises(qalora.DataError, match=r"test:1: a chat record.*token_blocks takes text only"):
        datasets.token_blocks(chat_tokenizer(), ["text", conv("a", "b")], 8)
    splits = datasets.TextSplits("c.jsonl", [conv("a", "b")], [conv("c", "d")])
    with pytest.raises(qalora.DataError, match=r"c.jsonl holds chat records.*this command takes text data"):
        token_splits(chat_tokenizer(), splits, 16, 2, 2)
    assert prompt_hint([conv("What is 2+2?", "4")]) == "What is 2+2?"
    assert prompt_hint([datasets.PromptCompletion("Translate: cat", "chat")]) == "Translate: cat"


# --------------------------------------------------------------------------- loss and perplexity


def wrapped_tiny():
    model = tiny_llama(0, vocab=100, max_positions=128)
    qalora.wrap(model, qalora.QALoRAConfig(bits=4, group_size=32, rank=2, dropout=0.0))
    return model


def masked_mean_nll(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    return nll.item()


def test_loss_and_perplexity_count_only_labelled_tokens():
    tok = chat_tokenizer()
    blocks = datasets.chat_blocks(tok, [conv(f"question {i}", f"answer {i}") for i in range(6)], 64)
    model = wrapped_tiny()
    ids, labels = blocks.input_ids, blocks.labels
    expected = masked_mean_nll(model, ids, labels)
    ppl = train.perplexity(model, ids, labels=labels, batch_size=2)
    assert ppl == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert ppl != pytest.approx(train.perplexity(model, ids, batch_size=2), rel=1e-3)  # not every token
    # Labels equal to the ids score what the plain route scores.
    assert train.perplexity(model, ids, labels=ids.clone()) == pytest.approx(train.perplexity(model, ids), rel=1e-5)
    # The first training loss is the mean over the batch's trained tokens (adapters start at zero).
    result = train.finetune(model, ids, 2, batch_size=len(ids), lr=1e-3, labels=labels, show_progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(qalora.ConfigError, match=r"labels: got"):
        train.finetune(model, ids, 1, labels=labels[:, :5])
    with pytest.raises(qalora.InvalidValueError, match=r"no token to score"):
        train.perplexity(model, ids, labels=torch.full_like(ids, -100))


def test_training_on_assistant_tokens_learns_the_reply_format():
    """A few dozen steps on a tiny model: the masked loss falls on what the assistant says."""
    tok = chat_tokenizer()
    records = [conv(f"{i} + {i}", f"ANSWER: {2 * i}.") for i in range(40)]
    blocks = datasets.chat_blocks(tok, records, 64, packing="pad")
    model = wrapped_tiny()
    before = train.perplexity(model, blocks.input_ids, labels=blocks.labels)
    train.finetune(model, blocks.input_ids, 40, batch_size=8, lr=2e-2, labels=blocks.labels, show_progress=False)
    after = train.perplexity(model, blocks.input_ids, labels=blocks.labels)
    assert after < 0.6 * before


# --------------------------------------------------------------------------- command line, saved model


def chat_model_dir(directory, template=TEMPLATE):
    tiny_llama(0, vocab=100, max_positions=128).save_pretrained(directory)
    chat_tokenizer(template).save_pretrained(directory)
    return str(directory)


def chat_rows(n=30):
    return [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": f"= {2 * i}"}]}
        for i in range(n)
    ]


def finetune_args(model_dir, data, out, *extra):
    return [
        "finetune",
        *("--model", model_dir, "--data", data, "--out", str(out)),
        *("--steps", "3", "--batch-size", "2", "--block-size", "64", "--eval-blocks", "2", "--rank", "2"),
        *extra,
    ]


def test_finetune_on_chat_data_keeps_the_template_and_scores_assistant_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    model_dir = chat_model_dir(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    out = tmp_path / "run"
    assert main(finetune_args(model_dir, data, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chat"]["packing"] == "pack" and report["chat"]["loss_tokens"] == "assistant"
    assert report["chat"]["training_examples"] >= 6 and report["chat"]["truncated_examples"] == 0
    assert report["prompt_hint"] == "27+27"  # the held-out split's first user message
    printed = capsys.readouterr().out
    assert "assistant tokens" in printed and "loss and perplexity on the assistant's tokens only" in printed
    # The saved model keeps the chat template, and qalora eval scores chat data as finetune did.
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(out / "model").chat_template == TEMPLATE
    heldout = write_jsonl(tmp_path / "heldout.jsonl", chat_rows()[27:])
    assert main(["eval", "--model", str(out / "model"), "--data", heldout, "--block-size", "64"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout_perplexity"]
    assert ppl == pytest.approx(report["heldout_perplexity"]["qalora_merged"], rel=1e-5)
    # Padding and every-token training change what is trained and scored (on a GPTQ base here).
    out2 = tmp_path / "run2"
    extra = ("--packing", "pad", "--train-on-all-tokens", "--quantizer", "gptq", "--calibration-blocks", "4")
    assert main(finetune_args(model_dir, data, out2, *extra)) == 0  # GPTQ calibrates on the chat blocks
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["config"]["quantizer"] == "gptq"
    assert "examples, one per block, padded; loss and perplexity on every token" in (out2 / "report.md").read_text()
    assert (report2["chat"]["packing"], report2["chat"]["loss_tokens"]) == ("pad", "all")
    steps, batch = report2["steps"], report2["batch_size"]  # QALORA_SMOKE caps the steps
    assert report2["chat"]["training_examples"] == steps * batch  # one example per block, steps x batch blocks
    assert report2["heldout_perplexity"]["dense_fp32"] != pytest.approx(report["heldout_perplexity"]["dense_fp32"])


def test_finetune_refuses_chat_data_without_a_template(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    model_dir = chat_model_dir(tmp_path / "base", template=None)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    assert main(finetune_args(model_dir, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "the training split of chat.jsonl: " in err and "chat.jsonl:1: chat records" in err
    assert "has none" in err and not (tmp_path / "run" / "model").exists()
    # String prompt/completion records need no template.
    rows = [{"prompt": f"{i}+{i}", "completion": f"= {2 * i}"} for i in range(10)]
    assert main(finetune_args(model_dir, write_jsonl(tmp_path / "pc.jsonl", rows), tmp_path / "run")) == 0


# --------------------------------------------------------------------------- GGUF metadata


def test_gguf_export_writes_the_tokenizers_chat_template(tmp_path):
    pytest.importorskip("gguf")
    import gguf_synthetic as syn
    from qalora.formats.gguf_file import read_header
    from qalora.loaders import load_model

    src = tmp_path / "src.gguf"
    syn.write_synthetic_gguf(src, syn.SyntheticSpec(hidden=64, layers=1, heads=2, kv_heads=1, ffn=128, vocab=300))
    lm = load_model(str(src))
    assert not datasets.has_chat_template(lm.tokenizer)  # the synthetic file has none
    qalora.export_gguf(lm.model, tmp_path / "plain.gguf", tokenizer=lm.tokenizer)
    assert "tokenizer.chat_template" not in read_header(str(tmp_path / "plain.gguf")).metadata
    lm.tokenizer.chat_template = TEMPLATE
    qalora.export_gguf(lm.model, tmp_path / "chat.gguf", tokenizer=lm.tokenizer)
    header = read_header(str(tmp_path / "chat.gguf"))
    assert header.metadata["tokenizer.chat_template"].value == TEMPLATE
    assert header.metadata["tokenizer.ggml.eos_token_id"].value == read_header(str(src)).get(
        "tokenizer.ggml.eos_token_id"
    )
    # Read back, the template is the tokenizer's; exporting that again changes nothing.
    again = load_model(str(tmp_path / "chat.gguf"))
    assert again.tokenizer.chat_template == TEMPLATE
    qalora.export_gguf(again.model, tmp_path / "again.gguf", tokenizer=again.tokenizer)
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "chat.gguf").read_bytes()


def test_end_of_turn_id_from_the_generation_config():
    from qalora.formats.gguf_export import EOT_KEY, _end_of_turn

    model = tiny_llama(0, vocab=100)
    tok = chat_tokenizer()
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    (kv,) = _end_of_turn(model, tok, 100)
    assert (kv.key, kv.value) == (EOT_KEY, 7)
    model.generation_config.eos_token_id = tok.eos_token_id
    assert _end_of_turn(model, tok, 100) == []
    model.generation_config.eos_token_id = [tok.eos_token_id, 500]  # outside the vocabulary
    assert _end_of_turn(model, tok, 100) == []


def test_warnings_name_the_split(tmp_path):
    splits = datasets.TextSplits("c.jsonl", [conv("q" * 80, "a")] + [conv("q", "a")] * 3, [conv("q", "a")] * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_blocks, heldout = token_splits(
            chat_tokenizer(), splits, 32, 2, 8, chat={"packing": "pack", "all_tokens": False}
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, qalora.QALoRAWarning)]
    assert messages == [
        "the training split of c.jsonl: 1 of 4 examples are longer than the block of 32 tokens and were cut to it "
        "(a larger block size, --block-size, keeps them whole); 1 examples kept no trained token and were left out"
    ]
    assert train_blocks.examples == 3 and heldout.examples == 2


# --------------------------------------------------------------------------- the bundled SmolLM2


def bundled_tokenizer():
    import os

    import transformers
    from qalora.loaders import bundled_gguf_path

    try:
        path = bundled_gguf_path()
    except qalora.ModelLoadError as e:  # pragma: no cover - depends on the machine
        pytest.skip(str(e))
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_bundled_smollm2_template_trains_the_reply_and_its_end_of_turn():
    tok = bundled_tokenizer()
    assert datasets.has_chat_template(tok) and tok.eos_token == "<|im_end|>"
    c = datasets.Conversation(
        ({"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}), "t:1"
    )
    ids, mask = datasets.encode_record(tok, c)
    assert tok.decode(ids) == tok.apply_chat_template(list(c.messages), tokenize=False)
    assert "You are a helpful AI assistant" in tok.decode(ids)  # the template's default system turn: context
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Paris.<|im_end|>\n"


@pytest.mark.slow
def test_finetuned_smollm2_chats_in_the_trained_format_through_llama_cpp(tmp_path, monkeypatch):
    """``qalora finetune --data chat.jsonl --gguf`` on the bundled SmolLM2, then a chat with the
    exported file through llama-cpp-python, which formats it with the GGUF's own template: the
    reply has the format the assistant turns were trained on."""
    bundled_tokenizer()  # skips without the bundled model
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI installs it)")
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    monkeypatch.delenv("QALORA_SMOKE", raising=False)  # the behaviour needs its 14 steps, in CI too
    things = ["apple", "sky", "grass", "sun", "snow", "night", "river", "leaf", "coal", "milk", "rose", "sea"]
    rows = [
        {"messages": [{"role": "user", "content": f"{q} the {t}?"}, {"role": "assistant", "content": "BEEP BOOP."}]}
        for q in ("What color is", "Tell me about", "Describe", "Where is")
        for t in things
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    args = ["finetune", "--data", data, "--out", str(out), "--gguf", "--steps", "14", "--batch-size", "4"]
    args += ["--block-size", "48", "--packing", "pad", "--eval-blocks", "1", "--lr", "3e-3"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heldout_perplexity"]["qalora_merged"] < 0.5 * report["heldout_perplexity"]["dense_fp32"]
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, n_threads=2, seed=0, verbose=False)
    reply = llm.create_chat_completion(
        [{"role": "user", "content": "What color is a banana?"}], max_tokens=16, temperature=0.0
    )["choices"][0]
    assert reply["message"]["content"].strip() == "BEEP BOOP."
    assert reply["finish_reason"] == "stop"  # it learned to end its turn
