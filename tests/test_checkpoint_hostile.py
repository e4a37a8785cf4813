"""Checkpoint directories as untrusted input: special files, symlinks, damaged and
inconsistent files, fields out of range. Every refusal is a CheckpointError that names the
file and the field, raised before a tensor is read or the caller's model changes."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import qalora
import torch
from ckpt_tools import deadline, resign
from qalora import QALoRAConfig
from qalora.ops import SUPPORTED_BITS
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    qalora.save_pretrained(model, root / "model")
    qalora.save_adapter(model, root / "adapter")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    shutil.copytree(pristine / "model", tmp_path / "model")
    shutil.copytree(pristine / "adapter", tmp_path / "adapter")
    return tmp_path


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def refused(directory, *fragments, adapter=False):
    with deadline(), pytest.raises(qalora.CheckpointError) as info:
        if adapter:
            qalora.load_adapter(qalora.wrap(tiny_llama(), QALoRAConfig(rank=2)), directory)
        else:
            qalora.from_pretrained(directory)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_pristine_copy_loads(ckpt):
    qalora.from_pretrained(ckpt / "model")
    qalora.load_adapter(qalora.wrap(tiny_llama(), QALoRAConfig(rank=2)), ckpt / "adapter")


def test_fifo_and_device_files_are_refused_without_blocking(ckpt):
    d = ckpt / "model"
    (d / "qalora_config.json").unlink()
    os.mkfifo(d / "qalora_config.json")
    refused(d, "qalora_config.json", "not a regular file")
    (d / "qalora_config.json").unlink()
    shutil.copy(ckpt / "adapter" / "adapter_config.json", ckpt / "x.json")
    # A FIFO under a name only the tokenizer loader would read is refused too.
    shutil.copytree(ckpt / "adapter", ckpt / "adapter2")
    os.mkfifo(ckpt / "adapter2" / "tokenizer.json")
    refused(ckpt / "adapter2", "tokenizer.json", "not a regular file", adapter=True)


def test_symlinks_out_of_the_directory_are_refused(ckpt):
    d = ckpt / "model"
    (d / "qalora_config.json").unlink()
    os.symlink("/dev/zero", d / "qalora_config.json")
    refused(d, "qalora_config.json", "symlink out of the checkpoint directory")
    os.unlink(d / "qalora_config.json")
    shutil.copy(ckpt / "adapter" / "adapter_config.json", ckpt / "elsewhere.json")
    os.symlink(ckpt / "elsewhere.json", d / "qalora_config.json")
    refused(d, "symlink out of the checkpoint directory")


def test_oversized_json_is_refused_before_it_is_read(ckpt, monkeypatch):
    monkeypatch.setattr(qalora.checkpoint, "MAX_JSON_BYTES", 1024)
    refused(ckpt / "model", "qalora_config.json", "larger than")


def test_damage_is_caught_by_the_manifest(ckpt):
    d = ckpt / "model"
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-3] ^= 0x40  # one bit of one weight: loads "fine" without a content hash
    (d / "model.safetensors").write_bytes(bytes(blob))
    refused(d, "model.safetensors", "files.model.safetensors", "damaged")
    (d / "model.safetensors").write_bytes(bytes(blob[:100]))
    refused(d, "model.safetensors")


def test_truncated_safetensors_is_a_checkpoint_error(ckpt):
    d = ckpt / "model"
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    resign(d)
    refused(d, "model.safetensors")
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    resign(d)
    refused(d, "model.safetensors", "header length")


UNSUPPORTED_BITS = next(b for b in range(1, 17) if b not in SUPPORTED_BITS)


@pytest.mark.parametrize(
    "key,value,fragments",
    [
        ("group_size", 0, ["group_size", "allowed: 1.."]),
        ("group_size", 24, ["group_size", "must divide"]),
        ("rank", 0, ["rank", "allowed: 1.."]),
        ("bits", "4", ["bits", "'4'"]),
        ("bits", 10**12, ["bits", "1000000000000"]),
        ("bits", UNSUPPORTED_BITS, ["bits", "allowed"]),
        ("bits", True, ["bits"]),
        ("alpha", 1e400, ["alpha", "finite"]),
        ("alpha", "x", ["alpha", "finite"]),
        ("in_features", -64, ["in_features"]),
        ("type", "Linear", ["type", "QuantLinear"]),
        ("scale_dtype", "float64", ["scale_dtype"]),
        ("bias", "yes", ["bias"]),
        ("factored", "yes", ["factored"]),
        ("factored", {"groups_per_factor": 1, "scale_ints": "float32", "offset_ints": "shared"}, ["scale_ints"]),
        ("factored", {"groups_per_factor": 10**6, "scale_ints": "uint8", "offset_ints": "int8"}, ["groups_per_factor"]),
        ("factored", {"groups_per_factor": 1, "scale_ints": "uint8"}, ["offset_ints"]),
    ],
)
def test_layer_fields_are_validated(ckpt, key, value, fragments):
    def edit(data):
        data["layers"][LAYER][key] = value

    edit_json(ckpt / "model" / "qalora_config.json", edit)
    msg = refused(ckpt / "model", "qalora_config.json", f"layers.{LAYER}", *fragments)
    assert len(msg) < 600
    edit_json(ckpt / "adapter" / "adapter_config.json", edit)
    refused(ckpt / "adapter", "adapter_config.json", f"layers.{LAYER}", *fragments, adapter=True)


def test_missing_field_and_nan_constant(ckpt):
    edit_json(ckpt / "model" / "qalora_config.json", lambda d: d["layers"][LAYER].pop("rank"))
    refused(ckpt / "model", f"layers.{LAYER}.rank", "missing")
    path = ckpt / "adapter" / "adapter_config.json"
    text = path.read_text()
    data = json.loads(text)
    data["layers"][LAYER]["alpha"] = "@@"
    path.write_text(json.dumps(data).replace('"@@"', "NaN"))
    refused(ckpt / "adapter", "adapter_config.json", f"layers.{LAYER}.alpha", "finite", adapter=True)


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (lambda d: d.update(format_version=99), ["format_version", "99", "upgrade"]),
        (lambda d: d.update(format="gguf"), ["format", "gguf"]),
        (lambda d: d["config"].update(bits=2**40), ["config", "bits"]),
        (lambda d: d.update(merged="no"), ["merged"]),
        (lambda d: d.update(merged=True), ["merged", "adapters"]),
        (lambda d: d.update(layers=[]), ["layers", "JSON object"]),
        (lambda d: d["files"].update({"../x": d["files"]["model.safetensors"]}), ["files.../x"]),
        (lambda d: d.update(architecture={"library": "transformers", "class": "os"}), ["architecture.class"]),
    ],
)
def test_model_config_fields_are_validated(ckpt, edit, fragments):
    edit_json(ckpt / "model" / "qalora_config.json", edit)
    refused(ckpt / "model", "qalora_config.json", *fragments)


def rewrite_header(path, edit):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def test_tensor_dtype_must_be_as_declared(ckpt):
    d = ckpt / "model"
    # float32 data relabelled as int32 (same size): it must not be cast silently.
    rewrite_header(d / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="I32"))
    resign(d)
    refused(d, "model.norm.weight", "float32")


def test_scales_dtype_must_match_the_layer_description(ckpt):
    d = ckpt / "model"
    key = f"{LAYER}.base_layer.scales"
    rewrite_header(d / "model.safetensors", lambda h: h[key].update(dtype="BF16"))
    resign(d)
    refused(d, key, "qalora_config.json", "torch.float16")


def test_header_offsets_are_checked(ckpt):
    d = ckpt / "model"
    rewrite_header(d / "model.safetensors", lambda h: h["model.norm.weight"].update(data_offsets=[0, 10**15]))
    resign(d)
    refused(d, "model.norm.weight", "data_offsets")


def test_non_finite_tensors_are_refused(ckpt):
    d = ckpt / "model"
    tensors = load_file(d / "model.safetensors")
    tensors[f"{LAYER}.lora_B.weight"][0, 0] = math.nan
    save_file(tensors, d / "model.safetensors", metadata={"format": "qalora"})
    resign(d)
    refused(d, f"{LAYER}.lora_B.weight", "non-finite")
    d = ckpt / "adapter"
    tensors = load_file(d / "adapter_model.safetensors")
    tensors[f"{LAYER}.lora_A.weight"][0, 0] = math.inf
    save_file(tensors, d / "adapter_model.safetensors")
    resign(d, "adapter_config.json")
    refused(d, f"{LAYER}.lora_A.weight", "non-finite", adapter=True)


def test_hostile_hf_config_is_refused(ckpt):
    d = ckpt / "model"
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=10**6))
    resign(d)
    refused(d, "config.json", "num_hidden_layers")
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=2, hidden_size=2**40))
    resign(d)
    refused(d, "config.json", "hidden_size")
    edit_json(d / "config.json", lambda c: c.update(hidden_size=64, num_attention_heads=0))
    resign(d)
    refused(d, "config.json")


def test_refused_two_argument_load_leaves_model_unchanged(ckpt):
    edit_json(ckpt / "model" / "qalora_config.json", lambda d: d["layers"][LAYER].update(alpha=math.inf))
    model = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qalora.CheckpointError, match="alpha"):
        qalora.from_pretrained(ckpt / "model", model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert qalora.state_of(model) is None


def test_missing_directory_and_plain_directory(tmp_path):
    refused(tmp_path / "nowhere", "does not exist")
    refused(tmp_path, "qalora_config.json", "does not exist")


def test_a_factored_description_needs_the_factored_tensors(ckpt):
    # A valid "factored" entry on a layer whose file holds float scales and offsets: the
    # tensors the description implies are missing, and the file is refused by name.
    factored = {"groups_per_factor": 1, "scale_ints": "uint8", "offset_ints": "shared"}
    edit_json(ckpt / "model" / "qalora_config.json", lambda d: d["layers"][LAYER].update(factored=factored))
    refused(ckpt / "model", "model.safetensors", f"{LAYER}.base_layer.sub_scales")
