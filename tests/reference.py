"""Independent float64 / bit-by-bit references for the kernels (numpy only, no qalora code)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Code k of a row occupies bits [k*bits, (k+1)*bits), bit 0 = LSB of byte 0."""
    n, k = codes.shape
    bitplane = np.zeros((n, k * bits), dtype=np.uint8)
    for j in range(bits):
        bitplane[:, j::bits] = (codes >> j) & 1
    return np.packbits(bitplane, axis=1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    bitplane = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits]
    codes = np.zeros((packed.shape[0], k), dtype=np.int64)
    for j in range(bits):
        codes |= bitplane[:, j::bits].astype(np.int64) << j
    return codes.astype(np.uint8)


def params(w: np.ndarray, bits: int, g: int, store=np.float16):
    """min-max scale/offset per (row, group), rounded to the storage dtype, as float64."""
    n, k = w.shape
    wg = w.astype(np.float64).reshape(n, k // g, g)
    lo, hi = wg.min(-1), wg.max(-1)
    offsets = lo.astype(np.float32).astype(store).astype(np.float64)
    scales = ((hi - lo) / (2**bits - 1)).astype(np.float32).astype(store).astype(np.float64)
    return scales, offsets


def codes_for(w: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int, g: int):
    """Nearest codes under given parameters (float64), plus the distance of each to a tie."""
    _n, _k = w.shape
    s = np.repeat(scales, g, axis=1)
    m = np.repeat(offsets, g, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s > 0, (w.astype(np.float64) - m) / np.where(s > 0, s, 1.0), 0.0)
    q = np.clip(np.rint(t), 0, 2**bits - 1).astype(np.uint8)
    tie_distance = np.abs(np.abs(t - np.floor(t)) - 0.5)
    return q, tie_distance


def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, g: int) -> np.ndarray:
    return codes.astype(np.float64) * np.repeat(scales, g, axis=1) + np.repeat(offsets, g, axis=1)


def group_pool(x: np.ndarray, g: int) -> np.ndarray:
    x = x.astype(np.float64)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g).mean(-1)


def merge(offsets, a, b, scaling, g):
    return offsets.astype(np.float64) + scaling * (b.astype(np.float64) @ a.astype(np.float64)) / g


def int8_activations(x: np.ndarray, block: int = 32) -> np.ndarray:
    """x (..., K) quantized per block of ``block`` values to int8 with scale max|x| / 127
    (float32 arithmetic, round half to even), returned dequantized as float64."""
    xf = x.astype(np.float32).reshape(-1, block)
    d = (np.abs(xf).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xf * inv), -127, 127)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def gptq(w, h, bits, g, *, damp=0.01, act_order=False, store=np.float16, forced=None):
    """GPTQ (Frantar et al., 2022) in float64, written from the paper's derivation rather
    than its Cholesky algorithm: one column at a time, the inverse Hessian of the columns
    not yet quantized is kept explicitly. Quantizing column i moves every remaining column
    j by -(w_i - q_i) / [H^-1]_ii * [H^-1]_ij (the optimal-brain-surgeon update), then
    column i is removed from H^-1 by one step of Gaussian elimination
    (H^-1 <- H^-1 - H^-1[:, i] H^-1[i, :] / [H^-1]_ii). No blocks, no Cholesky factor.

    Columns whose Hessian diagonal is zero (inputs always zero) get a diagonal of 1 and
    keep their weights. Dampening adds ``damp`` times the mean diagonal. Group parameters
    are min-max over the group's current weights when its first column comes up
    (``act_order=False``), or over the unquantized weights before anything moves
    (``act_order=True``, static groups; columns then go in order of decreasing diagonal,
    ties in column order). Parameters are rounded to ``store`` (through float32) before
    codes are chosen, as the kernels do.

    ``forced = (codes, scales, offsets)``, if given, replaces this function's own choices
    in the updates, so that another implementation's decisions can be checked one at a time
    without one near-tie changing everything after it.

    Returns a namespace: ``codes`` (N, K) (the forced ones, if given); ``rounded`` (N, K):
    this function's own rounding of each column on that trajectory; ``scales``, ``offsets`` (N, L) as stored (float64
    values); ``tie`` (N, K): the distance of each scaled value (w - m) / s to the nearest
    rounding boundary (x.5), in steps; ``lo``, ``step`` (N, L): the unrounded minimum and
    (max - min) / (2^b - 1) the parameters were rounded from.
    """
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    n, k = w.shape
    qmax = 2**bits - 1
    idx = np.arange(k)
    dead = np.diag(h) == 0
    h[idx[dead], idx[dead]] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else idx
    h[idx, idx] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    out = SimpleNamespace(
        codes=np.zeros((n, k), dtype=np.int64),
        rounded=np.zeros((n, k), dtype=np.int64),
        scales=np.zeros((n, k // g)),
        offsets=np.zeros((n, k // g)),
        tie=np.full((n, k), np.inf),
        lo=np.zeros((n, k // g)),
        step=np.zeros((n, k // g)),
    )

    def set_params(l, cols):
        lo, hi = cols.min(axis=1), cols.max(axis=1)
        out.lo[:, l], out.step[:, l] = lo, (hi - lo) / qmax
        if forced is not None:
            out.offsets[:, l], out.scales[:, l] = forced[2][:, l], forced[1][:, l]
        else:
            out.offsets[:, l] = lo.astype(np.float32).astype(store)
            out.scales[:, l] = ((hi - lo) / qmax).astype(np.float32).astype(store)

    if act_order:
        for l in range(k // g):
            set_params(l, w[:, l * g : (l + 1) * g])
    remaining = np.ones(k, dtype=bool)
    for i in order:
        l = i // g
        if not act_order and i % g == 0:
            set_params(l, w[:, i : i + g])
        s, m = out.scales[:, l], out.offsets[:, l]
        t = np.where(s > 0, (w[:, i] - m) / np.where(s > 0, s, 1.0), 0.0)
        out.tie[:, i] = np.where(s > 0, np.abs(np.abs(t - np.floor(t)) - 0.5), np.inf)
        out.rounded[:, i] = np.clip(np.rint(t), 0, qmax)
        out.codes[:, i] = out.rounded[:, i] if forced is None else forced[0][:, i]
        wq = s * out.codes[:, i] + m
        remaining[i] = False
        err = (w[:, i] - wq) / hinv[i, i]
        w[:, remaining] -= np.outer(err, hinv[i, remaining])
        w[:, i] = wq
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out


def hessian(x: np.ndarray) -> np.ndarray:
    """GPTQ's Hessian of the layer's squared output error: 2 X^T X / n over the n rows of x."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return 2.0 * x.T @ x / x.shape[0]


def gptq_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's packing of (R, C) codes along R into (R*bits/32, C) int32 words, from its
    published rules: for each column, the codes r = 0, 1, ... form one little-endian
    bitstream (code r at bits [r*bits, (r+1)*bits)), cut into 32-bit words, word 0 first,
    bit 0 = the word's least significant bit. At 2/4/8 bits a word holds 16/8/4 whole
    codes; at 3 bits 32 codes fill 3 words and codes 10 and 21 straddle word boundaries."""
    r, c = codes.shape
    assert (r * bits) % 32 == 0
    words = np.zeros((r * bits // 32, c), dtype=np.uint64)
    for row in range(r):
        for b in range(bits):
            pos = row * bits + b
            words[pos // 32] |= ((codes[row].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)) << np.uint64(pos % 32)
    return words.astype(np.uint32).view(np.int32)


def gptq_unpack(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Inverse of :func:`gptq_pack`."""
    u = words.view(np.uint32).astype(np.uint64)
    codes = np.zeros((rows, u.shape[1]), dtype=np.int64)
    for row in range(rows):
        for b in range(bits):
            pos = row * bits + b
            codes[row] |= (((u[pos // 32] >> np.uint64(pos % 32)) & np.uint64(1)) << np.uint64(b)).astype(np.int64)
    return codes
