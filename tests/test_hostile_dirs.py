"""Model directories from the internet are hostile until checked (issue 22): GPTQ checkpoints
and directories written by ``save_pretrained`` holding paths out of the directory, FIFOs,
malformed or deeply nested JSON, non-finite or misshapen tensors, configs that ask for more
layers than the files hold or more memory than the machine has; writers meeting devices,
symlinks, bad names and full disks; the command line reporting all of it as a typed error.

One regression test per finding, then a seeded generator of mutated directories (config
fields, index maps, safetensors headers cut or flipped) loaded one by one in a worker process
under a time limit and an address-space limit: each load must succeed (and run) or raise a
subclass of ``qalora.QALoRAError``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import qalora
import torch
from ckpt_tools import deadline, resign
from qalora import QALoRAConfig, config_check
from qalora.io import atomic_path, atomic_save_safetensors, atomic_write_text
from safetensors.torch import load_file, save_file
from tiny_models import char_tokenizer, tiny_llama, tiny_model_dir

transformers = pytest.importorskip("transformers")
from qalora.formats import gptq as fmt_gptq  # noqa: E402

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
Q_LAYER = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------ valid tiny directories


def write_gptq_dir(directory, *, bits=4, g=32, seed=0, tokenizer=True) -> Path:
    """A sharded GPTQ checkpoint of the 2-layer tiny Llama (tied head): random codes and
    zero points, positive float16 scales, every other tensor float16; two shards and an index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed, tie=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = module.weight.shape
        words = lambda shape: torch.from_numpy(rng.integers(-(2**31), 2**31, size=shape).astype(np.int32))
        tensors[f"{name}.qweight"] = words((k * bits // 32, n))
        tensors[f"{name}.qzeros"] = words((k // g, n * bits // 32))
        tensors[f"{name}.scales"] = torch.from_numpy(rng.uniform(1e-3, 2e-2, size=(k // g, n)).astype(np.float16))
        tensors[f"{name}.g_idx"] = torch.arange(k, dtype=torch.int32) // g
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" or key.rpartition(".")[0] + ".qweight" in tensors:
            continue
        tensors[key] = t.half()
    names = sorted(tensors)
    weight_map = {}
    for i, shard in enumerate(SHARDS):
        part = {k: tensors[k].contiguous() for k in names[i :: len(SHARDS)]}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads(model.config.to_json_string())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": False}
    (directory / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        char_tokenizer().save_pretrained(directory)
    return directory


def write_saved_dir(directory, seed=0) -> Path:
    model = qalora.wrap(tiny_llama(seed), QALoRAConfig(rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    qalora.save_pretrained(model, directory)
    return Path(directory)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    write_gptq_dir(root / "gptq")
    write_saved_dir(root / "saved")
    return root


@pytest.fixture
def gptq(pristine, tmp_path):
    return Path(shutil.copytree(pristine / "gptq", tmp_path / "gptq"))


@pytest.fixture
def saved(pristine, tmp_path):
    return Path(shutil.copytree(pristine / "saved", tmp_path / "saved"))


def edit_json(path, edit):
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def shard_of(directory, key):
    return json.loads((Path(directory) / INDEX).read_text())["weight_map"][key]


def edit_tensors(directory, shard, edit):
    tensors = load_file(Path(directory) / shard)
    edit(tensors)
    save_file(tensors, Path(directory) / shard, metadata={"format": "pt"})


def refused(load, *fragments, cls=qalora.CheckpointError, seconds=20):
    with deadline(seconds), pytest.raises(cls) as info:
        load()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def gptq_refused(directory, *fragments, **kw):
    return refused(lambda: fmt_gptq.load_gptq_model(directory), *fragments, **kw)


def saved_refused(directory, *fragments, **kw):
    return refused(lambda: qalora.from_pretrained(directory), *fragments, **kw)


def logits_of(model):
    with torch.no_grad():
        return model(torch.arange(8).view(1, 8)).logits


def test_pristine_directories_load(gptq, saved):
    model = fmt_gptq.load_gptq_model(gptq)
    assert isinstance(model.get_submodule(Q_LAYER), qalora.QuantLinear)
    assert logits_of(model).shape == (1, 8, 96)
    lm = qalora.load_model(str(gptq))
    assert lm.tokenizer("ab")["input_ids"]
    assert logits_of(qalora.from_pretrained(saved)).shape == (1, 8, 96)


# ------------------------------------------------------------------ GPTQ import


def test_gptq_index_paths_out_of_the_directory_are_refused(gptq, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(gptq / SHARDS[1], outside)  # a file the old reader would have read
    for hostile in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        edit_json(
            gptq / INDEX,
            lambda d, h=hostile: d["weight_map"].update({k: h for k, v in d["weight_map"].items() if v == SHARDS[1]}),
        )
        gptq_refused(gptq, INDEX, "not a plain file name")
        edit_json(
            gptq / INDEX,
            lambda d, h=hostile: d["weight_map"].update({k: SHARDS[1] for k, v in d["weight_map"].items() if v == h}),
        )
    (gptq / SHARDS[1]).unlink()
    os.symlink(outside, gptq / SHARDS[1])
    gptq_refused(gptq, SHARDS[1], "symlink out of the checkpoint directory")


def test_gptq_fifo_in_the_index_does_not_block(gptq):
    (gptq / SHARDS[1]).unlink()
    os.mkfifo(gptq / SHARDS[1])
    gptq_refused(gptq, SHARDS[1], "not a regular file", seconds=20)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": []}', "weight_map"),
        ('{"weight_map": {}}', "weight_map"),
        ('{"weight_map": {"model.norm.weight": 3}}', "weight_map.model.norm.weight"),
        ('{"weight_map": {"model.norm.weight": "x.bin"}}', ".safetensors"),
        ('{"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}', "does not exist"),
    ],
)
def test_gptq_malformed_index_is_a_checkpoint_error(gptq, text, fragment):
    (gptq / INDEX).write_text(text)
    gptq_refused(gptq, INDEX if "does not exist" not in fragment else "", fragment)


def test_gptq_index_naming_the_wrong_shard_is_refused(gptq):
    key = "model.norm.weight"
    other = SHARDS[0] if shard_of(gptq, key) == SHARDS[1] else SHARDS[1]
    edit_json(gptq / INDEX, lambda d: d["weight_map"].update({key: other}))
    gptq_refused(gptq, INDEX, key, "does not hold that tensor")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_gptq_non_finite_scales_are_refused(gptq, bad):
    key = f"{Q_LAYER}.scales"
    edit_tensors(gptq, shard_of(gptq, key), lambda t: t[key].view(-1).__setitem__(3, bad))
    gptq_refused(gptq, key, "non-finite")


def test_gptq_bias_must_have_out_features(gptq):
    key = f"{Q_LAYER}.bias"
    edit_tensors(gptq, SHARDS[0], lambda t: t.update({key: torch.ones(1, dtype=torch.float16)}))
    edit_json(gptq / INDEX, lambda d: d["weight_map"].update({key: SHARDS[0]}))
    gptq_refused(gptq, Q_LAYER, "bias", "(64,)")
    # The layer reader alone refuses it too, and takes a bias of the right length.
    fmt = fmt_gptq.GPTQFormat(4, 32)
    own = {
        k.rpartition(".")[2]: t
        for k, t in {**load_file(gptq / SHARDS[0]), **load_file(gptq / SHARDS[1])}.items()
        if k.startswith(Q_LAYER + ".")
    }
    with pytest.raises(qalora.CheckpointError, match=r"bias is torch.float16 \(1,\)"):
        fmt_gptq.layer_from_gptq(own, fmt, Q_LAYER)
    own["bias"] = torch.full((64,), 0.5)
    assert torch.equal(fmt_gptq.layer_from_gptq(own, fmt, Q_LAYER).bias, torch.full((64,), 0.5))
    own["scales"] = own["scales"].clone()
    own["scales"][0, 0] = math.nan
    with pytest.raises(qalora.CheckpointError, match="scales holds non-finite"):
        fmt_gptq.layer_from_gptq(own, fmt, Q_LAYER)


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", INDEX, "quantize_config.json"])
def test_gptq_deeply_nested_json_is_a_checkpoint_error(gptq, name):
    if name == "quantize_config.json":  # read only where config.json has no quantization_config
        edit_json(gptq / "config.json", lambda d: d.pop("quantization_config"))
        (gptq / name).write_text(NESTED)
    elif name == "config.json":
        text = (gptq / name).read_text()
        (gptq / name).write_text(text[:-1] + ', "deep": ' + NESTED + "}")
    else:
        (gptq / name).write_text(NESTED)
    gptq_refused(gptq, name, "not valid JSON")


def test_gptq_deeply_nested_safetensors_header_is_a_checkpoint_error(gptq):
    raw = NESTED.encode()
    (gptq / SHARDS[0]).write_bytes(struct.pack("<Q", len(raw)) + raw)
    gptq_refused(gptq, SHARDS[0], "not valid JSON")


@pytest.mark.parametrize(
    "key,value,fragments",
    [
        ("num_hidden_layers", 20000, ["num_hidden_layers", "20000", "allowed: 1..1024"]),
        ("num_hidden_layers", 3, ["num_hidden_layers", "layers [2] have no tensors"]),
        ("num_hidden_layers", 1, ["num_hidden_layers", "also holds layers [1]"]),
        ("num_key_value_heads", 0, ["num_key_value_heads", "allowed: 1.."]),
        ("num_key_value_heads", 3, ["num_key_value_heads", "a divisor of num_attention_heads = 4"]),
        ("num_attention_heads", -4, ["num_attention_heads", "allowed: 1.."]),
        ("hidden_size", "64", ["hidden_size", "expected an integer"]),
        ("vocab_size", 1 << 30, ["vocab_size", "allowed: 1..4194304"]),
        ("max_position_embeddings", True, ["max_position_embeddings", "bool"]),
        ("head_dim", 15, ["head_dim", "even"]),
        ("rope_parameters", {"rope_type": "linear", "factor": math.nan}, ["rope_parameters.factor", "finite"]),
        ("rms_norm_eps", math.inf, ["rms_norm_eps", "finite"]),
    ],
)
def test_gptq_hostile_architecture_fields_are_refused_before_the_build(gptq, key, value, fragments):
    edit_json(gptq / "config.json", lambda d: d.update({key: value}))
    gptq_refused(gptq, "config.json", *fragments)


def test_gptq_load_needing_more_memory_than_available_is_refused(gptq, monkeypatch):
    monkeypatch.setattr(config_check, "available_memory", lambda: 1000)
    gptq_refused(gptq, "config.json", "needs about", "available")


def test_gptq_weight_of_the_wrong_shape_is_a_checkpoint_error(gptq):
    key = "model.norm.weight"
    edit_tensors(gptq, shard_of(gptq, key), lambda t: t.update({key: torch.ones(63, dtype=torch.float16)}))
    gptq_refused(gptq, key, "(63,)", "(64,)")


# ------------------------------------------------------------------ config checks on their own


def test_config_check_ranges_consistency_and_types():
    cfg = json.loads(tiny_llama().config.to_json_string())
    arch = config_check.check_config(cfg, "c.json")
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim) == (2, 64, 4, 2, 16)
    assert config_check.check_config(tiny_llama().config, "c.json") == arch  # a PretrainedConfig too
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=96)
    assert config_check.check_config(gpt2, "g.json").heads == 4
    for edit, fragments in [
        ({"n_head": 5}, ["'n_head'", "5 heads do not divide n_embd = 64"]),
        ({"n_layer": 0}, ["'n_layer'", "allowed: 1..1024"]),
        ({"n_positions": 2**40}, ["'n_positions'", "allowed: 1.."]),
        ({"n_inner": "big"}, ["'n_inner'", "expected an integer"]),
        ({"layer_norm_epsilon": -1.0}, ["'layer_norm_epsilon'", "[0, 1]"]),
    ]:
        with pytest.raises(qalora.CheckpointError) as info:
            config_check.check_config({**gpt2.to_dict(), **edit}, "g.json")
        assert str(info.value).startswith("g.json: field"), str(info.value)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)
    with pytest.raises(qalora.FormatError, match="num_hidden_layers"):  # the GGUF side's error class
        config_check.check_config({**cfg, "num_hidden_layers": -1}, "m.gguf", error=qalora.FormatError)
    with pytest.raises(qalora.CheckpointError, match=r"text_config.*num_attention_heads"):
        config_check.check_config({"text_config": {**cfg, "num_attention_heads": 0}}, "c.json")


def test_config_check_layer_tensors():
    arch = config_check.Architecture(layers=2, hidden=8)
    good = {"model.layers.0.w": (8, 8), "model.layers.1.w": (8, 8), "model.norm.weight": (8,)}
    config_check.check_layer_tensors(arch, good, "c.json", "w")
    for shapes, fragment in [
        ({**good, "model.layers.1.dummy": (0,)}, "holds no values"),
        ({"model.layers.0.w": (8, 8)}, "layers [1] have no tensors"),
        ({**good, "model.layers.2.w": (8, 8)}, "also holds layers [2]"),
        ({"model.layers.0.w": (8, 8), "model.layers.1.w": (7,)}, "fewer than one vector"),
        ({"model.norm.weight": (8,)}, "no numbered layer tensors"),
    ]:
        with pytest.raises(qalora.CheckpointError, match=re_escape(fragment)):
            config_check.check_layer_tensors(arch, shapes, "c.json", "w")


def re_escape(text):
    import re

    return re.escape(text)


# ------------------------------------------------------------------ from_pretrained


def add_tensors(path, tensors):
    """Adds tensors to a safetensors file, keeping its metadata (the manifest is then resigned)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file({**load_file(path), **tensors}, path, metadata=metadata)


def test_zero_size_tensors_do_not_inflate_the_layer_count(saved):
    # 30000 empty "layers": a small directory whose config asks for 30000 layers. The old bound
    # (layers <= tensors) let it through to a build of 334 s and 2.1 GB.
    add_tensors(saved / "model.safetensors", {f"model.layers.{i}.dummy": torch.zeros(0) for i in range(2, 30000)})
    edit_json(saved / "config.json", lambda d: d.update(num_hidden_layers=30000))
    resign(saved)
    saved_refused(saved, "config.json", "num_hidden_layers", "30000", "allowed: 1..1024")
    edit_json(saved / "config.json", lambda d: d.update(num_hidden_layers=3))
    resign(saved)
    saved_refused(saved, "model.safetensors", ".dummy' has shape (0,)", "holds no values")


def test_layer_count_is_bounded_by_the_layers_present(saved):
    edit_json(saved / "config.json", lambda d: d.update(num_hidden_layers=3))
    resign(saved)
    saved_refused(
        saved,
        "config.json",
        "num_hidden_layers",
        "layers [2] have no tensors",
        "allowed: the layer count of the weights, 2",
    )
    add_tensors(saved / "model.safetensors", {"model.layers.2.input_layernorm.weight": torch.ones(1)})
    resign(saved)
    saved_refused(saved, "model.layers.2", "fewer than one vector of hidden_size 64")


def tiny_gpt_neo_saved(directory):
    cfg = transformers.GPTNeoConfig(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = qalora.wrap(transformers.GPTNeoForCausalLM(cfg), QALoRAConfig(rank=2, group_size=32))
    qalora.save_pretrained(model, directory)
    return Path(directory)


def test_skeleton_buffers_are_bounded_before_the_build(tmp_path):
    """GPT-Neo builds a (positions x positions) causal mask per layer, for real: a small
    config asking for 2**20 positions would allocate 2 TiB. Measured on the meta device and
    refused before anything is allocated."""
    d = tiny_gpt_neo_saved(tmp_path / "neo")
    assert logits_of(qalora.from_pretrained(d)).shape == (1, 8, 96)
    edit_json(d / "config.json", lambda c: c.update(max_position_embeddings=1 << 20))
    resign(d)
    saved_refused(d, "config.json", "needs about 2048.00 GiB", "available")


def test_skeleton_buffers_are_counted_during_the_build(tmp_path, monkeypatch):
    """Where the meta-device measure cannot run, the build itself stops at the limit."""
    from qalora import hf_skeleton

    d = tiny_gpt_neo_saved(tmp_path / "neo")
    edit_json(d / "config.json", lambda c: c.update(max_position_embeddings=4096))  # 16 MiB of mask per layer
    resign(d)
    monkeypatch.setattr(hf_skeleton, "buffer_bytes", lambda *a, **k: None)
    monkeypatch.setattr(config_check, "available_memory", lambda: 20 << 20)
    saved_refused(d, "config.json", "building the model allocated more than", "max_position_embeddings")


def test_from_pretrained_needing_more_memory_than_available_is_refused(saved, monkeypatch):
    monkeypatch.setattr(config_check, "available_memory", lambda: 1000)
    saved_refused(saved, "config.json", "needs about", "available")


def test_tokenizer_added_after_the_save_is_named(saved):
    with pytest.raises(qalora.ModelLoadError, match="holds no tokenizer; save it with"):
        qalora.load_model(str(saved))
    char_tokenizer().save_pretrained(saved)
    msg = refused(lambda: qalora.load_model(str(saved)), "tokenizer.json", "does not list", cls=qalora.ModelLoadError)
    assert "added after the save" in msg and "save_pretrained(model, dir, tokenizer=" in msg


# ------------------------------------------------------------------ writers


def test_output_error_is_typed_and_exported():
    assert issubclass(qalora.OutputError, qalora.QALoRAError) and issubclass(qalora.OutputError, OSError)
    assert "OutputError" in qalora.errors.__all__ and "OutputError" in dir(qalora)


def _targets(tmp_path):
    (tmp_path / "a_dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real.txt").write_text("keep me")
    os.symlink(tmp_path / "real.txt", tmp_path / "link.txt")
    return {
        "directory": (str(tmp_path / "a_dir"), "is a directory"),
        "device": ("/dev/null", "not a regular file"),
        "fifo": (str(tmp_path / "fifo"), "not a regular file"),
        "symlink": (str(tmp_path / "link.txt"), "is a symlink"),
        "empty name": ("", "not a file name"),
        "trailing slash": (str(tmp_path / "x") + "/", "not a file name"),
        "NUL byte": (str(tmp_path / "a\0b"), "NUL byte"),
    }


def test_atomic_writers_refuse_what_is_not_a_regular_file(tmp_path):
    before = os.stat("/dev/null")
    for path, fragment in _targets(tmp_path).values():
        for write in (
            lambda p: atomic_write_text(p, "x"),
            lambda p: atomic_save_safetensors(p, {"t": torch.zeros(2)}),
        ):
            with pytest.raises(qalora.OutputError, match=re_escape(fragment)):
                write(path)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev  # the device node is still there
    assert os.path.islink(tmp_path / "link.txt") and (tmp_path / "real.txt").read_text() == "keep me"
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert not [e for e in os.listdir(tmp_path) if e.endswith(".tmp")]


def test_directory_writers_refuse_bad_targets(tmp_path):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(qalora.OutputError, match="NUL"):
        qalora.save_pretrained(model, str(tmp_path / "a\0b"))
    qalora.merge(model)
    for path, fragment in [
        ("/dev/null", "not a directory"),
        (tmp_path / "file", "not a directory"),
        ("", "not a directory name"),
    ]:
        with pytest.raises(qalora.OutputError, match=fragment):
            fmt_gptq.export_gptq(model, path, force=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and (tmp_path / "file").read_text() == "x"
    from qalora.io import atomic_directory

    with pytest.raises(qalora.OutputError, match="No space left") as info:
        with atomic_directory(tmp_path / "out") as work:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(work, "model.safetensors"))
    assert info.value.errno == errno.ENOSPC and "model.safetensors" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_export_gguf_refuses_a_device_before_any_work(tmp_path):
    before = os.stat("/dev/null")
    for path, fragment in [("/dev/null", "not a regular file"), (str(tmp_path), "is a directory")]:
        with pytest.raises(qalora.OutputError, match=fragment):
            qalora.export_gguf(tiny_llama(), path)  # refused before the tokenizer is asked for
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_rdev == before.st_rdev


def test_permission_denied_is_an_output_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes where permissions say no; sysfs refuses it files
        locked = Path("/sys")
        if not os.path.ismount(locked):
            pytest.skip("no directory this user cannot write in")
    try:
        with pytest.raises(qalora.OutputError, match="Permission denied") as info:
            atomic_write_text(locked / "qalora-test-model.gguf", "x")
        assert info.value.errno == errno.EACCES
        with pytest.raises(qalora.OutputError, match=r"Permission denied|Operation not permitted"):
            qalora.save_pretrained(qalora.wrap(tiny_llama(), QALoRAConfig(rank=2)), locked / "qalora-test-model")
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_no_space_left_is_an_output_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("old")
    with pytest.raises(qalora.OutputError, match="No space left on device") as info:
        with atomic_path(target) as tmp:
            Path(tmp).write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["model.gguf"]


FILE_TOO_LARGE = textwrap.dedent(
    r"""
    import errno, json, os, resource, signal, sys
    import torch
    import qalora
    from qalora.io import atomic_save_safetensors, atomic_write_text
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    out = {}
    for name, write in [
        ("text", lambda p: atomic_write_text(p, "x" * 100_000)),
        ("safetensors", lambda p: atomic_save_safetensors(p, {"t": torch.zeros(100_000)})),
    ]:
        try:
            write(os.path.join(sys.argv[1], name))
            out[name] = "written"
        except qalora.OutputError as e:
            out[name] = [e.errno, str(e)]
    print(json.dumps(out))
    """
)


def test_file_too_large_is_an_output_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", FILE_TOO_LARGE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("text", "safetensors"):
        number, message = out[name]
        assert number == errno.EFBIG and "File too large" in message and name in message, out
    assert os.listdir(tmp_path) == []  # no temporary file left behind


KILLED_WRITE = textwrap.dedent(
    r"""
    import os, signal, sys
    from qalora.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "w") as f:
            f.write("half a model")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    target = tmp_path / "model.gguf"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    left = [e for e in os.listdir(tmp_path) if e.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".model.gguf.qalora-"), left
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_pid = tmp_path / f".model.gguf.qalora-{dead.pid}-abcdefgh.tmp"
    legacy = tmp_path / ".model.gguf.k2j4h6g8.tmp"  # an earlier release's name, without a pid
    live = tmp_path / f".model.gguf.qalora-{os.getppid()}-abcdefgh.tmp"  # a write still running
    recent_legacy = tmp_path / ".model.gguf.zzzzzzzz.tmp"
    other = tmp_path / f".other.gguf.qalora-{dead.pid}-abcdefgh.tmp"  # another file's
    for p in (stale_pid, legacy, live, recent_legacy, other):
        p.write_text("x")
    day_ago = time.time() - 86400
    os.utime(legacy, (day_ago, day_ago))
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    remaining = sorted(e for e in os.listdir(tmp_path) if e.endswith(".tmp"))
    assert remaining == sorted(p.name for p in (live, recent_legacy, other)), remaining


# ------------------------------------------------------------------ the command line


def cli(argv, capsys):
    from qalora.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_cli_reports_hostile_gptq_directories_cleanly(gptq, capsys):
    edit_json(gptq / "config.json", lambda d: d.update(num_key_value_heads=0))
    code, err = cli(["eval", "--model", gptq, "--eval-blocks", "1"], capsys)
    assert code == 2 and "qalora: error:" in err and "num_key_value_heads" in err, err
    assert "internal error" not in err
    edit_json(gptq / "config.json", lambda d: d.update(num_key_value_heads=2))
    key = f"{Q_LAYER}.bias"
    edit_tensors(gptq, SHARDS[0], lambda t: t.update({key: torch.ones(1, dtype=torch.float16)}))
    code, err = cli(["eval", "--model", gptq, "--eval-blocks", "1"], capsys)
    assert code == 2 and "bias" in err and "internal error" not in err, err


@pytest.mark.parametrize(
    "exc,fragment", [(MemoryError(), "out of memory"), (RecursionError("deep"), "nested too deeply")]
)
def test_cli_maps_memory_and_recursion_errors(tmp_path, capsys, monkeypatch, exc, fragment):
    import qalora.cli.finetune

    def boom(args):
        raise exc

    monkeypatch.setattr(qalora.cli.finetune, "run_eval", boom)
    code, err = cli(["eval", "--model", tiny_model_dir(tmp_path / "m")], capsys)
    assert code == 2 and fragment in err and "internal error" not in err, err


@pytest.mark.parametrize(
    "option,value",
    [
        ("--rank", 1_000_000_000),
        ("--batch-size", 10**9),
        ("--block-size", 10**9),
        ("--steps", 10**12),
        ("--eval-blocks", 10**9),
    ],
)
def test_cli_size_options_are_bounded(option, value, capsys):
    from qalora.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["finetune", "--model", "m", "--out", "o", option, str(value)])
    assert info.value.code == 2
    assert f"argument {option}: got {value}, allowed: 1.." in capsys.readouterr().err


def test_rank_is_checked_against_the_layers(tmp_path, capsys):
    with pytest.raises(qalora.ConfigError, match=r"rank: got 1000000000, it must be an int in 1\.\.65536"):
        QALoRAConfig(rank=1_000_000_000)
    with pytest.raises(qalora.ConfigError, match="alpha"):
        QALoRAConfig(alpha=math.inf)
    model = tiny_llama()
    with pytest.raises(qalora.ConfigError, match=r"rank: got 33; layer '.*k_proj' .* at most 32"):
        qalora.wrap(model, QALoRAConfig(rank=33))  # k_proj: 64 -> 32 (2 of 4 heads for keys)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing changed
    qalora.wrap(model, QALoRAConfig(rank=32))
    code, err = cli(
        ["finetune", "--model", tiny_model_dir(tmp_path / "m"), "--rank", 65, "--out", tmp_path / "o", "--steps", 1],
        capsys,
    )
    assert code == 2 and "rank: got 65" in err and "internal error" not in err, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_block_size_beyond_the_model_positions_is_refused(tmp_path, capsys):
    code, err = cli(["eval", "--model", tiny_model_dir(tmp_path / "m"), "--block-size", 4096], capsys)
    assert code == 2 and "--block-size 4096" in err and "max_position_embeddings" in err, err


# ------------------------------------------------------------------ the generator

HOSTILE_VALUES = [0, -1, 1, 3, 7, 20000, 2**31, 2**63, 1.5, math.nan, math.inf, "x", None, True, [], {}]
CONFIG_FIELDS = [
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_parameters.rope_theta",
    "rope_parameters.factor",
    "model_type",
    "tie_word_embeddings",
]


def _nested(depth):
    return "[" * depth + "]" * depth


def _json_or_cut(rng: random.Random, path: Path):
    """The file's JSON, or None after cutting it short where an earlier mutation broke it."""
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError, OSError):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: rng.randrange(0, 64)])
        return None


def mutate_config(rng: random.Random, directory: Path) -> str:
    path = directory / "config.json"
    data = _json_or_cut(rng, path)
    if not isinstance(data, dict):
        return "config.json cut"
    field = rng.choice(CONFIG_FIELDS)
    value = rng.choice([*HOSTILE_VALUES, "nested", "same"])
    if value == "same":  # the file rewritten, nothing changed: must still load
        path.write_text(json.dumps(data, indent=1))
        return "config.json rewritten"
    if field.startswith("rope_parameters."):
        rope = data.get("rope_parameters")
        if isinstance(rope, dict):
            rope[field.split(".", 1)[1]] = value
    else:
        data[field] = value
    text = json.dumps(data)
    if value == "nested":
        text = text.replace('"nested"', _nested(rng.choice([50, 5000, 200_000])))
    path.write_text(text)
    return f"config.json {field} = {str(value)[:20]}"


def mutate_index(rng: random.Random, directory: Path) -> str:
    path = directory / INDEX
    data = _json_or_cut(rng, path)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        return "index cut"
    keys = sorted(data["weight_map"])
    how = rng.choice(["path", "drop_map", "list", "wrong_shard", "unknown_tensor", "missing_file", "nested", "garbage"])
    if how == "path":
        value = rng.choice(["../" + SHARDS[0], "/etc/hostname", "", ".", "..", "a/b.safetensors", SHARDS[0] + "\0"])
        data["weight_map"][rng.choice(keys)] = value
    elif how == "drop_map":
        del data["weight_map"]
    elif how == "list":
        data["weight_map"] = list(data["weight_map"].items())
    elif how == "wrong_shard":
        k = rng.choice(keys)
        data["weight_map"][k] = SHARDS[1] if data["weight_map"][k] == SHARDS[0] else SHARDS[0]
    elif how == "unknown_tensor":
        data["weight_map"]["model.layers.7.x"] = SHARDS[0]
    elif how == "missing_file":
        data["weight_map"][rng.choice(keys)] = "model-00003-of-00003.safetensors"
    if how == "nested":
        path.write_text(_nested(200_000))
    elif how == "garbage":
        path.write_bytes(rng.randbytes(rng.randrange(1, 200)))
    else:
        path.write_text(json.dumps(data))
    return f"index {how}"


def mutate_safetensors(rng: random.Random, path: Path, how: str | None = None) -> str:
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    how = how or rng.choice(["truncate", "flip_header", "flip_data", "header_length", "edit_header"])
    if len(blob) < 16 or 8 + n >= len(blob):  # damaged already (cut by an earlier mutation)
        how = "truncate" if len(blob) else "header_length"
    if how == "truncate":
        blob = blob[: rng.randrange(0, len(blob))]
    elif how == "flip_header":
        for _ in range(rng.randrange(1, 6)):
            blob[rng.randrange(0, 8 + n)] ^= 1 << rng.randrange(8)
    elif how == "flip_data":
        for _ in range(rng.randrange(1, 20)):
            blob[rng.randrange(8 + n, len(blob))] ^= 1 << rng.randrange(8)
    elif how == "header_length":
        blob[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 8, len(blob), 2**63, rng.randrange(2**64)]))
    else:
        header = json.loads(blob[8 : 8 + n])
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[key]
        part = rng.choice(["shape", "dtype", "data_offsets", "remove", "zero_size", "huge"])
        if part == "shape":
            entry["shape"] = [rng.choice([0, 1, 2, 63, 10**6]) for _ in entry["shape"]]
        elif part == "dtype":
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "U8", "F8_E4M3", "X"])
        elif part == "data_offsets":
            entry["data_offsets"] = [rng.randrange(0, len(blob)), rng.randrange(0, len(blob))]
        elif part == "remove":
            del header[key]
        elif part == "zero_size":
            header[key + ".dummy"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        else:
            entry["shape"] = [2**20, 2**20]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        blob = bytearray(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
        how = f"edit_header {part}"
    path.write_bytes(bytes(blob))
    return f"{path.name} {how}"


def mutate_special(rng: random.Random, path: Path) -> str:
    path.unlink()
    how = rng.choice(["fifo", "symlink_out", "missing", "directory"])
    if how == "fifo":
        os.mkfifo(path)
    elif how == "symlink_out":
        os.symlink("/dev/zero", path)
    elif how == "directory":
        path.mkdir()
    return f"{path.name} {how}"


def make_case(rng: random.Random, kind: str, pristine: Path, target: Path) -> dict:
    shutil.copytree(pristine, target)
    weights = [target / s for s in SHARDS] if kind == "gptq" else [target / "model.safetensors"]
    kinds = ["config", "safetensors", "safetensors", "flip_data", "special"] + (["index"] if kind == "gptq" else [])
    what = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        choice = rng.choice(kinds)
        if choice == "config":
            what.append(mutate_config(rng, target))
        elif choice == "index":
            what.append(mutate_index(rng, target))
        elif choice == "flip_data":  # often a valid file with other weights: it must load and run
            what.append(mutate_safetensors(rng, rng.choice(weights), "flip_data"))
        elif choice == "special":
            what.append(mutate_special(rng, rng.choice([*weights, target / "config.json"])))
            break  # the path is no longer a file to mutate further
        else:
            what.append(mutate_safetensors(rng, rng.choice(weights)))
    if kind == "saved" and rng.random() < 0.8 and all(os.path.isfile(p) for p in [*weights, target / "config.json"]):
        resign(target)  # as a hostile writer would: the damage then reaches the parsers
    # GPTQ directories load half the time through qalora.load_model (tokenizer, wrapping errors).
    via = "load_model" if kind == "gptq" and rng.random() < 0.5 else "direct"
    return {"kind": kind, "path": str(target), "mutation": "; ".join(what), "via": via}


WORKER = textwrap.dedent(
    r"""
    import json, resource, signal, sys
    limit, per_case = int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # before torch: it must import under it
    import torch
    torch.set_num_threads(1)
    import qalora
    from qalora.errors import QALoRAError
    from qalora.formats import gptq as fmt_gptq

    class Timeout(BaseException):
        pass

    def on_alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    cases = json.load(open(sys.argv[1]))
    ids = torch.arange(8).view(1, 8)
    print(json.dumps({"ready": True}), flush=True)
    for i in range(int(sys.argv[4]), len(cases)):
        case = cases[i]
        signal.alarm(per_case)
        try:
            if case["kind"] == "gptq":
                if case["via"] == "load_model":
                    model = qalora.load_model(case["path"]).model
                else:
                    model = fmt_gptq.load_gptq_model(case["path"])
            else:
                model = qalora.from_pretrained(case["path"])
            with torch.no_grad():
                logits = model(ids).logits
            want = (1, 8, model.config.vocab_size)
            outcome = "loaded" if tuple(logits.shape) == want else f"bad: logits {tuple(logits.shape)}"
        except Timeout:
            outcome = "bad: timeout"
        except QALoRAError as e:
            outcome = "typed " + type(e).__name__
        except BaseException as e:
            outcome = f"bad: {type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
        print(json.dumps({"case": i, "outcome": outcome}), flush=True)
    """
)

CASES = int(os.environ.get("QALORA_HOSTILE_CASES", "150"))  # per kind
ADDRESS_SPACE = 4 << 30
PER_CASE_S = 60


def run_worker(cases_file: Path, n: int) -> dict[int, str]:
    """Loads every case in a worker under the limits; a worker that dies or hangs is
    recorded against the case it was on and a new one goes on with the next."""
    outcomes: dict[int, str] = {}
    env = dict(os.environ, QALORA_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    start = 0
    while start < n:
        args = [sys.executable, "-c", WORKER, str(cases_file), str(ADDRESS_SPACE), str(PER_CASE_S), str(start)]
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=PER_CASE_S * 3 + 60 * (n - start), env=env)
            out, code, err = r.stdout, r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code, err = "hung", ""
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines and lines[0] == {"ready": True}, f"the worker did not start under RLIMIT_AS: {err[-3000:]}"
        for line in lines[1:]:
            outcomes[line["case"]] = line["outcome"]
        done = max([start - 1, *(line["case"] for line in lines[1:])])
        if done + 1 < n:
            outcomes[done + 1] = f"bad: worker exited ({code}) on this case: {err[-500:]}"
        start = done + 2
    return outcomes


@pytest.mark.slow
def test_mutated_directories_load_or_raise_a_typed_error(pristine, tmp_path, report_counts):
    rng = random.Random(22)
    cases = []
    for i in range(CASES):
        for kind in ("gptq", "saved"):
            cases.append(make_case(rng, kind, pristine / kind, tmp_path / f"{kind}-{i}"))
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    start = time.perf_counter()
    outcomes = run_worker(cases_file, len(cases))
    counts: dict[str, dict[str, int]] = {}
    for i, case in enumerate(cases):
        kind_counts = counts.setdefault(case["kind"], {})
        kind_counts[outcomes[i]] = kind_counts.get(outcomes[i], 0) + 1
    report_counts(
        f"hostile directories: {len(cases)} cases in {time.perf_counter() - start:.0f} s: {json.dumps(counts)}"
    )
    bad = [
        (case["kind"], case["mutation"], outcomes[i]) for i, case in enumerate(cases) if outcomes[i].startswith("bad")
    ]
    assert not bad, bad[:10]
    for kind in ("gptq", "saved"):  # the generator reaches both ends
        assert counts[kind].get("loaded", 0) > 0 and sum(v for k, v in counts[kind].items() if k != "loaded") > 0
