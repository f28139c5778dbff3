"""llama.cpp importance matrices (llama-imatrix output) as per-column quantization weights.

Two file formats exist. The current one is a GGUF file holding, for each weight matrix
`<name>`, a tensor `<name>.in_sum2` (n_per_row x n_expert sums of squared activations) and
`<name>.counts` (one count per expert); the legacy `.dat` file holds, per matrix, a name, a
call count and values already scaled to that count. llama-quantize turns either into the mean
importance per column (common/imatrix-loader.cpp and tools/quantize/quantize.cpp); so do we,
in float32 and in the same order, since the weights reach the quantizers' rounding decisions.

Files come from strangers: every length is checked against the file and every problem is an
ImatrixError naming the file and what is wrong.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from .errors import ImatrixError, QuantError
from .files import InputFileError, open_regular, read_bytes
from .gguf_file import GGUFFile, StringArray

_SUMS, _COUNTS = ".in_sum2", ".counts"
# 235B-A22B's legacy file is ~0.6 GB (every expert's columns, float32): room for that, not for /dev/zero
MAX_LEGACY_BYTES = 4 << 30
_METADATA = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]  # GGUF tensor name -> float32 (n_expert * n_per_row,)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    source: str = ""  # the path as the user gave it: llama-quantize records that in the file

    def for_tensor(self, name: str, n_per_row: int, n_expert: int = 1) -> np.ndarray | None:
        """The (n_expert, n_per_row) importance of tensor `name`, or None when the file has none
        (llama-quantize then quantizes it unweighted). A wrong size is an error, except for the
        token embedding, which llama-quantize also quantizes unweighted then."""
        e = self.entries.get(name)
        if e is None:
            return None
        if e.size != n_per_row * n_expert:
            if name == "token_embd.weight":
                return None
            raise ImatrixError(f"{self.path}: {name} has {e.size} importance values, the model's tensor needs "
                               f"{n_per_row * n_expert} ({n_expert} x {n_per_row}): an imatrix of another model?")
        return e.reshape(n_expert, n_per_row)


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix file into per-column mean importances."""
    given, path = path, Path(path)
    try:
        fd = open_regular(path, "imatrix file")
    except InputFileError as e:
        raise ImatrixError(str(e)) from None
    try:
        magic = os.pread(fd, 4, 0)
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read imatrix: {e.strerror or e}") from None
    finally:
        os.close(fd)
    m = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    m.source = os.fspath(given)
    for name, v in m.entries.items():
        if not np.isfinite(v).all():  # llama-quantize refuses these too
            raise ImatrixError(f"{path}: {name} has non-finite importance values")
    return m


def _load_gguf(path: Path) -> Imatrix:
    try:
        g = GGUFFile(path)
    except QuantError as e:
        raise ImatrixError(f"{e} (reading it as an imatrix)") from None
    with g:
        kind = g.metadata.get("general.type")
        if kind is not None and kind != "imatrix":
            raise ImatrixError(f"{path}: a GGUF file of type {kind!r}, not an imatrix")
        if not g.tensors:
            raise ImatrixError(f"{path}: the imatrix holds no data")
        missing = [k for k in _METADATA if k not in g.metadata]
        if missing:
            raise ImatrixError(f"{path}: not an imatrix (no {missing[0]} key)")
        pairs: dict[str, list] = {}
        for tname, info in g.tensors.items():
            for i, suffix in enumerate((_SUMS, _COUNTS)):
                if tname.endswith(suffix) and len(tname) > len(suffix):
                    pairs.setdefault(tname[: -len(suffix)], [None, None])[i] = info
        entries = {}
        for name, (sums, counts) in sorted(pairs.items()):
            if sums is None or counts is None:
                raise ImatrixError(f"{path}: {name} has {'no sums' if sums is None else 'no counts'}")
            if sums.type != T.F32 or counts.type != T.F32:
                raise ImatrixError(f"{path}: {name}: sums and counts must be F32")
            entries[name] = _mean_per_expert(path, name, _f32(g, sums.name), _f32(g, counts.name))
        ds, chunks = g.metadata["imatrix.datasets"], g.metadata["imatrix.chunk_count"]
        if not isinstance(chunks, (int, np.integer)) or isinstance(chunks, bool):
            raise ImatrixError(f"{path}: imatrix.chunk_count is not a number")
        return Imatrix(path, entries, list(ds) if isinstance(ds, StringArray) else [], int(chunks))


def _f32(g: GGUFFile, name: str) -> np.ndarray:
    return g.raw(name).view("<f4").reshape(-1).astype(np.float32)


def _mean_per_expert(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if sums.size % counts.size:
        raise ImatrixError(f"{path}: {name}: {sums.size} sums do not split into {counts.size} experts")
    if not np.isfinite(counts).all():
        raise ImatrixError(f"{path}: {name} has non-finite counts")
    # llama.cpp rounds the stored float counts to integers (half away from zero), then divides
    # in float32; an expert never seen (count 0) gets importance 1 throughout
    n = (np.sign(counts) * np.floor(np.abs(counts.astype(np.float64)) + 0.5)).astype(np.float32)
    s = sums.reshape(counts.size, -1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mean = np.where(n[:, None] > 0, s / np.where(n > 0, n, 1)[:, None], np.float32(1))
    return mean.astype(np.float32).reshape(-1)


def _load_legacy(path: Path) -> Imatrix:
    try:
        data = read_bytes(path, MAX_LEGACY_BYTES, "legacy imatrix file")
    except InputFileError as e:
        raise ImatrixError(str(e)) from None
    if not data:
        raise ImatrixError(f"{path}: empty file, not an imatrix")
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path}: truncated imatrix file ({what} at byte {pos})")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v[0] if len(v) == 1 else v

    n_entries = take("<i", "entry count")
    # each entry takes at least 16 bytes: a bad magic number lands here as an absurd count
    if n_entries < 1 or n_entries * 16 > len(data):
        raise ImatrixError(f"{path}: neither a GGUF nor a legacy .dat imatrix file")
    entries = {}
    for i in range(n_entries):
        n = take("<i", f"name length of entry {i + 1}")
        if not 0 < n <= len(data) - pos:
            raise ImatrixError(f"{path}: corrupt imatrix file (entry {i + 1} has a name of {n} bytes)")
        try:
            name = data[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixError(f"{path}: corrupt imatrix file (entry {i + 1}'s name is not UTF-8)") from None
        pos += n
        ncall, nval = take("<ii", f"size of {name}")
        if not 0 < nval <= (len(data) - pos) // 4:
            raise ImatrixError(f"{path}: truncated or corrupt imatrix file ({name} claims {nval} values)")
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        # the stored values are means times ncall: divide it back out (in float32)
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    # optional trailer (chunk count, dataset name); llama.cpp reads it leniently, so do we
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        chunks = struct.unpack_from("<i", data, pos)[0]
    if pos + 8 <= len(data):
        n = struct.unpack_from("<i", data, pos + 4)[0]
        if 0 < n <= len(data) - pos - 8:
            datasets = [data[pos + 8 : pos + 8 + n].split(b"\0")[0].decode("utf-8", "replace")]
    return Imatrix(path, entries, datasets, chunks)
