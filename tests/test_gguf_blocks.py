"""GGUF block codecs, the rope row order and the header reader, against the ``gguf``
package (its numpy dequantizer mirrors ggml's reference) and transformers' GGUF loader."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import qalora
import torch
from qalora import ops
from qalora.formats import gguf_arch, gguf_blocks
from qalora.formats.gguf_file import TensorReader, read_header

gguf = pytest.importorskip("gguf")
import gguf_synthetic  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

TYPES = sorted(gguf_blocks.FORMATS, key=lambda t: gguf_blocks.FORMATS[t].name)


def random_blocks(rng, ggml_type, rows, blocks_per_row):
    """Random block bytes (every code / sub-scale pattern), with finite float16 scale fields."""
    name = gguf_blocks.FORMATS[ggml_type].name
    fmt = gguf_blocks.FORMATS[ggml_type]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, fmt.block_bytes), dtype=np.uint8)
    fields = gguf_synthetic._SCALE_FIELDS[name][0]
    fields = fields + ((2,) if name in ("Q4_1", "Q5_1") else ())
    for at in fields:
        # both signs, magnitudes over many binades, subnormals included
        mag = np.exp(rng.uniform(np.log(1e-7), np.log(2.0), raw.shape[0]))
        v = (mag * rng.choice([-1.0, 1.0], raw.shape[0])).astype(np.float16)
        raw[:, at : at + 2] = v.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def qalora_dequantize(dec, fmt):
    """Dense float32 weight through qalora's own kernels (pack + dequantize)."""
    stored = fmt.bits if fmt.bits in ops.SUPPORTED_BITS else 8
    codes = torch.from_numpy(dec.codes)
    packed = codes if stored == 8 else ops.pack(codes, stored)
    s_dtype, o_dtype = gguf_blocks.storage_dtypes(fmt.ggml_type, dec)
    scales = torch.from_numpy(dec.scales.astype(s_dtype))
    offsets = torch.from_numpy(dec.offsets.astype(o_dtype))
    return ops.dequantize(packed, scales, offsets, stored, fmt.group_size).numpy()


def assert_same_floats(ours, ref):
    """Equal as float32 values; bit patterns may differ only in the sign of a zero."""
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    assert not (differ & (ours != 0)).any()


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: gguf_blocks.FORMATS[t].name)
def test_decode_matches_gguf_dequantize_bit_for_bit(ggml_type):
    fmt = gguf_blocks.FORMATS[ggml_type]
    rng = np.random.default_rng(ggml_type)
    for rows, per_row in ((1, 1), (5, 3), (3, 40)):
        raw = random_blocks(rng, ggml_type, rows, per_row)
        k = per_row * fmt.block_weights
        dec = gguf_blocks.decode_rows(ggml_type, raw, k)
        assert dec.codes.shape == (rows, k) and dec.codes.dtype == np.uint8
        assert dec.scales.shape == dec.offsets.shape == (rows, k // fmt.group_size)
        assert int(dec.codes.max()) < 1 << fmt.bits
        if rows == 3:  # random blocks reach the top code
            assert int(dec.codes.max()) == (1 << fmt.bits) - 1
        ref = gguf_dequantize(raw, gguf.GGMLQuantizationType(ggml_type))
        # numpy float32 in this module, and qalora's Rust dequantize on packed codes:
        assert_same_floats(gguf_blocks.fma_dequantize(dec.codes, dec.scales, dec.offsets, fmt.group_size), ref)
        assert_same_floats(qalora_dequantize(dec, fmt), ref)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: gguf_blocks.FORMATS[t].name)
def test_storage_dtypes_hold_the_parameters_exactly(ggml_type):
    rng = np.random.default_rng(100 + ggml_type)
    raw = random_blocks(rng, ggml_type, 4, 2)
    fmt = gguf_blocks.FORMATS[ggml_type]
    dec = gguf_blocks.decode_rows(ggml_type, raw, 2 * fmt.block_weights)
    s_dtype, o_dtype = gguf_blocks.storage_dtypes(ggml_type, dec)
    assert np.array_equal(dec.scales.astype(s_dtype).astype(np.float32), dec.scales)
    assert np.array_equal(dec.offsets.astype(o_dtype).astype(np.float32), dec.offsets)
    if fmt.name.endswith("_K"):
        # d * sc needs more than float16's 11 bits somewhere in random blocks
        assert not np.array_equal(dec.scales.astype(np.float16).astype(np.float32), dec.scales)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: gguf_blocks.FORMATS[t].name)
def test_kquant_decode_also_gives_the_factored_form_exactly(ggml_type):
    """A K-quant's factored parameters (integers times float16 factors, as QuantLinear.factor_
    holds them) multiply out, in float64, to exactly the decoded float32 values."""
    fmt = gguf_blocks.FORMATS[ggml_type]
    rng = np.random.default_rng(200 + ggml_type)
    dec = gguf_blocks.decode_rows(ggml_type, random_blocks(rng, ggml_type, 3, 4), 4 * fmt.block_weights)
    if not fmt.name.endswith("_K"):
        assert dec.factored is None
        return
    f = dec.factored
    groups, per = dec.scales.shape[1], dec.scales.shape[1] // f.scale_factors.shape[1]
    assert f.scale_factors.dtype == f.offset_factors.dtype == np.float16 and f.scale_ints.shape == (3, groups)
    assert f.scale_ints.dtype == (np.int8 if fmt.name in ("Q3_K", "Q6_K") else np.uint8)
    offset_ints = f.scale_ints if f.offset_ints is None else f.offset_ints
    for ints, factors, want in (
        (f.scale_ints, f.scale_factors, dec.scales),
        (offset_ints, f.offset_factors, dec.offsets),
    ):
        got = np.repeat(factors.astype(np.float64), per, axis=1) * ints.astype(np.float64)
        assert np.array_equal(got, want.astype(np.float64))


def test_implied_minimum_overflowing_float16_leaves_a_tensor_unfactored():
    raw = random_blocks(np.random.default_rng(3), gguf_blocks.Q6_K, 1, 1)
    raw[0, 208:210] = np.array([4000.0], dtype=np.float16).view(np.uint8)  # -32 d overflows float16
    dec = gguf_blocks.decode_rows(gguf_blocks.Q6_K, raw, 256)
    assert dec.factored is None and np.isfinite(dec.offsets).all()


def test_implied_offset_overflowing_float16_gets_float32_offsets():
    raw = np.zeros((1, 18), dtype=np.uint8)
    raw[0, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)  # -8 d = -80000
    dec = gguf_blocks.decode_rows(gguf_blocks.Q4_0, raw, 32)
    assert gguf_blocks.storage_dtypes(gguf_blocks.Q4_0, dec) == (np.float16, np.float32)
    assert dec.offsets[0, 0] == -80000.0


def test_decode_refuses_bad_input():
    with pytest.raises(qalora.FormatError, match="IQ4_NL"):
        gguf_blocks.decode_rows(20, np.zeros((1, 18), np.uint8), 32)
    with pytest.raises(qalora.FormatError, match="Q4_1 row of 64 weights is 40 bytes"):
        gguf_blocks.decode_rows(gguf_blocks.Q4_1, np.zeros((2, 20), np.uint8), 64)
    raw = np.zeros((1, 20), np.uint8)
    raw[0, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    with pytest.raises(qalora.InvalidValueError, match="non-finite"):
        gguf_blocks.decode_rows(gguf_blocks.Q4_1, raw, 32)


@pytest.mark.parametrize(
    "bits,encode,qtype", [(4, gguf_blocks.encode_q4_1, "Q4_1"), (5, gguf_blocks.encode_q5_1, "Q5_1")]
)
def test_encode_offset_blocks_round_trip(bits, encode, qtype):
    rng = np.random.default_rng(bits)
    rows, k = 7, 96
    codes = rng.integers(0, 1 << bits, size=(rows, k), dtype=np.uint8)
    d = rng.standard_normal((rows, k // 32)).astype(np.float16)
    m = rng.standard_normal((rows, k // 32)).astype(np.float16)
    raw = encode(codes, d, m)
    assert raw.shape == (rows, k // 32 * gguf_blocks.FORMATS[getattr(gguf_blocks, qtype)].block_bytes)
    ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[qtype])
    # float64 reference: d*q is exact, + m rounds once to float32
    expect = (codes.astype(np.float64) * np.repeat(d, 32, 1).astype(np.float64) + np.repeat(m, 32, 1)).astype(
        np.float32
    )
    assert_same_floats(ref, expect)
    dec = gguf_blocks.decode_rows(getattr(gguf_blocks, qtype), raw, k)
    assert np.array_equal(dec.codes, codes)
    assert np.array_equal(dec.scales, d.astype(np.float32)) and np.array_equal(dec.offsets, m.astype(np.float32))
    with pytest.raises(qalora.InvalidValueError, match=f"above the {(1 << bits) - 1}"):
        encode(codes | np.uint8(1 << bits), d, m)
    with pytest.raises(qalora.ShapeError):
        encode(codes, d.astype(np.float32), m)


K_TYPES = sorted(gguf_blocks.K_OFFSET_TYPES, key=lambda t: gguf_blocks.FORMATS[t].name)


def random_k_parts(rng, ggml_type, rows, k):
    fmt = gguf_blocks.FORMATS[ggml_type]
    top = gguf_blocks.K_OFFSET_TYPES[ggml_type]
    nb, groups = k // 256, k // fmt.group_size
    codes = rng.integers(0, 1 << fmt.bits, size=(rows, k), dtype=np.uint8)
    d = rng.uniform(1e-4, 3e-3, (rows, nb)).astype(np.float16) * rng.choice([-1, 1], (rows, nb)).astype(np.float16)
    dmin = rng.uniform(1e-4, 3e-3, (rows, nb)).astype(np.float16)
    sc = rng.integers(0, top + 1, (rows, groups), dtype=np.uint8)
    mn = rng.integers(0, top + 1, (rows, groups), dtype=np.uint8)
    return codes, d, sc, dmin, mn


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: gguf_blocks.FORMATS[t].name)
def test_encode_k_blocks_against_gguf_and_float64(ggml_type):
    fmt = gguf_blocks.FORMATS[ggml_type]
    rng = np.random.default_rng(ggml_type)
    rows, k = 5, 768
    codes, d, sc, dmin, mn = random_k_parts(rng, ggml_type, rows, k)
    raw = gguf_blocks.encode_k_blocks(ggml_type, codes, d, sc, dmin, mn)
    assert raw.shape == (rows, k // 256 * fmt.block_bytes)
    per = 256 // fmt.group_size
    # float64 reference: d·sc·q and dmin·mn are exact, the difference rounds once to float32
    scale = np.repeat(d.astype(np.float64), per, 1) * sc
    offset = -np.repeat(dmin.astype(np.float64), per, 1) * mn
    expect = (codes.reshape(rows, -1, fmt.group_size) * scale[:, :, None] + offset[:, :, None]).reshape(rows, k)
    assert_same_floats(gguf_dequantize(raw, gguf.GGMLQuantizationType(ggml_type)), expect.astype(np.float32))
    dec = gguf_blocks.decode_rows(ggml_type, raw, k)
    assert np.array_equal(dec.codes, codes)
    with pytest.raises(qalora.InvalidValueError, match="sub-block"):
        gguf_blocks.encode_k_blocks(ggml_type, codes, d, sc + np.uint8(64), dmin, mn)
    with pytest.raises(qalora.ShapeError, match="multiple of 256"):
        gguf_blocks.encode_k_blocks(ggml_type, codes[:, :200], d, sc, dmin, mn)
    with pytest.raises(qalora.FormatError, match="not a K-quant"):
        gguf_blocks.encode_k_blocks(gguf_blocks.Q6_K, codes, d, sc, dmin, mn)


def brute_force_fit(values, weights, top, reach=4):
    """float64 reference of :func:`gguf_blocks.fit_grid` for one row: every candidate tried
    in a plain loop."""
    best = (np.inf, None, None)
    amax = {1: max(values.max(), 0.0), -1: min(values.min(), 0.0)}
    cands = [0.0] + [float(np.float16(amax[s] / k)) for s in (1, -1) for k in range(max(1, top - reach + 1), top + 1)]
    for f in cands:
        if not np.isfinite(f):
            continue
        q = np.zeros_like(values) if f == 0 else np.clip(np.rint(values / f), 0, top)
        err = float((weights * (np.float32(f) * q.astype(np.float32) - values).astype(np.float64) ** 2).sum())
        if err <= best[0]:
            best = (err, f, q)
    return best


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: gguf_blocks.FORMATS[t].name)
def test_fit_k_quant_is_exact_on_the_grid_and_best_off_it(ggml_type):
    fmt = gguf_blocks.FORMATS[ggml_type]
    top = gguf_blocks.K_OFFSET_TYPES[ggml_type]
    rng = np.random.default_rng(100 + ggml_type)
    rows, k = 6, 512
    codes, d, sc, dmin, mn = random_k_parts(rng, ggml_type, rows, k)
    d = np.abs(d)
    per = 256 // fmt.group_size
    # as ggml's quantizers leave a block: its largest sub-integers are the top value
    sc.reshape(-1, per)[:, 0] = top
    mn.reshape(-1, per)[:, 0] = top
    raw = gguf_blocks.encode_k_blocks(ggml_type, codes, d, sc, dmin, mn)
    dec = gguf_blocks.decode_rows(ggml_type, raw, k)
    fit = gguf_blocks.fit_k_quant(ggml_type, dec.codes, dec.scales, dec.offsets)
    assert np.array_equal(fit.raw, raw)  # on the grid: the same bytes
    assert np.array_equal(fit.scales, dec.scales) and np.array_equal(fit.offsets, dec.offsets)
    # Off the grid: each super-block's offsets are the best of the candidates (float64 loop),
    # and the written file decodes to what the fit says it wrote.
    moved = dec.offsets + rng.normal(0, 0.3, dec.offsets.shape).astype(np.float32) * dec.scales
    fit = gguf_blocks.fit_k_quant(ggml_type, dec.codes, dec.scales, moved)
    assert np.array_equal(fit.scales, dec.scales)  # the scales were on the grid
    theirs = gguf_dequantize(fit.raw, gguf.GGMLQuantizationType(ggml_type)).reshape(rows, k)
    assert_same_floats(theirs, gguf_blocks.fma_dequantize(dec.codes, fit.scales, fit.offsets, fmt.group_size))
    target = -moved.reshape(-1, per).astype(np.float64)
    got = -fit.offsets.reshape(-1, per).astype(np.float64)
    for block in range(target.shape[0]):
        err, _, _ = brute_force_fit(target[block].astype(np.float32), np.ones(per), top)
        assert abs(float(((got[block] - target[block]) ** 2).sum()) - err) <= 1e-9 * max(err, 1e-30) + 1e-18
    # where the targets stay inside the grid's range, every offset is within half a step
    step = fit.offsets.reshape(-1, per).min(axis=1, keepdims=True) / -top
    inside = (target >= 0).all(axis=1)
    assert (np.abs(got - target)[inside] <= step[inside] * 0.5 * (1 + 1e-3) + 1e-12).all()


def test_fit_k_quant_refuses_bad_input():
    codes = np.zeros((2, 256), np.uint8)
    with pytest.raises(qalora.ShapeError, match="one scale/offset per 32"):
        gguf_blocks.fit_k_quant(gguf_blocks.Q4_K, codes, np.ones((2, 4), np.float32), np.ones((2, 8), np.float32))
    with pytest.raises(qalora.FormatError, match="not a K-quant"):
        gguf_blocks.fit_k_quant(gguf_blocks.Q3_K, codes, np.ones((2, 16), np.float32), np.ones((2, 16), np.float32))


def test_encode_dense_types():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    q8 = gguf_blocks.encode_dense(w, gguf_blocks.Q8_0)
    assert q8.shape == (5, 2 * 34)
    back = gguf_dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(back - w).max() <= np.abs(w).max() / 127  # half a step of the largest block
    f16 = gguf_blocks.encode_dense(w, gguf_blocks.F16)
    assert np.array_equal(f16.view(np.float16), w.astype(np.float16))
    with pytest.raises(qalora.FormatError):
        gguf_blocks.encode_dense(w, gguf_blocks.Q4_K)


def test_bf16_and_f16_decode():
    rng = np.random.default_rng(8)
    w = rng.standard_normal(64).astype(np.float32)
    bf = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    assert np.array_equal(
        gguf_blocks.decode_dense(gguf_blocks.BF16, bf), gguf_dequantize(bf, gguf.GGMLQuantizationType.BF16).reshape(-1)
    )
    h = w.astype(np.float16).view(np.uint8)
    assert np.array_equal(gguf_blocks.decode_dense(gguf_blocks.F16, h), w.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------- rope row order


def converter_permute(w, n_head):
    """llama.cpp's HF -> GGUF reordering, written from its description: per head, split the
    rows into the two rope halves and interleave them."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("rows,n_head", [(576, 9), (192, 3), (64, 1), (4096, 32), (24, 6)])
def test_rope_order_matches_the_converter_and_transformers(rows, n_head):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(rows).standard_normal((rows, 3))
    order = gguf_arch.rope_order(rows, n_head)
    assert np.array_equal(w[order], converter_permute(w, n_head))
    inverse = gguf_arch.rope_order_inverse(rows, n_head)
    assert np.array_equal(w[order][inverse], w)
    undone = LlamaTensorProcessor()._reverse_permute_weights(w[order], n_head)  # transformers' own reader
    assert np.array_equal(undone, w)


def test_rope_order_refuses_odd_heads():
    with pytest.raises(qalora.FormatError):
        gguf_arch.rope_order(10, 4)


def test_tensor_names_map_both_ways():
    for name in (
        "blk.3.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.11.attn_k.bias",
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "blk.2.ffn_norm.weight",
    ):
        assert gguf_arch.gguf_name(gguf_arch.hf_name(name)) == name
    assert gguf_arch.hf_name("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert gguf_arch.hf_name("blk.0.ssm_conv.weight") is None
    with pytest.raises(qalora.FormatError, match="'falcon' is not supported"):
        gguf_arch.architecture("falcon", "x.gguf")


# --------------------------------------------------------------------------- header reader


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    spec = gguf_synthetic.SyntheticSpec(
        hidden=256, layers=1, ffn=512, vocab=300, tied=False, types=gguf_synthetic.EVERY_TYPE
    )
    gguf_synthetic.write_synthetic_gguf(path, spec)
    return path


def test_header_matches_gguf_reader(mixed_file):
    header = read_header(mixed_file)
    reader = gguf.GGUFReader(mixed_file)
    assert set(header.tensors) == {t.name for t in reader.tensors}
    with TensorReader(mixed_file) as tr:
        for t in reader.tensors:
            e = header.tensors[t.name]
            assert (e.offset, e.nbytes, e.shape) == (t.data_offset, t.n_bytes, tuple(int(x) for x in t.shape))
            assert np.array_equal(tr.raw(e), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert header.get(key) == pytest.approx(field.contents()), key


def test_header_refuses_malformed_files(tmp_path, mixed_file):
    data = mixed_file.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(qalora.FormatError, match="not a GGUF file"):
        read_header(bad)
    bad.write_bytes(data[:4] + struct.pack("<I", 1) + data[8:])
    with pytest.raises(qalora.FormatError, match="version 1"):
        read_header(bad)
    bad.write_bytes(data[:2000])
    with pytest.raises(qalora.FormatError, match=r"truncated|past the end"):
        read_header(bad)
    bad.write_bytes(data[: len(data) - 100])  # the last tensor's data is cut
    with pytest.raises(qalora.FormatError, match="runs past the end of the file"):
        read_header(bad)
    with pytest.raises(qalora.FormatError, match="cannot open"):
        read_header(tmp_path / "missing.gguf")
