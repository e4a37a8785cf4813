"""Property-based fuzzing of checkpoint loading: random damage to real checkpoint files
(bytes flipped, overwritten, cut, appended; files deleted or emptied; JSON values and
safetensors header fields replaced), with and without a manifest rewritten to match (as a
hostile writer would, so the damage reaches the parsers behind the content hash).

Property: a load either succeeds or raises CheckpointError (for an adapter also
AdapterMismatchError: a damaged but valid file may describe other layers than the model's);
nothing else escapes, nothing crashes or hangs.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import qalora
import torch
from ckpt_tools import deadline, resign
from qalora import QALoRAConfig

hypothesis = pytest.importorskip("hypothesis")
transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every run: a CI failure reproduces
)


_PRISTINE: dict[str, Path] = {}


def pristine() -> Path:
    if "root" not in _PRISTINE:
        root = Path(tempfile.mkdtemp(prefix="qalora-fuzz-"))
        model = qalora.wrap(tiny_llama(), QALoRAConfig(bits=4, group_size=32, rank=2))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        qalora.save_pretrained(model, root / "model")
        qalora.save_adapter(model, root / "adapter")
        _PRISTINE["root"] = root
    return _PRISTINE["root"]


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    if "root" in _PRISTINE:
        shutil.rmtree(_PRISTINE.pop("root"), ignore_errors=True)


def byte_damage():
    return st.one_of(
        st.tuples(
            st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=8)
        ),
        st.tuples(st.just("overwrite"), st.tuples(st.integers(0, 1 << 30), st.binary(min_size=1, max_size=64))),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), st.none()),
        st.tuples(st.just("empty"), st.none()),
    )


def apply_bytes(path: Path, damage) -> None:
    kind, arg = damage
    if kind == "delete":
        path.unlink()
        return
    blob = bytearray(path.read_bytes())
    if kind == "flip":
        for pos, mask in arg:
            if blob:
                blob[pos % len(blob)] ^= mask
    elif kind == "overwrite":
        pos, data = arg
        pos = pos % (len(blob) + 1)
        blob[pos : pos + len(data)] = data
    elif kind == "truncate":
        del blob[arg % (len(blob) + 1) :]
    elif kind == "append":
        blob += arg
    elif kind == "empty":
        blob = bytearray()
    path.write_bytes(bytes(blob))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def json_paths(value, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*prefix, i))


def replace_at(doc, path, value, delete):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def load_model(directory: Path):
    return qalora.from_pretrained(directory)


def load_adapter(directory: Path):
    return qalora.load_adapter(qalora.wrap(tiny_llama(), QALoRAConfig(bits=4, group_size=32, rank=2)), directory)


def expect_checkpoint_error_or_success(load, directory: Path) -> None:
    allowed = (qalora.CheckpointError, qalora.AdapterMismatchError) if load is load_adapter else qalora.CheckpointError
    with deadline(30):
        try:
            load(directory)
        except allowed:
            pass


@pytest.mark.parametrize("which", ["model", "adapter"])
@FUZZ
@given(data=st.data(), damage=byte_damage(), resign_after=st.booleans())
def test_random_byte_damage(which, data, damage, resign_after):
    src = pristine() / which
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / which
        shutil.copytree(src, d)
        name = data.draw(st.sampled_from(sorted(p.name for p in d.iterdir())), label="file")
        apply_bytes(d / name, damage)
        config = "qalora_config.json" if which == "model" else "adapter_config.json"
        if resign_after and name != config:
            resign(d, config)
        expect_checkpoint_error_or_success(load_model if which == "model" else load_adapter, d)


@pytest.mark.parametrize("which", ["model", "adapter"])
@FUZZ
@given(data=st.data(), value=json_values, delete=st.booleans())
def test_random_json_field_damage(which, data, value, delete):
    src = pristine() / which
    config = "qalora_config.json" if which == "model" else "adapter_config.json"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / which
        shutil.copytree(src, d)
        doc = json.loads((d / config).read_text())
        paths = [p for p in json_paths(doc) if p[:1] != ("files",)]
        path = data.draw(st.sampled_from(paths), label="field")
        doc = replace_at(doc, path, value, delete and bool(path))
        (d / config).write_text(json.dumps(doc))
        expect_checkpoint_error_or_success(load_model if which == "model" else load_adapter, d)


@FUZZ
@given(data=st.data(), value=json_values, delete=st.booleans())
def test_random_safetensors_header_damage(data, value, delete):
    src = pristine() / "model"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        shutil.copytree(src, d)
        blob = (d / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        path = data.draw(st.sampled_from(list(json_paths(header))), label="field")
        header = replace_at(header, path, value, delete and bool(path))
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
        resign(d)
        expect_checkpoint_error_or_success(load_model, d)
