"""Reading a GGUF file's header (metadata and tensor directory) and its tensors' rows.

The header is parsed here with ``struct`` rather than with ``gguf.GGUFReader``: the reader
builds numpy views for every metadata element (seconds for a 49k-token vocabulary) and maps
the whole file. Tensor data is read with plain file reads, a slice of rows at a time, so an
import never holds more than a slice of a tensor's bytes beyond what it keeps.

File layout (GGUF v2/v3, little-endian): magic ``GGUF``, version (u32), tensor count (u64),
metadata count (u64); metadata entries (key string, value type u32, value); tensor entries
(name, n_dims u32, dims u64 × n_dims with ne0 first, ggml type u32, offset u64 relative to
the data section); the data section starts at the next multiple of ``general.alignment``
(default 32).

A file from the internet is untrusted: every count is checked against the bytes left in the
file before anything is allocated for it, metadata arrays are bounded
(:data:`MAX_METADATA_ELEMENTS` in all, :data:`MAX_SMALL_ARRAY` for an array that is not
part of the vocabulary), and the tensors' byte ranges must tile the data section: each
aligned, none overlapping, each as long as its type and shape say up to the alignment
padding. What the values mean (sizes, head counts, token ids) is checked by
:mod:`.gguf_validate`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from ..errors import FormatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: Elements of all metadata arrays together (a 128k-token vocabulary with its merges and
#: token types is about 0.6 M): a header's Python objects stay within a few GiB at worst.
MAX_METADATA_ELEMENTS = 1 << 24
#: Elements of a metadata array other than the vocabulary's (tokens, merges, token types,
#: scores, SentencePiece charsmap): nothing else in a model's header is that long.
MAX_SMALL_ARRAY = 1 << 16
#: Metadata arrays that hold one entry per token or merge.
VOCABULARY_ARRAYS = frozenset(
    {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.precompiled_charsmap",
    }
)
# Fewest bytes a metadata entry (key length, empty key, value type, 1-byte value) and a
# tensor entry (name length, n_dims, one dimension, type, offset) can take.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8

# GGUF metadata value types (the file format's numbering).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
_NUMPY = {
    UINT8: np.uint8,
    INT8: np.int8,
    UINT16: np.uint16,
    INT16: np.int16,
    UINT32: np.uint32,
    INT32: np.int32,
    FLOAT32: np.float32,
    BOOL: np.bool_,
    UINT64: np.uint64,
    INT64: np.int64,
    FLOAT64: np.float64,
}


@dataclass(frozen=True)
class MetadataValue:
    """One metadata entry: its GGUF value type, the Python value (a list for arrays) and,
    for arrays, the element type."""

    type: int
    value: Any
    element_type: int | None = None


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the file: ``shape`` is GGUF's (ne0, ne1, ...) with ne0 the contiguous
    dimension (in_features of a linear weight); ``offset`` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Number of rows of ne0 elements (out_features of a linear weight)."""
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(self.rows, 1)


@dataclass
class GGUFHeader:
    path: str
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    #: bytes of the header proper (magic to the end of the tensor directory)
    header_size: int = 0
    #: SHA-256 of those bytes: what the config and tokenizer are made from
    digest: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        entry = self.metadata.get(key)
        return default if entry is None else entry.value

    def require(self, key: str) -> Any:
        entry = self.metadata.get(key)
        if entry is None:
            raise FormatError(f"{self.path}: metadata key {key!r} is missing")
        return entry.value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))


class _Cursor:
    """Sequential little-endian reads over the file's leading bytes, read in growing pieces."""

    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf = f.read(min(size, 1 << 22))
        self.pos = 0
        self.elements = 0  # metadata array elements read so far

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(
                f"{self.path}: truncated GGUF header (a field at byte {self.pos} runs past the end of the file)"
            )
        if self.pos + n > len(self.buf):
            more = max(self.pos + n - len(self.buf), len(self.buf))
            self.buf += self.f.read(min(more, self.size - len(self.buf)))
            if self.pos + n > len(self.buf):
                raise FormatError(f"{self.path}: the file shrank while its header was read")

    def take(self, n: int) -> bytes:
        self._need(n)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        self.pos += size
        return struct.unpack_from(fmt, self.buf, self.pos - size)[0]

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a metadata string before byte {self.pos} is not UTF-8") from None

    def string(self) -> str:
        return self._decode(self.take(self.scalar("<Q")))

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row (a vocabulary: one loop, no call per element)."""
        out: list[str] = []
        append, unpack, buf, pos = out.append, struct.unpack_from, self.buf, self.pos
        for _ in range(count):
            if pos + 8 > len(buf):
                self.pos = pos
                self._need(8)
                buf = self.buf
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > len(buf):
                self.pos = pos
                self._need(n)
                buf = self.buf
            try:
                append(buf[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                self.pos = pos
                raise FormatError(f"{self.path}: a metadata string at byte {pos} is not UTF-8") from None
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, key: str) -> MetadataValue:
        if vtype in _SCALARS:
            return MetadataValue(vtype, self.scalar(_SCALARS[vtype]))
        if vtype == STRING:
            return MetadataValue(vtype, self.string())
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:
                item = np.dtype(_NUMPY[etype]).itemsize
            elif etype == STRING:
                item = 8  # the length of each string, at the least
            else:
                raise FormatError(f"{self.path}: metadata {key!r}: unsupported array element type {etype}")
            if count * item > self.left:
                raise FormatError(
                    f"{self.path}: truncated GGUF header: metadata {key!r} claims {count} array elements, which "
                    f"run past the end of the file ({self.left} bytes left)"
                )
            bound = MAX_METADATA_ELEMENTS if key in VOCABULARY_ARRAYS else MAX_SMALL_ARRAY
            if count > bound:
                raise FormatError(
                    f"{self.path}: metadata {key!r} has {count} array elements; at most {bound} are allowed"
                    + ("" if key in VOCABULARY_ARRAYS else " for an array that is not part of the vocabulary")
                )
            self.elements += count
            if self.elements > MAX_METADATA_ELEMENTS:
                raise FormatError(
                    f"{self.path}: the metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements in all"
                )
            if etype == STRING:
                return MetadataValue(vtype, self.strings(count), etype)
            values = np.frombuffer(self.take(count * item), dtype=_NUMPY[etype]).tolist()
            return MetadataValue(vtype, values, etype)
        raise FormatError(f"{self.path}: metadata {key!r}: unknown value type {vtype} at byte {self.pos}")


def read_header(path) -> GGUFHeader:
    """Parses a GGUF file's metadata and tensor directory (no tensor data is read).

    Raises:
        FormatError: not a GGUF file, an unsupported version, a truncated header, or a
            tensor that lies outside the file or has an unknown type.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise FormatError(f"cannot open GGUF file {path}: {e.strerror}") from None
    with f:
        cur = _Cursor(f, path, size)
        if cur.take(4) != MAGIC:
            raise FormatError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > cur.left:
            raise FormatError(
                f"{path}: truncated GGUF header: it claims {n_kv} metadata entries and {n_tensors} tensors, which "
                f"run past the end of the file ({cur.left} bytes left)"
            )
        header = GGUFHeader(path, version, DEFAULT_ALIGNMENT, 0)
        for _ in range(n_kv):
            key = cur.string()
            if key in header.metadata:
                raise FormatError(f"{path}: metadata key {key!r} appears twice")
            header.metadata[key] = cur.value(cur.scalar("<I"), key)
        alignment = header.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{path}: general.alignment = {alignment!r} is not a power of two")
        header.alignment = alignment
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
            shape = tuple(cur.scalar("<Q") for _ in range(n_dims))
            raw.append((name, shape, cur.scalar("<I"), cur.scalar("<Q")))
        header.header_size = cur.pos
        header.digest = hashlib.sha256(memoryview(cur.buf)[: cur.pos]).hexdigest()
        header.data_offset = -(-cur.pos // alignment) * alignment
    for name, shape, ggml_type, rel in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
        if 0 in shape:
            raise FormatError(f"{path}: tensor {name!r} has shape {shape}: every dimension must be at least 1")
        if shape[0] % block:
            raise FormatError(f"{path}: tensor {name!r}: ne0 = {shape[0]} is not a multiple of its block size {block}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count // block * type_size
        offset = header.data_offset + rel
        if offset + nbytes > size:
            raise FormatError(
                f"{path}: tensor {name!r} ({nbytes} bytes at {offset}) runs past the end of the file ({size} bytes)"
            )
        if rel % alignment:
            raise FormatError(
                f"{path}: tensor {name!r} starts at data offset {rel}, not a multiple of the alignment {alignment}"
            )
        if name in header.tensors:
            raise FormatError(f"{path}: tensor {name!r} appears twice")
        header.tensors[name] = TensorEntry(name, shape, ggml_type, offset, nbytes)
    _check_ranges(header, size)
    return header


def _check_ranges(header: GGUFHeader, size: int) -> None:
    """The tensors' byte ranges tile the data section: the first starts it, none overlaps the
    next, and each fills the space up to the next (or to the end of the file) but for the
    alignment padding, so a tensor whose declared type or shape does not match its bytes
    is refused."""
    entries = sorted(header.tensors.values(), key=lambda e: (e.offset, e.nbytes))
    if not entries:
        return
    path, align = header.path, header.alignment
    if entries[0].offset != header.data_offset:
        raise FormatError(
            f"{path}: the first tensor's data ({entries[0].name!r}) starts {entries[0].offset - header.data_offset} "
            "bytes into the data section, not at its start"
        )
    for here, following in zip(entries, [*entries[1:], None]):
        end = here.offset + here.nbytes
        limit, what = (size, "the end of the file") if following is None else (following.offset, repr(following.name))
        if end > limit:
            raise FormatError(
                f"{path}: tensor {here.name!r} (bytes {here.offset} to {end}) overlaps tensor {what} "
                f"(from byte {limit})"
            )
        if limit - end >= align:
            raise FormatError(
                f"{path}: tensor {here.name!r} is declared {here.nbytes} bytes (its type and shape) but its range "
                f"up to {what} is {limit - here.offset} bytes; only padding below the alignment "
                f"({align}) may follow a tensor"
            )


class TensorReader:
    """Reads whole rows of a file's tensors with positioned reads (no memory map)."""

    def __init__(self, path) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rows(self, entry: TensorEntry, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``entry`` as a (stop - start, row_bytes) uint8 array."""
        rb = entry.row_bytes
        out = np.empty((stop - start, rb), dtype=np.uint8)
        view = memoryview(out).cast("B")
        done, pos, want = 0, entry.offset + start * rb, (stop - start) * rb
        while done < want:
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise FormatError(f"{self.path}: tensor {entry.name!r} is cut short (read {done} of {want} bytes)")
            done += n
        return out

    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's bytes as a flat uint8 array."""
        return self.rows(entry, 0, entry.rows).reshape(-1)
