"""Data loading and the command line's argument and file errors (no model needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import qalora
import torch
from qalora import datasets
from qalora.cli import build_parser, main


def test_bundled_dataset_has_train_and_heldout():
    ds = datasets.bundled_dataset()
    assert len(ds.train) == len(ds.heldout) == 5
    assert sum(map(len, ds.train)) > 8 * sum(map(len, ds.heldout)) > 0
    assert "Macbeth" not in ds.heldout[0][:0]  # texts are plain strings
    assert all(isinstance(t, str) and t.strip() for t in ds.train + ds.heldout)


def test_jsonl_records_and_split(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}", "response": f"{i}!"} for i in range(9)] + [{"text": "plain record"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = datasets.load_dataset(str(path))
    assert len(ds.train) == 9 and ds.heldout == ["plain record"]
    assert ds.train[0] == "### Instruction:\nSay 0\n\n### Response:\n0!"


def test_text_file_and_explicit_heldout(tmp_path):
    (tmp_path / "a.txt").write_text("one paragraph\n\nanother paragraph\n")
    (tmp_path / "b.txt").write_text("held out")
    ds = datasets.load_dataset(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    assert ds.train == ["one paragraph", "another paragraph\n"] and ds.heldout == ["held out"]
    single = datasets.load_dataset(str(tmp_path / "b.txt"))
    assert single.train[0] + single.heldout[0] == "held out"


@pytest.mark.parametrize(
    "name,content,fragment",
    [
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        ("keys.jsonl", '{"prompt": "x"}\n', "needs a string 'text'"),
        ("list.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("empty.txt", "\n\n", "holds no text"),
        ("data.csv", "a,b\n", "unsupported extension"),
    ],
)
def test_bad_data_files(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    with pytest.raises(qalora.DataError, match=fragment.replace("(", r"\(")):
        datasets.load_dataset(str(tmp_path / name))


def test_missing_data_file():
    with pytest.raises(qalora.DataError, match="does not exist"):
        datasets.load_dataset("no/such/file.jsonl")


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 50) for c in text]}


def test_token_blocks():
    blocks = datasets.token_blocks(CharTokenizer(), ["abcdef", "ghij"], 4)
    assert blocks.shape == (3, 4) and blocks.dtype == torch.long  # 6 + EOS + 4 + EOS tokens
    assert blocks[1, 2].item() == 0  # EOS between the two texts
    assert datasets.token_blocks(CharTokenizer(), ["a" * 100], 8, max_blocks=3).shape == (3, 8)
    with pytest.raises(qalora.DataError, match="fewer than one block"):
        datasets.token_blocks(CharTokenizer(), ["ab"], 8)


def test_cli_rejects_bad_arguments(capsys):
    parser = build_parser()
    for argv in (
        ["finetune"],
        ["finetune", "--out", "x", "--scale-dtype", "float64"],
        ["demo", "--steps", "0"],
        ["demo", "--lr", "-1"],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'float64'" in err and "expected a positive integer, got 0" in err


def test_cli_reports_bad_files_as_errors(tmp_path, capsys):
    assert main(["finetune", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err  # named before torch or the model loads
    assert "qalora: error: --data " in err and "missing.jsonl: no such file or directory" in err
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--data", "shakespeare"]) == 2
    assert "expected 'smollm2', a .gguf file or a model directory" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "qalora", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "finetune" in r.stdout and "compare" in r.stdout
