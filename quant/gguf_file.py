"""GGUF v2/v3 files: a fast defensive reader and a streaming writer.

gguf-py's GGUFReader parses every token string of a 151,936-token vocabulary in Python
(~9 s); this reader skips string arrays by their length prefixes and decodes them only when
asked. Files come from strangers: every length, count, type and offset is checked against
the file before it is used, and a problem is a GGUFFormatError naming the file and byte.

The writer takes the metadata as gguf-py `GGUFValue`s (so key names and value types come
from gguf-py's own `add_*` helpers) and tensor data in chunks, so a tensor never has to
exist whole in memory. It is a small state machine and refuses out-of-order calls.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValue, GGUFValueType as VT

from .errors import GGUFFormatError, UnsupportedQuantType
from .files import InputFileError, open_regular

ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

_SCALARS: dict[VT, tuple[str, type[np.generic]]] = {
    VT.UINT8: ("<B", np.uint8), VT.INT8: ("<b", np.int8),
    VT.UINT16: ("<H", np.uint16), VT.INT16: ("<h", np.int16),
    VT.UINT32: ("<I", np.uint32), VT.INT32: ("<i", np.int32),
    VT.UINT64: ("<Q", np.uint64), VT.INT64: ("<q", np.int64),
    VT.FLOAT32: ("<f", np.float32), VT.FLOAT64: ("<d", np.float64),
    VT.BOOL: ("<?", np.bool_),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: ne0 (the row length) first
    type: int  # raw GGML type id, possibly one gguf does not know
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type).name
        except ValueError:
            return f"#{self.type}"

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)  # a Python int: numpy's int64 product wraps around


class StringArray:
    """A GGUF string array decoded on demand (the vocabulary has 151,936 of them)."""

    def __init__(self, buf: memoryview, start: int, count: int, where: str = "string array", end: int | None = None):
        self._buf, self._start, self._count, self._where = buf, start, count, where
        self._end = end
        self._items: list[str] | None = None
        self._offsets: list[int] | None = None  # of each item, once one is asked for alone

    def __len__(self) -> int:
        return self._count

    @property
    def raw(self) -> memoryview | None:
        """The array's bytes as the file holds them (length-prefixed strings), when known: a
        cheap content key for what is built from it (tokenizer_cache.py)."""
        return None if self._end is None else self._buf[self._start:self._end]

    def _decode(self) -> list[str]:
        if self._items is None:
            buf, pos, out = self._buf, self._start, []
            for i in range(self._count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                try:  # a replacement character would silently change what the token means
                    out.append(bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"))
                except UnicodeDecodeError:
                    raise GGUFFormatError(f"{self._where}[{i}] is not valid UTF-8") from None
                pos += 8 + n
            self._items = out
        return self._items

    def __getitem__(self, i):
        if self._items is not None or not isinstance(i, int) or not -self._count <= i < self._count:
            return self._decode()[i]
        # one item (info's BOS / EOS names): find it by the offsets, a third of a full decode
        i %= self._count
        if self._offsets is None:
            self._offsets = offsets = []
            pos = self._start
            for _ in range(self._count):
                offsets.append(pos)
                pos += 8 + _U64(self._buf, pos)[0]
        pos = self._offsets[i]
        (n,) = _U64(self._buf, pos)
        try:
            return bytes(self._buf[pos + 8 : pos + 8 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self._where}[{i}] is not valid UTF-8") from None

    def __iter__(self):
        return iter(self._decode())


_U64 = struct.Struct("<Q").unpack_from


def _skip_strings(buf: memoryview, pos: int, count: int, size: int) -> int:
    """The offset after `count` length-prefixed strings from `pos`, or -1 if they overrun
    `size`. One tight loop: a vocabulary and its merges are 300,000 strings, and the general
    per-value reader took 0.4 s over them."""
    for _ in range(count):
        if pos + 8 > size:
            return -1
        pos += 8 + _U64(buf, pos)[0]
    return pos if pos <= size else -1


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (key -> value), `.tensors` (name -> TensorInfo).

    Numeric arrays are zero-copy numpy views; string arrays are `StringArray`s.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:  # open_regular: a FIFO would block open(); a device never ends
            fd = open_regular(self.path, "GGUF file")
        except InputFileError as e:
            raise GGUFFormatError(str(e)) from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                raise GGUFFormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFFormatError(f"{self.path}: cannot read: {e.strerror or e}") from None
        finally:
            os.close(fd)
        self._buf = memoryview(self._mm)
        self.size = size
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[VT, VT | None]] = {}  # key -> (type, array item type)
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- low-level reads, each bounds-checked ----------------------------------------------
    def _fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what} (at byte {self._pos})")

    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > self.size:
            raise self._fail("truncated or corrupt header")
        self._pos = start + n
        return start

    def _scalar(self, vt: VT):
        fmt, _ = _SCALARS[vt]
        return struct.unpack_from(fmt, self._buf, self._take(struct.calcsize(fmt)))[0]

    def _u32(self) -> int:
        return self._scalar(VT.UINT32)

    def _u64(self) -> int:
        return self._scalar(VT.UINT64)

    def _str(self) -> str:
        n = self._u64()
        start = self._take(n)
        try:
            return bytes(self._buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail("string is not valid UTF-8") from None

    def _vtype(self) -> VT:
        raw = self._u32()
        try:
            return VT(raw)
        except ValueError:
            raise self._fail(f"unknown metadata value type {raw}") from None

    def _value(self, vt: VT, key: str, depth: int = 0):
        if vt == VT.STRING:
            return self._str()
        if vt in _SCALARS:
            return self._scalar(vt)
        if depth > 0:
            raise self._fail(f"{key}: nested arrays are not supported")
        sub = self._vtype()
        self.value_types[key] = (vt, sub)
        count = self._u64()
        # each item takes at least 8 bytes (a string's length, an array's type and count):
        # refuse a count the rest of the file cannot hold before looping over it
        if sub in (VT.STRING, VT.ARRAY) and count * 8 > self.size - self._pos:
            raise self._fail(f"{key}: an array of {count} items cannot fit in the file")
        if sub == VT.STRING:
            start = self._pos
            self._pos = _skip_strings(self._buf, start, count, self.size)
            if self._pos < 0:
                raise self._fail(f"{key}: truncated or corrupt string array")
            return StringArray(self._buf, start, count, f"{self.path}: {key}", self._pos)
        if sub == VT.ARRAY:
            return [self._value(VT.ARRAY, key, depth + 1) for _ in range(count)]
        fmt, dtype = _SCALARS[sub]
        start = self._take(count * struct.calcsize(fmt))
        return np.frombuffer(self._buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=start)

    # -- structure ---------------------------------------------------------------------------
    def _parse(self) -> None:
        if self._u32() != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (bad magic)")
        version = self._u32()
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = self._u64(), self._u64()
        # Every entry takes at least 8 bytes: reject absurd counts before looping over them.
        if (n_tensors + n_kv) * 8 > self.size:
            raise self._fail(f"corrupt header: {n_kv} keys and {n_tensors} tensors cannot fit")
        for _ in range(n_kv):
            key = self._str()
            if key in self.metadata:
                raise self._fail(f"duplicate key {key!r}")
            vt = self._vtype()
            self.value_types[key] = (vt, None)  # an array's item type is filled in by _value
            self.metadata[key] = self._value(vt, key)
        infos, seen = [], set()
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(self._u64() for _ in range(n_dims))
            ttype, offset = self._u32(), self._u64()
            if any(d <= 0 for d in shape):
                raise self._fail(f"tensor {name!r} has shape {list(shape)}")
            if name in seen:
                raise self._fail(f"duplicate tensor {name!r}")
            seen.add(name)
            infos.append((name, shape, ttype, offset))
        align = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if type(align) is not int or not 0 < align < 1 << 32 or align & (align - 1):
            what = f"{align!r:.40}" if isinstance(align, (int, float, str)) else f"a {type(align).__name__}"
            raise GGUFFormatError(f"{self.path}: '{ALIGNMENT_KEY}' must be a power of two below 2^32, got {what}")
        self.alignment = align
        self.data_start = -(-self._pos // align) * align
        for name, shape, ttype, offset in infos:
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise UnsupportedQuantType(f"{self.path}: tensor {name!r} has unknown GGML type {ttype}") from None
            if shape[0] % block:
                raise self._fail(f"tensor {name!r}: row of {shape[0]} is not a multiple of {block}")
            nbytes = math.prod(shape) // block * size  # exact: [2^32, 2^32] is not 0 bytes
            start = self.data_start + offset
            if offset % align:
                raise self._fail(f"tensor {name!r} data offset {offset} is not aligned to {align}")
            if start + nbytes > self.size:
                raise GGUFFormatError(
                    f"{self.path}: truncated: tensor {name!r} of shape {list(shape)} needs bytes up to "
                    f"{start + nbytes}, file has {self.size}"
                )
            self.tensors[name] = TensorInfo(name, shape, ttype, start, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view, shaped (rows, row_bytes)."""
        t = self.tensors[name]
        rows = math.prod(t.shape[1:])
        return np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset).reshape(rows, t.nbytes // rows)

    def release_pages(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the tensor's pages (or those of its raw rows lo:hi) from this process: they stay
        in the page cache and come back on the next read, so a page shared with bytes not yet
        read costs only a re-fault. For tensors copied into another layout, so memory is not
        held twice."""
        t = self.tensors[name]
        lo, hi = t.offset, t.offset + t.nbytes
        if rows is not None:
            row_bytes = t.nbytes // math.prod(t.shape[1:])
            lo, hi = t.offset + rows[0] * row_bytes, min(hi, t.offset + rows[1] * row_bytes)
        page = mmap.PAGESIZE
        start = lo // page * page
        if hi <= start:
            return
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, hi - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: only memory is lost
            pass

    def release_header(self) -> None:
        """Drop the pages of the header (metadata: a Qwen3 tokenizer's ~5 MB of tokens and
        merges) from this process, once what reads them has: as release_pages, a later read
        only faults them back in."""
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, 0, self.data_start // mmap.PAGESIZE * mmap.PAGESIZE)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        try:
            self._buf.release()
            self._mm.close()
        except BufferError:  # numpy views still alive; the map goes when they do
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- writer ----------------------------------------------------------------------------------

def _pack_value(v: GGUFValue) -> bytes:
    def one(vt: VT, x) -> bytes:
        if vt == VT.STRING:
            b = x.encode("utf-8") if isinstance(x, str) else bytes(x)
            return struct.pack("<Q", len(b)) + b
        return struct.pack(_SCALARS[vt][0], x)

    vt = VT(v.type)
    if vt != VT.ARRAY:
        return one(vt, v.value)
    items = list(v.value)
    # gguf-py leaves sub_type unset for plain lists and infers it from the first item
    sub = VT(v.sub_type) if v.sub_type is not None else (VT.get_type(items[0]) if items else VT.UINT8)
    head = struct.pack("<IQ", sub, len(items))
    if sub in _SCALARS and sub != VT.BOOL:
        return head + np.asarray(items, dtype=np.dtype(_SCALARS[sub][1]).newbyteorder("<")).tobytes()
    return head + b"".join(one(sub, x) for x in items)


class GGUFStreamWriter:
    """Write a GGUF file: declare tensors, write the header, then stream each tensor's bytes
    in declaration order (any number of chunks per tensor), then `finish()`."""

    def __init__(self, fout: BinaryIO, alignment: int = DEFAULT_ALIGNMENT):
        self._f = fout
        self._align = alignment
        self._tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, type, nbytes
        self._state = "declare"
        self._current = 0
        self._written = 0

    def add_tensor(self, name: str, ggml_shape: tuple[int, ...], ggml_type: int, nbytes: int) -> None:
        if self._state != "declare":
            raise RuntimeError("tensors must be declared before the header is written")
        self._tensors.append((name, tuple(int(d) for d in ggml_shape), int(ggml_type), int(nbytes)))

    def write_header(self, kv: dict[str, GGUFValue]) -> None:
        if self._state != "declare":
            raise RuntimeError("header already written")
        out = [struct.pack("<IIQQ", GGUF_MAGIC, 3, len(self._tensors), len(kv))]
        for key, val in kv.items():
            out.append(_pack_value(GGUFValue(key, VT.STRING)) + struct.pack("<I", VT(val.type)) + _pack_value(val))
        offset = 0
        for name, shape, ttype, nbytes in self._tensors:
            out.append(_pack_value(GGUFValue(name, VT.STRING)) + struct.pack("<I", len(shape)))
            out.append(struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ttype, offset))
            offset += -(-nbytes // self._align) * self._align
        self._f.write(b"".join(out))
        self._pad()
        self._state = "data"

    def _pad(self) -> None:
        n = -self._f.tell() % self._align
        if n:
            self._f.write(b"\0" * n)

    def write(self, chunk: np.ndarray | bytes) -> None:
        """Append bytes of the current tensor; moves to the next tensor once it is full."""
        if self._state != "data":
            raise RuntimeError("write() before write_header() or after finish()")
        if isinstance(chunk, np.ndarray):
            chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        data = memoryview(chunk)
        name, _, _, nbytes = self._tensors[self._current]
        if self._written + len(data) > nbytes:
            raise RuntimeError(f"{name}: {self._written + len(data)} bytes written, {nbytes} declared")
        self._f.write(data)
        self._written += len(data)
        if self._written == nbytes:
            self._pad()
            self._current += 1
            self._written = 0
            if self._current == len(self._tensors):
                self._state = "done"

    def finish(self) -> None:
        if self._state != "done" and not (self._state == "data" and not self._tensors):
            missing = [t[0] for t in self._tensors[self._current :]]
            raise RuntimeError(f"tensors not written: {missing[:3]}")
        self._f.flush()
        self._state = "closed"

