"""GGUF weight blocks <-> qalora's offset form ``w = scale * code + offset`` per group.

Every GGUF weight type read here stores, per group of 16 or 32 weights along a row, a float
scale and a float (or implied) minimum, and small unsigned integers. Decoding gives

* ``codes``: uint8 (rows, K), unsigned, ``bits`` wide;
* ``scales``, ``offsets``: (rows, K / group_size);

such that float32 ``fma(scale, code, offset)`` reproduces ggml's reference dequantization
(``gguf.quants.dequantize``) exactly. Why one rounding suffices: ggml computes
``d * (q - z)`` (symmetric types) or ``d·sc * q - dmin·mn`` (K-quants), and every product
involved is exact in float32 (an 11-bit float16 mantissa times sub-scales of at most 8 bits
times codes of at most 6 bits), so both sides are the one rounding of the same real number.
The only bit patterns that can differ are signed zeros (ggml's ``d * 0`` with d < 0 is -0.0,
the offset form's exact cancellation is +0.0); they compare equal.

| type | group | bits | scale | offset | parameters stored as |
| --- | --- | --- | --- | --- | --- |
| Q4_0 | 32 | 4 | d | -8 d | float16 (exact) |
| Q4_1 | 32 | 4 | d | m | float16 (exact) |
| Q5_0 | 32 | 5 | d | -16 d | float16 (exact) |
| Q5_1 | 32 | 5 | d | m | float16 (exact) |
| Q8_0 | 32 | 8 | d | -128 d | float16 (exact) |
| Q2_K | 16 | 2 | d·sc | -dmin·mn | float32 |
| Q3_K | 16 | 3 | d·(sc-32) | -4 scale | float32 |
| Q4_K | 32 | 4 | d·sc | -dmin·mn | float32 |
| Q5_K | 32 | 5 | d·sc | -dmin·mn | float32 |
| Q6_K | 16 | 6 | d·sc | -32 scale | float32 |

(The symmetric types' implied offsets -8d, -16d, -128d are exact in float16 unless they
overflow it; such a tensor gets float32 offsets.) K-quant products d·sc need up to 19
significant bits, so float16 would round them.

Writing goes the other way for the two types that hold an offset form exactly: Q4_1 and
Q5_1 (float16 d and m per block of 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, InvalidValueError, ShapeError

# ggml type numbers (the file format's).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
BF16 = 30


@dataclass(frozen=True)
class BlockFormat:
    """How one GGUF weight type maps onto the offset form."""

    name: str
    ggml_type: int
    block_weights: int  # weights per block along the row
    block_bytes: int
    bits: int  # width of the unsigned codes
    group_size: int  # weights per (scale, offset) pair
    param_dtype: type  # numpy dtype that holds every scale exactly

    @property
    def bits_per_weight(self) -> float:
        """GGUF's own storage cost."""
        return 8 * self.block_bytes / self.block_weights


_f16, _f32 = np.float16, np.float32
FORMATS: dict[int, BlockFormat] = {
    f.ggml_type: f
    for f in (
        BlockFormat("Q4_0", Q4_0, 32, 18, 4, 32, _f16),
        BlockFormat("Q4_1", Q4_1, 32, 20, 4, 32, _f16),
        BlockFormat("Q5_0", Q5_0, 32, 22, 5, 32, _f16),
        BlockFormat("Q5_1", Q5_1, 32, 24, 5, 32, _f16),
        BlockFormat("Q8_0", Q8_0, 32, 34, 8, 32, _f16),
        BlockFormat("Q2_K", Q2_K, 256, 84, 2, 16, _f32),
        BlockFormat("Q3_K", Q3_K, 256, 110, 3, 16, _f32),
        BlockFormat("Q4_K", Q4_K, 256, 144, 4, 32, _f32),
        BlockFormat("Q5_K", Q5_K, 256, 176, 5, 32, _f32),
        BlockFormat("Q6_K", Q6_K, 256, 210, 6, 16, _f32),
    )
}
DENSE_TYPES = {F32: "F32", F16: "F16", BF16: "BF16"}


def type_name(ggml_type: int) -> str:
    if ggml_type in FORMATS:
        return FORMATS[ggml_type].name
    if ggml_type in DENSE_TYPES:
        return DENSE_TYPES[ggml_type]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def supported_types() -> str:
    return ", ".join([f.name for f in FORMATS.values()] + list(DENSE_TYPES.values()))


def format_of(ggml_type: int, what: str = "tensor") -> BlockFormat:
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        raise FormatError(
            f"{what}: GGUF type {type_name(ggml_type)} cannot be read into the offset form; supported: {supported_types()}"
        )
    return fmt


# --------------------------------------------------------------------------- decoding helpers


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte ``at`` of each block, as a (blocks, 1) float16 array."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16)


def _nibbles_split16(qs: np.ndarray) -> np.ndarray:
    """Legacy 32-weight blocks: byte j holds weight j (low nibble) and weight j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits_le32(raw4: np.ndarray) -> np.ndarray:
    """(blocks, 4) bytes read as a little-endian 32-bit mask -> (blocks, 32) bits, bit j first."""
    return np.unpackbits(raw4, axis=1, bitorder="little")


def _planes(data: np.ndarray, shifts, width: int) -> np.ndarray:
    """(blocks, c, ...) bytes -> (blocks, c, len(shifts), ...): (byte >> s) & mask per shift."""
    mask = (1 << width) - 1
    return np.stack([(data >> s) & mask for s in shifts], axis=2)


def _two_bit_low(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K low bits: 64 bytes = 2 halves of 32; in half h, bits 2i..2i+1 of byte l
    are weight 128 h + 32 i + l."""
    return _planes(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 2).reshape(-1, 256)


def _high_bit_planes(h: np.ndarray) -> np.ndarray:
    """Q3_K / Q5_K high bits: 32 bytes; bit b of byte l belongs to weight 32 b + l."""
    return _planes(h.reshape(-1, 1, 32), range(8), 1).reshape(-1, 256)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: eight 6-bit (scale, min) pairs in 12 bytes. Pairs 0-3 are the low 6 bits
    of bytes 0-3 (scales) and 4-7 (mins); pairs 4-7 take their low 4 bits from bytes 8-11
    (low nibble: scale, high nibble: min) and their top 2 bits from the top 2 bits of
    bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _q3k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales in 12 bytes (biased by 32), as int8 without the bias. Scale
    i < 8 takes its low 4 bits from the low nibble of byte i, scale i + 8 from the high
    nibble of byte i; scale 4 j + i takes its top 2 bits from bits 2 j..2 j+1 of byte 8 + i."""
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)
    high = _planes(packed[:, 8:12].reshape(-1, 1, 4), (0, 2, 4, 6), 2).reshape(-1, 16)
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


# --------------------------------------------------------------------------- decoders per type
# Each takes (blocks, block_bytes) uint8 and returns codes (blocks, block_weights) uint8 and
# per-group scales / offsets (blocks, block_weights / group_size) in float32; a K-quant's
# also returns them factored as the block stores them (see FactoredParams), per block.


def _dec_q4_0(b):
    d = _half(b, 0).astype(np.float32)
    return _nibbles_split16(b[:, 2:18]), d, -8 * d


def _dec_q4_1(b):
    return _nibbles_split16(b[:, 4:20]), _half(b, 0).astype(np.float32), _half(b, 2).astype(np.float32)


def _dec_q5_0(b):
    d = _half(b, 0).astype(np.float32)
    return _nibbles_split16(b[:, 6:22]) | (_bits_le32(b[:, 2:6]) << 4), d, -16 * d


def _dec_q5_1(b):
    codes = _nibbles_split16(b[:, 8:24]) | (_bits_le32(b[:, 4:8]) << 4)
    return codes, _half(b, 0).astype(np.float32), _half(b, 2).astype(np.float32)


def _dec_q8_0(b):
    d = _half(b, 0).astype(np.float32)
    return b[:, 2:34] ^ np.uint8(0x80), d, -128 * d


def _times(d16: np.ndarray, ints: np.ndarray) -> np.ndarray:
    """float32(d) · ints: exact (11 × 8 significant bits)."""
    return d16.astype(np.float32) * ints.astype(np.float32)


def _dec_q2_k(b):
    sub, d, dmin = b[:, 0:16], _half(b, 80), _half(b, 82)
    sc, mn = sub & 0x0F, sub >> 4
    return _two_bit_low(b[:, 16:80]), _times(d, sc), _times(-dmin, mn), (sc, d, mn, -dmin)


def _dec_q3_k(b):
    codes = _two_bit_low(b[:, 32:96]) | (_high_bit_planes(b[:, 0:32]) << 2)
    d, sc = _half(b, 108), _q3k_scales(b[:, 96:108])
    scale = _times(d, sc)
    with np.errstate(over="ignore"):  # an overflow leaves the tensor unfactored (decode_rows)
        implied = np.float16(-4) * d
    return codes, scale, -4 * scale, (sc, d, None, implied)


def _q4k_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K low nibbles: 128 bytes in 4 chunks of 32; byte l of chunk c holds weight
    64 c + l (low nibble) and 64 c + 32 + l (high nibble)."""
    return _planes(qs.reshape(-1, 4, 32), (0, 4), 4).reshape(-1, 256)


def _dec_q4_k(b):
    d, dmin = _half(b, 0), _half(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    return _q4k_low(b[:, 16:144]), _times(d, sc), _times(-dmin, mn), (sc, d, mn, -dmin)


def _dec_q5_k(b):
    d, dmin = _half(b, 0), _half(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    codes = _q4k_low(b[:, 48:176]) | (_high_bit_planes(b[:, 16:48]) << 4)
    return codes, _times(d, sc), _times(-dmin, mn), (sc, d, mn, -dmin)


def _dec_q6_k(b):
    # Low nibbles: 128 bytes = 2 halves x 2 runs of 32; nibble t of byte l in run a of half
    # h is weight 128 h + 64 t + 32 a + l. High 2 bits: 64 bytes = 2 halves of 32; bits
    # 2 s..2 s+1 of byte l of half h belong to weight 128 h + 32 s + l.
    low = _planes(b[:, 0:128].reshape(-1, 2, 1, 2, 32), (0, 4), 4)  # (blk, h, t, 1, a, l)
    low = low.reshape(-1, 256)
    high = _planes(b[:, 128:192].reshape(-1, 2, 32), (0, 2, 4, 6), 2).reshape(-1, 256)
    d, sc = _half(b, 208), np.ascontiguousarray(b[:, 192:208]).view(np.int8)
    scale = _times(d, sc)
    with np.errstate(over="ignore"):  # an overflow leaves the tensor unfactored (decode_rows)
        implied = np.float16(-32) * d
    return low | (high << 4), scale, -32 * scale, (sc, d, None, implied)


_DECODERS = {
    Q4_0: _dec_q4_0,
    Q4_1: _dec_q4_1,
    Q5_0: _dec_q5_0,
    Q5_1: _dec_q5_1,
    Q8_0: _dec_q8_0,
    Q2_K: _dec_q2_k,
    Q3_K: _dec_q3_k,
    Q4_K: _dec_q4_k,
    Q5_K: _dec_q5_k,
    Q6_K: _dec_q6_k,
}


@dataclass
class FactoredParams:
    """A K-quant's group parameters as its blocks store them: ``scales = scale_factors[:, l //
    p] · scale_ints`` and ``offsets = offset_factors[:, l // p] · offset_ints`` (``offset_ints``
    None: the scale ints, as Q6_K's and Q3_K's implied minimums), exactly the float32 values
    decoded (the layout of :meth:`qalora.QuantLinear.factor_`)."""

    scale_ints: np.ndarray  # uint8 / int8 (rows, K / group_size)
    scale_factors: np.ndarray  # float16 (rows, K / 256)
    offset_ints: np.ndarray | None
    offset_factors: np.ndarray  # float16 (rows, K / 256)


@dataclass
class DecodedRows:
    codes: np.ndarray  # uint8 (rows, K)
    scales: np.ndarray  # (rows, K / group_size)
    offsets: np.ndarray
    # K-quants: the same parameters factored; None for other types, and where an implied
    # minimum's factor (−4·d, −32·d) overflows float16.
    factored: FactoredParams | None = None


def decode_rows(ggml_type: int, raw: np.ndarray, k: int, what: str = "tensor") -> DecodedRows:
    """Decodes whole rows of a quantized tensor.

    Args:
        ggml_type: the tensor's ggml type (see :data:`FORMATS`).
        raw: (rows, row_bytes) uint8, the rows' blocks as stored in the file.
        k: weights per row (GGUF's ne0; in_features of a linear weight).

    Returns:
        :class:`DecodedRows` with float32 scales and offsets; :func:`storage_dtypes` says
        which narrower dtypes hold them exactly.

    Raises:
        FormatError: unsupported type or a row length that does not match.
        InvalidValueError: a block's float16 scale or minimum is not finite.
    """
    fmt = format_of(ggml_type, what)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ShapeError(f"{what}: expected (rows, row_bytes) uint8 blocks, got {raw.dtype} {raw.shape}")
    if k % fmt.block_weights or raw.shape[1] != k // fmt.block_weights * fmt.block_bytes:
        raise FormatError(
            f"{what}: a {fmt.name} row of {k} weights is {k // fmt.block_weights * fmt.block_bytes} bytes "
            f"(blocks of {fmt.block_weights}), got {raw.shape[1]}"
        )
    rows = raw.shape[0]
    codes, scales, offsets, *factored = _DECODERS[ggml_type](raw.reshape(-1, fmt.block_bytes))
    if not (np.isfinite(scales).all() and np.isfinite(offsets).all()):
        bad = int(np.argwhere(~(np.isfinite(scales) & np.isfinite(offsets)))[0][0])
        raise InvalidValueError(f"{what}: block {bad} has a non-finite scale or minimum (a corrupt file?)")
    out = DecodedRows(codes.reshape(rows, k), scales.reshape(rows, -1), offsets.reshape(rows, -1))
    if factored:
        sc, d, mn, dmin = factored[0]
        if np.isfinite(dmin).all():
            out.factored = FactoredParams(
                sc.reshape(rows, -1),
                d.reshape(rows, -1),
                None if mn is None else mn.reshape(rows, -1),
                dmin.reshape(rows, -1),
            )
    return out


def storage_dtypes(ggml_type: int, decoded: DecodedRows) -> tuple[type, type]:
    """(scale dtype, offset dtype) that hold a decoded tensor's parameters exactly:
    float16 for the legacy types (float32 offsets if an implied -8d / -16d / -128d
    overflows float16), float32 for the K-quants."""
    fmt = FORMATS[ggml_type]
    if fmt.param_dtype is np.float32:
        return np.float32, np.float32
    with np.errstate(over="ignore"):
        fits = np.isfinite(decoded.offsets.astype(np.float16)).all()
    return np.float16, (np.float16 if fits else np.float32)


def decode_dense(ggml_type: int, raw: np.ndarray, what: str = "tensor") -> np.ndarray:
    """F32 / F16 / BF16 bytes -> float32 values (exact)."""
    raw = np.ascontiguousarray(raw).reshape(-1)
    if ggml_type == F32:
        return raw.view(np.float32).copy()
    if ggml_type == F16:
        return raw.view(np.float16).astype(np.float32)
    if ggml_type == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if ggml_type in FORMATS:
        fmt = FORMATS[ggml_type]
        d = decode_rows(ggml_type, raw.reshape(1, -1), raw.size // fmt.block_bytes * fmt.block_weights, what)
        return fma_dequantize(d.codes, d.scales, d.offsets, fmt.group_size).reshape(-1)
    raise FormatError(f"{what}: GGUF type {type_name(ggml_type)} cannot be read; supported: {supported_types()}")


def fma_dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, group_size: int) -> np.ndarray:
    """float32 ``scale * code + offset`` rounded once, for the decoded parameters of this
    module (whose products ``scale * code`` are exact in float32, so the product rounds
    nothing and the sum is the one rounding)."""
    rows, k = codes.shape
    s = scales.astype(np.float32).reshape(rows, -1, 1)
    m = offsets.astype(np.float32).reshape(rows, -1, 1)
    return (codes.reshape(rows, -1, group_size).astype(np.float32) * s + m).reshape(rows, k)


# --------------------------------------------------------------------------- encoding


def _check_codes(codes: np.ndarray, d: np.ndarray, m: np.ndarray, bits: int, what: str) -> None:
    if codes.ndim != 2 or codes.shape[1] % 32:
        raise ShapeError(f"{what}: codes must be (rows, K) with K a multiple of 32, got {codes.shape}")
    blocks = (codes.shape[0], codes.shape[1] // 32)
    if d.shape != blocks or m.shape != blocks:
        raise ShapeError(
            f"{what}: expected d and m of shape {blocks} (one per block of 32), got {d.shape} and {m.shape}"
        )
    if d.dtype != np.float16 or m.dtype != np.float16:
        raise ShapeError(f"{what}: d and m must be float16, got {d.dtype} and {m.dtype}")
    if codes.size and int(codes.max()) >= 1 << bits:
        raise InvalidValueError(
            f"{what}: a code is {int(codes.max())}, above the {(1 << bits) - 1} a {bits}-bit block holds"
        )


def _pack_nibbles_split16(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) values < 16 -> 16 bytes each: weight j low nibble, weight j + 16 high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def encode_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray, what: str = "tensor") -> np.ndarray:
    """Q4_1 blocks from 4-bit codes (rows, K) and float16 d, m (rows, K/32): w = d q + m.

    Returns (rows, K/32 * 20) uint8."""
    _check_codes(codes, d, m, 4, what)
    rows = codes.shape[0]
    q = codes.reshape(-1, 32).astype(np.uint8)
    out = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), m.reshape(-1, 1).view(np.uint8), _pack_nibbles_split16(q)], axis=1
    )
    return out.reshape(rows, -1)


def encode_q5_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray, what: str = "tensor") -> np.ndarray:
    """Q5_1 blocks from 5-bit codes (rows, K) and float16 d, m (rows, K/32).

    Returns (rows, K/32 * 24) uint8."""
    _check_codes(codes, d, m, 5, what)
    rows = codes.shape[0]
    q = codes.reshape(-1, 32).astype(np.uint8)
    high = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # bit j of the LE uint32 = weight j
    out = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), m.reshape(-1, 1).view(np.uint8), high, _pack_nibbles_split16(q)], axis=1
    )
    return out.reshape(rows, -1)


def encode_dense(weight: np.ndarray, ggml_type: int, what: str = "tensor") -> np.ndarray:
    """A dense float32 (rows, K) weight as Q8_0 / F16 / F32 bytes (rows, row_bytes) through
    the ``gguf`` package's quantizer (Q8_0 matches ggml's reference bit for bit)."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if ggml_type == F32:
        return weight.view(np.uint8).reshape(weight.shape[0], -1)
    if ggml_type == F16:
        return weight.astype(np.float16).view(np.uint8).reshape(weight.shape[0], -1)
    if ggml_type == Q8_0:
        if weight.shape[-1] % 32:
            raise ShapeError(f"{what}: Q8_0 needs rows that are a multiple of 32 long, got {weight.shape[-1]}")
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        return quantize(weight, GGMLQuantizationType.Q8_0).reshape(weight.shape[0], -1)
    raise FormatError(f"{what}: dense weights are written as F32, F16 or Q8_0, not {type_name(ggml_type)}")


# --------------------------------------------------------------------------- K-quant encoding
#
# Q2_K, Q4_K and Q5_K store each group's scale as d·sc and its offset as -dmin·mn, with d
# and dmin float16 per super-block of 256 weights and sc, mn small unsigned integers per
# group. A layer imported from such a tensor keeps its codes; after a merge its float32
# scales and offsets are arbitrary, so writing it back in its own type means fitting them
# onto that grid. The fit below is exact wherever the values lie on the grid (an unchanged
# layer, or one whose trained values happen to): the true factor is among the candidates and
# gives zero error.

#: GGUF types whose offset is a fixed multiple of the scale with no type of the same codes
#: that holds an offset (Q4_0 / Q5_0 have Q4_1 / Q5_1): a merged adapter cannot be written
#: in them exactly (see QALoRAConfig.fixed_offset_layers).
FIXED_OFFSET_TYPES = ("Q3_K", "Q6_K", "Q8_0")
#: Types with a per-group offset on a grid: ggml type -> largest sub-block integer.
K_OFFSET_TYPES = {Q2_K: 15, Q4_K: 63, Q5_K: 63}
#: The same types by name (as a model's source record names them) -> ggml type.
K_OFFSET_TYPE_NAMES = {FORMATS[t].name: t for t in K_OFFSET_TYPES}
_FIT_BLOCKS = 4096  # super-blocks per fitting step (bounds the candidate arrays)


def fit_grid(values: np.ndarray, weights: np.ndarray, top: int, reach: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``values`` (blocks, G) as ``factor * ints`` with a float16 factor per row
    and integers in [0, top], minimizing ``sum(weights * (factor * ints - values) ** 2)``
    (products in float32, as ggml's decoder forms them).

    Candidates per row: 0 and ``float16(amax / k)`` for the ``reach`` largest k up to top,
    for the largest value of each sign (mixed signs: the other sign's values go to 0). The
    finest grid that spans the values (k = top) is almost always the best; ggml's
    quantizers give every super-block's largest integer the top value, so an unchanged block
    of a file they wrote is among the candidates and comes back with its own bytes (ties go
    to the larger k). Returns (factor float16 (blocks,), ints uint8 (blocks, G))."""
    values = np.asarray(values, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float64)
    factor = np.zeros(values.shape[0], dtype=np.float16)
    ints = np.zeros(values.shape, dtype=np.uint8)
    ks = np.arange(max(1, top - reach + 1), top + 1, dtype=np.float32)
    for a in range(0, values.shape[0], _FIT_BLOCKS):
        v, w = values[a : a + _FIT_BLOCKS], weights[a : a + _FIT_BLOCKS]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            pos = np.maximum(v.max(axis=1, initial=0.0), 0.0)
            neg = np.minimum(v.min(axis=1, initial=0.0), 0.0)
            cand = np.concatenate(
                [np.zeros((len(v), 1), np.float32), pos[:, None] / ks, neg[:, None] / ks], axis=1
            ).astype(np.float16)
        cand = np.where(np.isfinite(cand), cand, np.float16(0)).astype(np.float32)  # (blocks, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(cand[:, :, None] != 0, np.rint(v[:, None, :] / cand[:, :, None]), 0.0)
        q = np.clip(np.nan_to_num(q), 0, top).astype(np.float32)
        err = ((cand[:, :, None] * q - v[:, None, :]).astype(np.float64) ** 2 * w[:, None, :]).sum(axis=2)
        # Among equal errors take the last candidate: within each sign k ascends, so a tie
        # goes to the larger k (the finer grid, as ggml's quantizers choose).
        c = err.shape[1]
        best = c - 1 - np.argmin(err[:, ::-1], axis=1)
        factor[a : a + len(v)] = cand[np.arange(len(v)), best].astype(np.float16)
        ints[a : a + len(v)] = q[np.arange(len(v)), best].astype(np.uint8)
    return factor, ints


def _pack_k_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_k_scale_min`: eight 6-bit (scale, min) pairs -> 12 bytes."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    a = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=1)


def _pack_q4k_low(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_q4k_low`: (blocks, 256) low nibbles -> 128 bytes."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_high_bits(q: np.ndarray, bit: int) -> np.ndarray:
    """Inverse of :func:`_high_bit_planes`: bit ``bit`` of (blocks, 256) codes -> 32 bytes."""
    h = ((q >> bit) & 1).reshape(-1, 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(h << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _pack_two_bit_low(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_two_bit_low`: (blocks, 256) low 2 bits -> 64 bytes."""
    q = (q & 3).reshape(-1, 2, 4, 32).astype(np.uint8)
    return np.bitwise_or.reduce(q << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2).reshape(-1, 64)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def encode_k_blocks(
    ggml_type: int, codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray, mn: np.ndarray, what="tensor"
) -> np.ndarray:
    """Q2_K / Q4_K / Q5_K blocks from codes (rows, K), float16 ``d`` and ``dmin`` (rows,
    K/256) and sub-block integers ``sc``, ``mn`` (rows, K/group): weight = d·sc·q - dmin·mn.

    Returns (rows, K/256 * block_bytes) uint8."""
    if ggml_type not in K_OFFSET_TYPES:
        raise FormatError(f"{what}: {type_name(ggml_type)} is not a K-quant type with per-group minimums")
    fmt = FORMATS[ggml_type]
    top = K_OFFSET_TYPES[ggml_type]
    rows, k = codes.shape
    if k % 256:
        raise ShapeError(f"{what}: {fmt.name} rows are a multiple of 256 weights, got {k}")
    nb, g = k // 256, 256 // fmt.group_size
    if d.shape != (rows, nb) or dmin.shape != (rows, nb) or sc.shape != (rows, nb * g) or mn.shape != (rows, nb * g):
        raise ShapeError(f"{what}: d/dmin must be {(rows, nb)} and sc/mn {(rows, nb * g)}")
    if codes.size and int(codes.max()) >= 1 << fmt.bits:
        raise InvalidValueError(f"{what}: a code is {int(codes.max())}, above what {fmt.bits} bits hold")
    if max(int(sc.max(initial=0)), int(mn.max(initial=0))) > top:
        raise InvalidValueError(f"{what}: a sub-block scale or minimum is above {top}")
    q = codes.reshape(-1, 256).astype(np.uint8)
    sc, mn = sc.reshape(-1, g).astype(np.uint8), mn.reshape(-1, g).astype(np.uint8)
    dd, mm = _f16_bytes(d), _f16_bytes(dmin)
    if ggml_type == Q4_K:
        parts = [dd, mm, _pack_k_scale_min(sc, mn), _pack_q4k_low(q)]
    elif ggml_type == Q5_K:
        parts = [dd, mm, _pack_k_scale_min(sc, mn), _pack_high_bits(q, 4), _pack_q4k_low(q)]
    else:  # Q2_K: 16 bytes of (scale low nibble, min high nibble), 64 of codes, d, dmin
        parts = [(sc & 0x0F) | (mn << 4), _pack_two_bit_low(q), dd, mm]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


@dataclass
class GridFit:
    """A layer's group parameters fitted onto a K-quant grid (see :func:`fit_k_quant`)."""

    raw: np.ndarray  # (rows, row_bytes) the encoded blocks
    scales: np.ndarray  # float32 (rows, K/group) as written
    offsets: np.ndarray
    # The same, factored: scales = d · sc, offsets = −dmin · mn
    d: np.ndarray  # float16 (rows, K/256)
    sc: np.ndarray  # uint8 (rows, K/group)
    dmin: np.ndarray  # float16 (rows, K/256)
    mn: np.ndarray  # uint8 (rows, K/group)


def fit_k_quant(
    ggml_type: int, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, what: str = "tensor"
) -> GridFit:
    """Writes codes (rows, K) with float32 per-group ``scales`` / ``offsets`` as ``ggml_type``
    (Q2_K, Q4_K, Q5_K), the codes unchanged and the group parameters fitted onto the type's
    grid: the scales first (weighted by how much each group's codes spread), then each
    offset corrected by what its scale's rounding moved the group's mean weight, then fitted.
    Exact (zero error) wherever the values lie on the grid."""
    if ggml_type not in K_OFFSET_TYPES:
        raise FormatError(f"{what}: {type_name(ggml_type)} is not a K-quant type with per-group minimums")
    fmt = FORMATS[ggml_type]
    top = K_OFFSET_TYPES[ggml_type]
    rows, k = codes.shape
    g = fmt.group_size
    if k % 256 or scales.shape != (rows, k // g) or offsets.shape != (rows, k // g):
        raise ShapeError(
            f"{what}: {fmt.name} needs rows of a multiple of 256 weights and one scale/offset per {g}; got codes "
            f"{codes.shape}, scales {scales.shape}, offsets {offsets.shape}"
        )
    per = 256 // g
    grouped = codes.reshape(rows, k // g, g).astype(np.float64)
    mean = grouped.mean(axis=2)
    spread = ((grouped - mean[:, :, None]) ** 2).sum(axis=2) + 1e-6
    s = scales.astype(np.float32).reshape(-1, per)
    d, sc = fit_grid(s, spread.reshape(-1, per), top)
    written_s = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(rows, -1)
    target = offsets.astype(np.float64) + (scales.astype(np.float64) - written_s) * mean
    dmin, mn = fit_grid((-target).astype(np.float32).reshape(-1, per), np.ones((rows * k // 256, per)), top)
    written_m = -(dmin.astype(np.float32)[:, None] * mn.astype(np.float32)).reshape(rows, -1)
    d, sc, dmin, mn = d.reshape(rows, -1), sc.reshape(rows, -1), dmin.reshape(rows, -1), mn.reshape(rows, -1)
    raw = encode_k_blocks(ggml_type, codes, d, sc, dmin, mn, what)
    return GridFit(raw, written_s, written_m, d, sc, dmin, mn)
