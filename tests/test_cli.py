"""The command line on a tiny Hugging Face model (a character tokenizer and a 2-layer
Llama, built here): outputs, permissions, the checks made before any work, failures that
leave --out as it was, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import qalora
import qalora.cli.finetune
import torch
from qalora.cli import build_parser, main
from tiny_models import tiny_model_dir

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A Hugging Face model directory: a tiny Llama and a character tokenizer."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def args(tiny_dir, out, *extra):
    return [
        "finetune",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--eval-blocks",
        "2",
        "--rank",
        "2",
        *extra,
    ]


def test_finetune_outputs_permissions_and_eval_of_saved_model(tiny_dir, tmp_path, capsys, umask022, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "run"
    assert main(args(tiny_dir, out)) == 0
    report = json.loads((out / "report.json").read_text())
    for path in [out / "report.json", out / "report.md", out / "loss_curve.png", *(out / "model").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # the umask, not mkstemp's 0600
    assert stat.S_IMODE((out / "model").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary directory left
    assert "What stays dense" in (out / "report.md").read_text()
    capsys.readouterr()
    # finetune starts from a dense model: a saved (quantized) one is refused before any work.
    assert main(["finetune", "--model", str(out / "model"), "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    # The saved model directory stands on its own: eval rebuilds it from the directory.
    assert main(["eval", "--model", str(out / "model"), "--block-size", "32", "--eval-blocks", "2"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout_perplexity"]
    assert ppl == pytest.approx(report["heldout_perplexity"]["qalora_merged"], rel=1e-6)


def test_a_late_failure_leaves_out_as_it_was(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    out = tmp_path / "run"
    assert main(args(tiny_dir, out)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    def fail(*a, **k):
        raise RuntimeError("simulated failure while writing the plot\n" + "libtorch frame\n" * 500)

    monkeypatch.setattr(qalora.cli.finetune, "plot_losses", fail)  # fails after model/ and adapter/ are written
    assert main(args(tiny_dir, out, "--seed", "1")) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: simulated failure" in err and "libtorch frame" not in err
    assert len([line for line in err.splitlines() if line.startswith("qalora")]) == 2
    log = err.split("traceback is in ")[1].split(";")[0]
    assert "libtorch frame" in pathlib.Path(log).read_text()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "run"]


def test_non_finite_training_loss_stops_the_run(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    assert main(args(tiny_dir, tmp_path / "run", "--lr", "1e30", "--steps", "8")) == 2
    err = capsys.readouterr().err
    assert "training loss became" in err and "Lower the learning rate" in err
    assert not (tmp_path / "run").exists()


def test_settings_that_cannot_work_are_refused_before_evaluation(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    calls = []
    monkeypatch.setattr(qalora.cli.finetune, "perplexity", lambda *a, **k: calls.append(1) or 1.0)
    assert main(args(tiny_dir, tmp_path / "run", "--group-size", "48")) == 2
    err = capsys.readouterr().err
    assert "got 48, it must divide" in err and "--exclude" in err and "--on-indivisible skip" in err
    assert calls == []  # nothing was evaluated
    # mlp.down_proj has in_features 128: divisible by 64, the rest (64) too.
    assert main(args(tiny_dir, tmp_path / "run", "--group-size", "128")) == 2
    assert "--on-indivisible skip" in capsys.readouterr().err


def test_eval_refuses_a_checkpoint_without_its_qalora_config(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "run"
    assert main(args(tiny_dir, out)) == 0
    (out / "model" / "qalora_config.json").unlink()
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--block-size", "32", "--eval-blocks", "2"]) == 2
    assert "no qalora_config.json" in capsys.readouterr().err
    # A Hugging Face directory whose weights do not fit its config is refused too.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", "--model", str(broken), "--block-size", "32", "--eval-blocks", "2"]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_missing_matplotlib_degrades_with_a_notice_first(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "run"
    assert main(args(tiny_dir, out)) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert not (out / "loss_curve.png").exists() and (out / "report.json").exists()
    assert "loss_curve" not in captured.out.split("outputs in")[1]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["finetune", "--out", "{file}"], "is a file, not a directory"),
        (["finetune", "--out", "{file}/sub/out"], "is a file, not a directory"),
        (["finetune", "--out", "/proc/qalora-out"], "cannot write in /proc"),
        (["finetune", "--out", "{full}"], "holds other files"),
        (["finetune", "--out", "x", "--model", "{gguf}"], "is not a GGUF file"),
        (["finetune", "--out", "x", "--model", "{tmp}"], "holds neither qalora_config.json"),
        (["finetune", "--out", "x", "--bits", "7"], "supported: "),
        (["compare", "--settings", "abc"], "'abc' is not BITS:GROUP_SIZE"),
        (["compare", "--settings", "4:0"], "is not BITS:GROUP_SIZE"),
        (["finetune", "--out", "x", "--lr", "inf"], "finite positive number"),
        (["finetune", "--out", "x", "--lr", "nan"], "finite positive number"),
        (["finetune", "--out", "x", "--dropout", "1"], "[0, 1)"),
        (["eval", "--model", "{tmp}/nowhere"], "no such file or directory"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, argv, fragment):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    subs = {"{file}": str(tmp_path / "file"), "{full}": str(tmp_path / "full"), "{gguf}": str(tmp_path / "bad.gguf")}
    subs["{tmp}"] = str(tmp_path)
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert len([line for line in err.splitlines() if line.startswith("qalora")]) == 1
    assert "Traceback" not in err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_every_option_has_help_that_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text, f"{name} {action.option_strings[0]} has no help"
            assert "default" in formatter._get_help_string(action) or action.required, (name, action.option_strings)


def test_help_needs_neither_torch_nor_transformers():
    code = "import sys, qalora.cli; qalora.cli.build_parser().format_help(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_default_output_directories_are_git_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("qalora-demo/report.json", "qalora-compare/compare.json", ".qalora-demo.qalora-tmp-1-x/a"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert r.returncode == 0, f"{path} is not covered by .gitignore"


def test_saved_tiny_llama_stands_on_its_own_in_a_fresh_process(tiny_dir, tmp_path):
    """save_pretrained -> from_pretrained(dir) and `qalora eval --model dir` in new processes."""
    lm = qalora.load_model(str(tiny_dir))
    qalora.wrap(lm.model, qalora.QALoRAConfig(rank=2))
    qalora.merge(lm.model)
    qalora.save_pretrained(lm.model, tmp_path / "saved")  # the tokenizer comes along from load_model
    ids = torch.arange(1, 17).view(1, 16)
    with torch.no_grad():
        want = lm.model.eval()(input_ids=ids).logits
    from safetensors.torch import save_file

    save_file({"logits": want.contiguous()}, tmp_path / "want.safetensors")
    code = (
        "import sys, torch, qalora, transformers\n"
        "from safetensors.torch import load_file\n"
        f"m = qalora.from_pretrained({str(tmp_path / 'saved')!r})\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({str(tmp_path / 'saved')!r})\n"
        "ids = torch.arange(1, 17).view(1, 16)\n"
        "with torch.no_grad():\n"
        f"    assert torch.equal(m(input_ids=ids).logits, load_file({str(tmp_path / 'want.safetensors')!r})['logits'])\n"
        "print(tok.decode(m.generate(ids[:, :4], max_new_tokens=3, do_sample=False)[0]))\n"
    )
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, "-m", "qalora", "eval", "--model", str(tmp_path / "saved"), "--block-size", "32"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["heldout_perplexity"] > 1


def test_finetune_quantize_embeddings(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "run"
    assert main(args(tiny_dir, out, "--quantize-embeddings", "--group-size", "16")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quantize_embeddings"] is True
    dense = [p["name"] for p in report["dense_parts"]]
    assert "model.embed_tokens" not in dense and "lm_head" in dense  # this Llama's head is not tied
    saved = json.loads((out / "model" / "qalora_config.json").read_text())
    assert saved["layers"]["model.embed_tokens"]["type"] == "QuantEmbedding"
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--block-size", "32", "--eval-blocks", "2"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout_perplexity"]
    assert ppl == pytest.approx(report["heldout_perplexity"]["qalora_merged"], rel=1e-6)


def test_quantize_embeddings_help():
    parser = qalora.cli.build_parser()
    for command in ("finetune", "demo"):
        sub = parser._subparsers._group_actions[0].choices[command]
        action = next(a for a in sub._actions if "--quantize-embeddings" in a.option_strings)
        assert action.default is False and "token embedding" in action.help


def test_compare_trains_every_method_and_flags_what_deploys_exactly(tiny_dir, tmp_path, monkeypatch):
    """``qalora compare`` end to end on the tiny model: the exact methods and the dense-LoRA
    baseline (re-quantized with RTN and with GPTQ) from one quantized base, every row flagged
    deployed/exact, bits per weight beside each deployed model, a merged exact model equal to
    its unmerged self up to the storage rounding."""
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_dir), "--out", str(out), "--settings", "4:16", "--quantizers", "gptq"]
    argv += ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--rank", "2"]
    argv += ["--calibration-blocks", "2", "--methods", "qalora,qalora+scales+offsets+norms"]
    argv += ["--offset-lr-scale", "10", "--scale-lr-scale", "2"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert result["offset_lr_scale"] == 10 and result["methods"] == ["qalora", "qalora+scales+offsets+norms"]
    for method in result["methods"]:
        before, merged = rows[f"{method}, before merge"], rows[f"{method}, merged"]
        assert (before["deployed"], before["exact"]) == (False, False)
        assert (merged["deployed"], merged["exact"]) == (True, True)
        assert merged["heldout_ppl"] == pytest.approx(before["heldout_ppl"], rel=0.01)
        assert 4 < merged["bits_per_weight"] < 4 + 2 * 32 / 16 + 1e-6  # codes + float16 scale/offset per 16
        assert set(merged["merge_rounding"]) == {"scale", "scale_layer", "offset", "offset_layer", "grid_layers"}
        assert len(result["losses"][f"4-bit g16 GPTQ {method}"]) == result["steps"]  # 2 under QALORA_SMOKE
    for rq in ("RTN", "GPTQ"):
        row = rows[f"dense LoRA, merged + re-quantized with {rq}"]
        assert (row["deployed"], row["exact"]) == (True, False) and row["bits_per_weight"] > 4
    assert rows["quantized base"]["exact"] and not rows["fp32 LoRA (reference)"]["deployed"]
    assert (out / "compare.md").read_text().count("| 4-bit g16 | GPTQ |") == 8

    # A method that does not exist is refused by the parser, before anything loads.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--methods", "qalora+bogus"])


def test_compare_without_the_reference_trains_no_dense_fp32_lora(tiny_dir, tmp_path, monkeypatch):
    """--no-reference leaves out the fp32 LoRA row (it deploys nothing) and its training run;
    the deployed rows are all there."""
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_dir), "--out", str(out), "--settings", "4:16", "--quantizers", "rtn"]
    argv += ["--steps", "1", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--rank", "2"]
    argv += ["--methods", "qalora", "--no-reference"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert "fp32 LoRA (reference)" not in methods and "fp32 model" in methods
    assert "qalora, merged" in methods and "dense LoRA, merged + re-quantized with RTN" in methods
    assert "fp32 LoRA" not in result["losses"]


def test_bits_on_a_gguf_model_must_say_what_its_layers_are(tmp_path, capsys):
    """--bits / --group-size on a GGUF model (the default model is one): a request that differs
    from the file's own layers is refused from the file's header, before anything loads, with
    the way out; matching values, or none, train the file's layers as they are; --requantize
    asks for a new quantization; a dense model takes --bits as before."""
    from qalora.cli import resolve_layout

    out = str(tmp_path / "run")
    assert main(["finetune", "--out", out, "--bits", "3", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already quantizes its layers (210 matrices at 4-bit g32)" in err and "--requantize" in err
    assert not os.path.exists(out)
    assert main(["finetune", "--out", out, "--group-size", "7"]) == 2
    assert "--requantize" in capsys.readouterr().err
    parser = build_parser()
    for argv, want in [
        ([], (4, 32)),  # the file's own layout
        (["--bits", "4", "--group-size", "32"], (4, 32)),  # README's example: says what the file is
        (["--bits", "3", "--requantize"], (3, 32)),
        (["--bits", "3", "--quantizer", "gptq"], (3, 32)),  # GPTQ quantizes the dequantized weights
    ]:
        args = parser.parse_args(["finetune", "--out", out, *argv])
        resolve_layout(args)
        assert (args.bits, args.group_size) == want, argv


def test_requantize_is_refused_on_a_dense_model(tiny_dir, tmp_path, capsys):
    assert main(args(tiny_dir, tmp_path / "r", "--requantize")) == 2
    assert "applies to a GGUF model" in capsys.readouterr().err


def test_data_errors_name_the_split_and_missing_files_fail_before_loading(tiny_dir, tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * 2}) + "\n" for i in range(16)))
    assert main(args(tiny_dir, tmp_path / "a", "--data", str(data), "--block-size", "128")) == 2
    err = capsys.readouterr().err
    assert "the held-out split of small.jsonl" in err and "--heldout" in err and "--block-size" in err
    assert main(args(tiny_dir, tmp_path / "b", "--data", str(tmp_path / "missing.txt"))) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "no such file" in err


def test_eval_scores_the_whole_file_it_is_given(tiny_dir, tmp_path, capsys):
    from qalora import datasets, train
    from qalora.loaders import load_model

    text = tmp_path / "heldout.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40)))
    assert (
        main(["eval", "--model", str(tiny_dir), "--data", str(text), "--block-size", "32", "--eval-blocks", "99"]) == 0
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout_perplexity"]
    lm = load_model(str(tiny_dir))
    blocks = datasets.token_blocks(lm.tokenizer, datasets.read_texts(str(text)), 32, max_blocks=99)
    assert len(blocks) > 50  # every block of the file, not its last 10%
    assert got == pytest.approx(train.perplexity(lm.model, blocks, show_progress=False), rel=1e-6)


def test_the_run_hint_prompts_in_the_style_of_the_data():
    from qalora.cli.finetune import prompt_hint

    assert prompt_hint(["\n  To be, or not to be, that is the question: whether tis nobler"]) == (
        "To be, or not to be, that is the"
    )
    assert prompt_hint(["", "def f(x):\n    return x"]) == "def f(x):"
