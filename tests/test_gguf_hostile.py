"""GGUF files as hostile input: a valid tiny llama file mutated one hostile value at a time
(head counts, sizes of the wrong type or of 2^26 to 2^40, block counts up to 2^32 - 1, two
million empty strings, a (0, 2^40) tensor, NaN / Inf weights, epsilon and rope base out of
range, tensor byte ranges that do not match their types or overlap, bad token ids and
merges), then truncated and byte-flipped at seeded random places. Every file must be
refused with a typed qalora error naming the file and the field, or load into a model that
computes finite logits; never an untyped error, a crash or a hang.

The fuzz run loads the files in worker processes (tests/gguf_mutants.py) under an
address-space limit and a per-case alarm; the regression tests below load them in process.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import selectors
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import qalora
import torch
from qalora.formats import gguf_validate
from qalora.formats.gguf_file import read_header

pytest.importorskip("transformers")
pytest.importorskip("gguf")
import gguf_mutants as gm
import gguf_synthetic as syn

HERE = os.path.dirname(os.path.abspath(__file__))
A = "llama"
#: Seconds a case may take in the fuzz run before it counts as a hang.
PER_CASE_S = 60.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "base.gguf"
    syn.write_synthetic_gguf(path, syn.SyntheticSpec(**gm.BASE_SPEC), seed=1)
    return path


@pytest.fixture(scope="module")
def parsed(base):
    return gm.parse(base)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private config cache (what the loads below leave in it is checked)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("QALORA_CACHE", str(root))
    return root


def variant(parsed, tmp_path, name, edit) -> str:
    p = copy.deepcopy(parsed)
    edit(p)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(gm.serialize(p))
    return str(path)


def refused(path, *fragments, error=qalora.FormatError, **kw) -> str:
    with pytest.raises(error) as info:
        qalora.load_gguf(path, show_progress=False, **kw)
    message = str(info.value)
    assert str(path) in message, message  # names the file
    for fragment in fragments:
        assert fragment in message, message
    return message


def entries(cache_root) -> list[str]:
    meta = cache_root / "gguf-meta"
    return sorted(os.listdir(meta)) if meta.is_dir() else []


def max_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


# --------------------------------------------------------------------------- one test per finding


def test_round_trip_of_the_mutation_writer(base, parsed):
    assert gm.serialize(parsed) == base.read_bytes()


def test_head_counts_and_rope_dimension(parsed, tmp_path, cache):
    cases = {
        "heads0": (
            (f"{A}.attention.head_count", gm.UINT32, 0),
            "head_count = 0 is outside the allowed range [1, 4096]",
        ),
        "heads3": ((f"{A}.attention.head_count", gm.UINT32, 3), "head_count = 3 does not divide"),
        "kv0": (
            (f"{A}.attention.head_count_kv", gm.UINT32, 0),
            "head_count_kv = 0 is outside the allowed range [1, 4]",
        ),
        "kv3": ((f"{A}.attention.head_count_kv", gm.UINT32, 3), "head_count_kv = 3 does not divide"),
        "rope0": ((f"{A}.rope.dimension_count", gm.UINT32, 0), "rope.dimension_count = 0 is outside"),
        "rope_odd": ((f"{A}.rope.dimension_count", gm.UINT32, 15), "rope.dimension_count = 15 must equal"),
        "rope_short": ((f"{A}.rope.dimension_count", gm.UINT32, 8), "head dimension 16"),
        "key_length": ((f"{A}.attention.key_length", gm.UINT32, 32), "key_length = 32"),
    }
    for name, (setting, fragment) in cases.items():
        refused(variant(parsed, tmp_path, name, lambda p, s=setting: p.set(*s)), fragment)
    assert entries(cache) == []


def test_sizes_of_the_wrong_type(parsed, tmp_path, cache):
    cases = {
        "hidden_str": (f"{A}.embedding_length", gm.STRING, "64"),
        "blocks_float": (f"{A}.block_count", gm.FLOAT32, 2.0),
        "ffn_str": (f"{A}.feed_forward_length", gm.STRING, "128"),
        "heads_bool": (f"{A}.attention.head_count", gm.BOOL, True),
        "context_f64": (f"{A}.context_length", gm.FLOAT64, 256.0),
    }
    for name, (key, vtype, value) in cases.items():
        refused(variant(parsed, tmp_path, name, lambda p, k=key, t=vtype, v=value: p.set(k, t, v)), key, "integer in [")
    heads = variant(parsed, tmp_path, "heads_arr", lambda p: p.set(f"{A}.attention.head_count", gm.ARRAY, [4, 4], 4))
    refused(heads, "is an array of uint32", "must be an integer")
    refused(
        variant(parsed, tmp_path, "eps_str", lambda p: p.set(f"{A}.attention.layer_norm_rms_epsilon", 8, "1")), "float"
    )
    assert entries(cache) == []


def test_huge_sizes_are_refused_before_anything_is_allocated(parsed, tmp_path, cache):
    before = max_rss_mb()
    for key in ("embedding_length", "feed_forward_length", "vocab_size", "context_length", "attention.head_count"):
        for bits in (26, 32, 40):
            value = (1 << bits) + 1
            path = variant(parsed, tmp_path, f"{key}{bits}", lambda p, k=key, v=value: p.set(f"{A}.{k}", gm.UINT64, v))
            refused(path, f"{A}.{key} = {value} is outside the allowed range")
    assert max_rss_mb() - before < 64


def test_huge_block_counts_are_refused_at_once(parsed, tmp_path, cache):
    for n in (4000, 20000, 10**9, 2**32 - 1):
        refused(
            variant(parsed, tmp_path, f"b{n}", lambda p, n=n: p.set(f"{A}.block_count", gm.UINT32, n)),
            f"{n} is outside",
        )
    # within range, but the blocks are not in the file: the first missing tensor is named
    three = variant(parsed, tmp_path, "b3", lambda p: p.set(f"{A}.block_count", gm.UINT32, 3))
    refused(three, "'blk.2.attn_norm.weight' and 8 more is missing", "block_count = 3 implies blocks 0 to 2")


def test_two_million_empty_strings_stay_bounded(parsed, tmp_path, cache):
    many = gm.Raw(struct.pack("<IQ", gm.STRING, 2_000_000) + b"\0" * 16_000_000)
    before = max_rss_mb()
    junk = variant(parsed, tmp_path, "junk", lambda p: p.set("general.junk", gm.ARRAY, many))
    refused(junk, "'general.junk' has 2000000 array elements; at most 65536")
    tokens = variant(parsed, tmp_path, "tokens", lambda p: p.set("tokenizer.ggml.tokens", gm.ARRAY, many))
    refused(tokens, "2000000 tokens but token_embd.weight has 272 rows")
    lies = variant(
        parsed, tmp_path, "lies", lambda p: p.set("general.x", gm.ARRAY, gm.Raw(struct.pack("<IQ", 4, 1 << 60)))
    )
    refused(lies, "claims 1152921504606846976 array elements", "past the end of the file")
    assert max_rss_mb() - before < 200  # the 16 MB file's strings, not gigabytes of objects


def test_empty_tensor_with_a_huge_dimension(parsed, tmp_path, cache):
    for shape in ((0, 1 << 40), (1 << 40, 0)):
        path = variant(parsed, tmp_path, "dims", lambda p, s=shape: p.tensor("blk.0.attn_q.weight").__setitem__(1, s))
        refused(path, "'blk.0.attn_q.weight'", "every dimension must be at least 1")


def test_nonfinite_dense_tensors(parsed, tmp_path, cache):
    cases = {
        "norm_nan": ("blk.0.attn_norm.weight", np.float32, 5, np.nan, "(F32)"),
        "norm_inf": ("output_norm.weight", np.float32, 0, np.inf, "(F32)"),
        "embd_nan": ("token_embd.weight", np.float16, 1000, np.nan, "(F16)"),
        "embd_inf": ("token_embd.weight", np.float16, 7, -np.inf, "(F16)"),
        "bf16_nan": ("blk.1.attn_output.weight", np.uint16, 77, np.uint16(0x7FC0), "(BF16)"),
    }
    for name, (tensor, dtype, index, value, kind) in cases.items():
        path = variant(parsed, tmp_path, name, lambda p, a=(tensor, dtype, index, value): gm._poke(p, *a))
        refused(path, f"tensor {tensor!r} {kind} holds a non-finite value", "allow_nonfinite=True")
    # on request they load (and give what they hold)
    model = qalora.load_gguf(str(tmp_path / "norm_nan.gguf"), allow_nonfinite=True).model
    assert torch.isnan(model.model.layers[0].input_layernorm.weight[5])
    # a float32 value that overflows the float16 the model is loaded in
    big = variant(parsed, tmp_path, "big", lambda p: gm._poke(p, "output_norm.weight", np.float32, 3, 1e6))
    refused(big, "output_norm.weight", "(inf as float16)", dtype=torch.float16)
    qalora.load_gguf(big)  # float32 holds it
    assert [e.rsplit("-", 1)[0] for e in entries(cache)] == ["big", "norm_nan"]  # the refusals left nothing


def test_epsilon_and_rope_base_ranges(parsed, tmp_path, cache):
    for key, bounds in (("attention.layer_norm_rms_epsilon", "(0, 1)"), ("rope.freq_base", "(1, 1e+12)")):
        for value in (float("nan"), 0.0, -1.0, float("inf")):
            path = variant(parsed, tmp_path, "x", lambda p, k=key, v=value: p.set(f"{A}.{k}", gm.FLOAT32, v))
            refused(path, f"{A}.{key} = {value!r} is outside the allowed range {bounds}")
    nan_factor = variant(parsed, tmp_path, "f", lambda p: p.set(f"{A}.rope.scaling.factor", gm.FLOAT32, float("nan")))
    refused(nan_factor, "rope.scaling.factor = nan")
    refused(variant(parsed, tmp_path, "t", lambda p: p.set(f"{A}.rope.scaling.type", gm.STRING, "warp")), "'warp'")


def test_tensor_ranges_must_match_types_and_not_overlap(parsed, tmp_path, cache):
    smaller = variant(parsed, tmp_path, "smaller", lambda p: p.tensor("blk.0.ffn_down.weight").__setitem__(2, gm.Q4_0))
    refused(smaller, "'blk.0.ffn_down.weight' is declared 4608 bytes", "is 8704 bytes", "only padding")
    larger = variant(parsed, tmp_path, "larger", lambda p: p.tensor("blk.0.attn_q.weight").__setitem__(2, gm.Q8_0))
    refused(larger, "'blk.0.attn_q.weight'", "overlaps tensor 'blk.0.attn_k.weight'")
    norm = variant(parsed, tmp_path, "norm", lambda p: p.tensor("blk.1.ffn_norm.weight").__setitem__(2, gm.F16))
    refused(norm, "'blk.1.ffn_norm.weight' is declared 128 bytes")

    def overlap(p):
        p.tensor("blk.1.ffn_up.weight")[3] = p.tensor("blk.1.ffn_gate.weight")[3]

    refused(variant(parsed, tmp_path, "overlap", overlap), "overlaps tensor")

    def misalign(p):
        p.tensor("blk.1.ffn_up.weight")[3] += 4

    refused(variant(parsed, tmp_path, "misalign", misalign), "not a multiple of the alignment 32")
    assert entries(cache) == []


def test_tokenizer_metadata(parsed, tmp_path, cache):
    n = len(parsed.meta("tokenizer.ggml.tokens")[2])
    cases = {
        "bos": (lambda p: p.set("tokenizer.ggml.bos_token_id", gm.UINT32, 10**6), "bos_token_id = 1000000"),
        "eos": (lambda p: p.set("tokenizer.ggml.eos_token_id", gm.UINT32, n), f"integer in [0, {n - 1}]"),
        "pad": (lambda p: p.set("tokenizer.ggml.padding_token_id", gm.INT32, -1), "padding_token_id = -1"),
        "unk": (lambda p: p.set("tokenizer.ggml.unknown_token_id", gm.STRING, "0"), "unknown_token_id = '0'"),
        "types": (lambda p: p.meta("tokenizer.ggml.token_type")[2].pop(), f"{n - 1} entries for {n} tokens"),
        "type9": (lambda p: p.meta("tokenizer.ggml.token_type")[2].__setitem__(4, 9), "token_type[4] = 9"),
        "scores": (lambda p: p.set("tokenizer.ggml.scores", gm.ARRAY, [0.0] * 3, gm.FLOAT32), "scores has 3"),
        "merges": (
            lambda p: p.set("tokenizer.ggml.merges", gm.ARRAY, [1], gm.UINT32),
            "must be of type array of string",
        ),
        "three": (lambda p: p.meta("tokenizer.ggml.merges")[2].__setitem__(0, "a b c"), "merges[0] = 'a b c'"),
        "oov": (lambda p: p.meta("tokenizer.ggml.merges")[2].__setitem__(1, "\u4e00 b"), "not in the vocabulary"),
        "tokens": (lambda p: p.meta("tokenizer.ggml.tokens")[2].pop(), f"{n - 1} tokens but token_embd.weight"),
        "model": (lambda p: p.set("tokenizer.ggml.model", gm.STRING, "bert"), "tokenizer.ggml.model = 'bert'"),
        "none": (lambda p: p.drop("tokenizer.ggml.merges"), "neither tokenizer.ggml.merges nor"),
        "template": (lambda p: p.set("tokenizer.chat_template", gm.UINT32, 1), "chat_template = 1"),
    }
    for name, (edit, fragment) in cases.items():
        refused(variant(parsed, tmp_path, name, edit), fragment)
    assert entries(cache) == []


def test_unknown_missing_and_misshapen_tensors(parsed, tmp_path, cache):
    unknown = variant(
        parsed, tmp_path, "u", lambda p: p.tensor("blk.0.ffn_up.weight").__setitem__(0, "blk.0.ffn_upx.weight")
    )
    refused(unknown, "'blk.0.ffn_upx.weight' has no place in a llama model")
    extra = variant(
        parsed, tmp_path, "e", lambda p: p.tensor("blk.1.ffn_up.weight").__setitem__(0, "blk.7.ffn_up.weight")
    )
    refused(extra, "'blk.7.ffn_up.weight' belongs to block 7")
    shape = variant(parsed, tmp_path, "s", lambda p: p.tensor("blk.0.attn_norm.weight").__setitem__(1, (32, 2)))
    refused(shape, "has shape (32, 2) (ne0 first); the metadata implies (64,)")
    qwen = tmp_path / "qwen.gguf"
    syn.write_synthetic_gguf(qwen, syn.SyntheticSpec(**{**gm.BASE_SPEC, "arch": "qwen2", "types": {"default": "Q8_0"}}))
    no_bias = variant(gm.parse(qwen), tmp_path, "qwen_no_bias", lambda p: gm.remove_tensor(p, "blk.1.attn_k.bias"))
    refused(no_bias, "'blk.1.attn_k.bias' is missing")
    no_norm = variant(parsed, tmp_path, "no_norm", lambda p: gm.remove_tensor(p, "output_norm.weight"))
    refused(no_norm, "'output_norm.weight' is missing")


def test_memory_the_model_needs_is_compared_with_what_the_machine_has(base, monkeypatch, cache):
    header = read_header(base)
    need = gguf_validate.memory_needed(header, 4)
    assert 0 < need < 2 << 20
    assert gguf_validate.memory_needed(header, 2) < need
    monkeypatch.setattr(gguf_validate, "available_memory", lambda: 100 << 20)
    message = refused(str(base), "needs about", "GiB of memory", "GiB available", error=qalora.ModelLoadError)
    assert "0.10 GiB available" in message
    monkeypatch.undo()
    have = gguf_validate.available_memory()
    assert have is None or have > 0


def test_replaced_file_gets_its_own_config(parsed, tmp_path, cache):
    """Same path, size and time stamp, another header: the cache key is the header's hash."""
    path = tmp_path / "model.gguf"
    path.write_bytes(gm.serialize(parsed))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    first = qalora.load_gguf(path)
    assert first.model.config.rms_norm_eps == pytest.approx(1e-5) and not first.from_cache
    other = copy.deepcopy(parsed)
    other.set(f"{A}.attention.layer_norm_rms_epsilon", gm.FLOAT32, 1e-6)
    blob = gm.serialize(other)
    assert len(blob) == path.stat().st_size
    path.write_bytes(blob)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    second = qalora.load_gguf(path)
    assert second.model.config.rms_norm_eps == pytest.approx(1e-6) and not second.from_cache
    assert qalora.load_gguf(path).from_cache
    assert len(entries(cache)) == 2


def test_refused_files_leave_no_cache_entry(parsed, tmp_path, cache):
    # refused after transformers parsed the header (the tensors are read last)
    nan = variant(parsed, tmp_path, "nan", lambda p: gm._poke(p, "blk.0.attn_norm.weight", np.float32, 0, np.nan))
    refused(nan, "non-finite")
    assert entries(cache) == []
    refused(variant(parsed, tmp_path, "eps", lambda p: p.set(f"{A}.rope.freq_base", gm.FLOAT32, 0.0)), "freq_base")
    assert entries(cache) == []
    qalora.load_gguf(variant(parsed, tmp_path, "good", lambda p: None))
    assert len(entries(cache)) == 1 and not any(e.startswith(".") for e in entries(cache))


def test_real_files_pass_the_checks_quickly():
    try:
        from qalora.loaders import bundled_gguf_path

        path = bundled_gguf_path()
    except Exception:
        pytest.skip("the bundled SmolLM2 GGUF is not installed")
    shape = gguf_validate.validate(read_header(path))
    assert (shape.n_layers, shape.hidden, shape.n_head, shape.n_head_kv, shape.n_vocab) == (30, 576, 9, 3, 49152)


# --------------------------------------------------------------------------- the fuzz run


def _run_worker(cases: list[dict], env: dict, per_case: float) -> tuple[list[dict], int | None, bool]:
    """Runs one worker over ``cases``; returns its records, its exit status (None if it was
    killed) and whether it stalled (no record within the per-case limit)."""
    spec = os.path.join(os.path.dirname(cases[0]["path"]), f"cases-{cases[0]['name']}.json")
    with open(spec, "w") as f:
        json.dump(cases, f)
    cmd = [sys.executable, os.path.join(HERE, "gguf_mutants.py"), spec, str(per_case)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    records: list[dict] = []
    stalled = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = False
        while True:
            # the worker's imports (torch, transformers) get longer than a case
            if not sel.select(timeout=per_case + (20 if ready else 180)):
                stalled = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            record = json.loads(line)
            if record.get("ready"):
                ready = True
            else:
                records.append(record)
    rc = proc.wait()
    proc.stdout.close()
    return records, (None if stalled else rc), stalled


def run_cases(cases: list[gm.Case], directory, per_case: float = PER_CASE_S) -> dict[str, dict]:
    """Each case's record; a case the worker died or stalled on is recorded as a crash or a
    hang and the worker restarted after it."""
    env = {**os.environ, "QALORA_CACHE": str(directory / "cache"), "PYTHONPATH": HERE}
    todo = []
    for c in cases:
        path = directory / f"{c.name}.gguf"
        path.write_bytes(c.blob)
        todo.append({"name": c.name, "path": str(path)})
    results: dict[str, dict] = {}
    while todo:
        records, rc, stalled = _run_worker(todo, env, per_case)
        for r in records:
            results[r["case"]] = r
        todo = [c for c in todo if c["name"] not in results]
        if todo:
            culprit = todo.pop(0)
            results[culprit["name"]] = {"case": culprit["name"], "outcome": "hang" if stalled else "crash", "rc": rc}
    return results


def judge(case: gm.Case, record: dict) -> str:
    """'typed', 'loaded' or what went wrong."""
    outcome = record["outcome"]
    if outcome in ("untyped", "crash", "hang", "bad_load"):
        return outcome
    if case.expect == "loads" and outcome != "loaded":
        return "refused a good file"
    if case.expect == "refused":
        if outcome != "typed":
            return "loaded a hostile file"
        if case.fragment not in record["message"]:
            return "refused for another reason"
    if outcome == "typed" and case.name not in record["message"] and ".gguf" not in record["message"]:
        return "refusal does not name the file"
    return outcome


def test_fuzz_every_mutant_is_refused_by_name_or_loads_correctly(base, parsed, tmp_path, report_counts):
    blob = base.read_bytes()
    cases = (
        gm.catalogue(parsed)
        + gm.random_cases(blob, seed=2024, n_truncate=20, n_flip=40)
        + gm.random_values(parsed, seed=7, n=40)
    )
    risky = [c for c in cases if c.alone]
    rest = [c for c in cases if not c.alone]
    results = run_cases(rest, tmp_path) | run_cases(risky, tmp_path)  # the risky ones in a worker of their own
    verdicts = {c.name: judge(c, results[c.name]) for c in cases}
    counts = Counter(verdicts.values())
    slowest = max(results.values(), key=lambda r: r.get("seconds", 0))
    designed = sum(1 for c in cases if c.expect != "either")
    report_counts(
        f"GGUF fuzz: {len(cases)} cases ({designed} designed, {len(cases) - designed} random), "
        f"{counts['typed']} typed errors, {counts['loaded']} correct loads; "
        f"other: {dict((k, v) for k, v in counts.items() if k not in ('typed', 'loaded')) or 'none'}; "
        f"slowest case {slowest['case']} {slowest.get('seconds', '?')} s, "
        f"peak RSS {max(r.get('max_rss_mb', 0) for r in results.values())} MB"
    )
    errors = Counter(r.get("error") for r in results.values() if r["outcome"] == "typed")
    fallback = [r["case"] for r in results.values() if "transformers could not read" in r.get("message", "")]
    report_counts(
        f"GGUF fuzz: typed errors by class: {dict(errors)}; caught only as transformers failed: {len(fallback)}"
    )
    bad = {name: (verdict, results[name]) for name, verdict in verdicts.items() if verdict not in ("typed", "loaded")}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    assert counts["typed"] + counts["loaded"] == len(cases)
    assert not [name for name in fallback if name in {c.name for c in cases if c.expect != "either"}]
