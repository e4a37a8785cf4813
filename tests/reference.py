"""Independent float64 / bit-by-bit references for the kernels (numpy only, no qalora code)."""

from __future__ import annotations

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
