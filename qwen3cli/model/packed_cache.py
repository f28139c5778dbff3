"""The engine's repacked weights, kept on disk between runs: a warm start maps them in.

Repacking a GGUF's matrices into the int8 layouts (quant/kernels/layouts.py) was the largest
part of a warm start: ~1.5 s of CPU for a 0.6B Q8_0 file (one thread, a busy 2-core host),
against ~0.03 s to parse the file. An entry holds every packed matrix of one file, so a later
start maps the entry (copy-on-write, never written: pages come from the page cache as the
first forward touches them) and packs nothing.

Cost: disk about the file's size, once per file (633 MB for a 639 MB 0.6B Q8_0, 397 MB for its
Q4_K_M: the tokenizer stays in the file). The first run writes it on a thread after packing
(the first token does not wait; the process's exit does: writing and fsyncing 633 MB took 4.4 s
on the busy host, fsynced so that a crash never leaves an entry of zeros). Entries are kept newest-used first
within QWEN3CLI_PACKED_CACHE_MAX bytes (default 8 GiB; 0 turns the cache off); a model whose
entry would not fit is never cached, nor one that would leave less than 1 GiB of disk free;
at most MAX_ENTRIES entries are kept.

Key: a SHA-256 of the file's identity (device, inode, size, mtime and ctime in ns: a file
rewritten in place gets a new ctime even if its mtime is set back; a copy is a new file), of
the packing code's sources (quant/kernels/*.py, ops_cpu.py, prepare.py, this file) and of numpy's and
numba's versions. Hashing the weights themselves would cost what packing does. An entry that
is cut short, of another key or version, or whose table of arrays does not fit the file is
rebuilt: never an error, never another file's weights. Bytes altered inside an entry's data
are not detected, as they are not in the GGUF file itself.

Layout: MAGIC, the header's length (8 bytes), its SHA-256, the header (JSON: key, total size,
the slots of the weights and a table of arrays), then each array's bytes at a multiple of
ALIGN. The loader also checks each matrix's type and shape against the file's tensors
(ops_cpu.restore), so a damaged table can fail to load but never hand a kernel a wrong shape.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import threading
from dataclasses import fields, is_dataclass, replace
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .weights import Weights

MAGIC = b"qwen3cli-packed1"
ALIGN = 4096
ENV_MAX = "QWEN3CLI_PACKED_CACHE_MAX"
DEFAULT_MAX = 8 << 30
MIN_FREE = 1 << 30
MAX_ENTRIES = 16  # besides the bytes: test runs and experiments make many small ones
MAX_HEADER = 64 << 20
DTYPES = {"|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<f2", "<f4", "<i8"}
SAME, NONE = "same", "none"  # a slot the packing left as it was; an empty slot


def _max_bytes() -> int:
    try:
        return int(os.environ.get(ENV_MAX, DEFAULT_MAX))
    except ValueError:
        return DEFAULT_MAX


def _sources_hash() -> bytes:
    import numba

    import quant.kernels

    from . import ops_cpu, prepare

    h = hashlib.sha256(f"{np.__version__} {numba.__version__} {sys.byteorder}".encode())
    for p in sorted(Path(quant.kernels.__file__).parent.glob("*.py")) + [Path(ops_cpu.__file__), Path(prepare.__file__), Path(__file__)]:
        data = p.read_bytes()
        h.update(p.name.encode() + len(data).to_bytes(8, "little") + data)
    return h.digest()


def entry_key(path: str | os.PathLike) -> str:
    st = os.stat(path)
    h = hashlib.sha256(MAGIC + _sources_hash())
    h.update(repr((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)).encode())
    return h.hexdigest()


class PackedStore:
    """One GGUF file's entry: load() the packed weights' slots or None, save() them after a pack."""

    def __init__(self, path: str | os.PathLike):
        from ..paths import cache_dir

        self.key = entry_key(path)
        self.dir = cache_dir() / "packed"
        self.path = self.dir / f"{self.key}.bin"
        self._writer: threading.Thread | None = None

    @classmethod
    def for_file(cls, path) -> PackedStore | None:
        """The store of a GGUF file, or None where the cache is off or the file cannot be stat'ed."""
        if _max_bytes() <= 0:
            return None
        try:
            return cls(path)
        except OSError:
            return None

    # -- reading -------------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        """slot -> a Mat, SAME, NONE or ("alias", slot), its arrays views of the mapped entry;
        None when there is no good entry."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(len(MAGIC) + 40)
                if len(head) < len(MAGIC) + 40 or head[:len(MAGIC)] != MAGIC:
                    return None
                n = int.from_bytes(head[len(MAGIC):len(MAGIC) + 8], "little")
                if n > min(MAX_HEADER, size):
                    return None
                body = f.read(n)
                if hashlib.sha256(body).digest() != head[len(MAGIC) + 8:]:
                    return None
                header = json.loads(body.decode("utf-8"))
                if header.get("key") != self.key or header.get("size") != size:
                    return None
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable arrays: the kernels' types
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            return None
        try:
            arrays = [_view(mm, a, size) for a in header["arrays"]]
            slots = {name: _decode(v, arrays) for name, v in header["slots"].items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ImportError):
            return None
        try:
            os.utime(self.path)  # newest used: pruned last
        except OSError:
            pass
        return slots

    # -- writing -------------------------------------------------------------------------------
    def save(self, slots: dict[str, Any] | None) -> None:
        """Write the entry on a thread (non-daemon: the process waits for it before exiting)."""
        if slots is None:
            return
        arrays: list[np.ndarray] = []
        try:
            enc = {name: _encode(v, arrays) for name, v in slots.items()}
        except _NotCacheable:
            return
        table, at = [], 0
        for a in arrays:
            table.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": at})
            at += -(-a.nbytes // ALIGN) * ALIGN
        header = {"key": self.key, "size": 0, "slots": enc, "arrays": table}
        data_start = _data_start(header)
        for t in table:
            t["offset"] += data_start
        header["size"] = data_start + at
        if header["size"] > _max_bytes():
            return
        self._writer = threading.Thread(target=self._write, args=(header, arrays, data_start), name="packed-cache")
        self._writer.start()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _write(self, header: dict, arrays: list[np.ndarray], data_start: int) -> None:
        size = header["size"]
        tmp = self.dir / f".{self.key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if shutil.disk_usage(self.dir).free < size + MIN_FREE:
                return
            _prune(self.dir, _max_bytes() - size)
            body = json.dumps(header, separators=(",", ":")).encode()
            if len(MAGIC) + 40 + len(body) > data_start:  # cannot happen (_data_start's margin): no entry then
                return
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(body).to_bytes(8, "little") + hashlib.sha256(body).digest() + body)
                for a, t in zip(arrays, header["arrays"]):
                    f.seek(t["offset"])
                    f.write(a.reshape(-1).view(np.uint8).data)  # C-contiguous (_encode): no copy
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name is: a crash leaves no half entry
            os.replace(tmp, self.path)
        except OSError:  # read-only, full, gone: run without the cache
            pass
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


# -- the weights by slot ------------------------------------------------------------------------

def slots(p: Weights, w: Weights) -> dict:
    """The prepared weights p (ops_cpu.prepare(w)) by slot ("output", "layers.3.qkv", ...): a
    packed matrix, SAME (w's own value), NONE, or ("alias", an earlier slot) for a matrix that
    serves twice (tied embeddings)."""
    out, seen = {}, {}

    def put(name, v, orig) -> None:
        if v is None:
            out[name] = NONE
        elif id(v) in seen:
            out[name] = ("alias", seen[id(v)])
        elif v is orig:
            out[name] = SAME
        else:
            out[name], seen[id(v)] = v, name

    put("output", p.output, w.output)
    put("token_embd", p.token_embd, w.token_embd)
    for i, (fl, ly) in enumerate(zip(p.layers, w.layers)):
        for name, v in vars(fl).items():
            put(f"layers.{i}.{name}", v, getattr(ly, name, None))
    return out


def restore(w: Weights, got: dict | None) -> Weights | None:
    """ops_cpu.prepare(w)'s result from slots(); None where they do not fit w (another model, a damaged
    entry): every matrix must have the type, rows, row length and expert count of the tensors
    it was packed from."""
    if got is None:
        return None
    done: dict = {}

    def get(name, *origs):
        v = got[name]
        if v == SAME:
            v = origs[0] if len(origs) == 1 else None
            if v is None:  # a stack is never left as it was
                raise ValueError(name)
        elif v == NONE:
            v = None
        elif isinstance(v, tuple):
            v = done[v[1]]
        else:
            a = origs[0]
            if (not isinstance(a, QTensor) or any(o.type != a.type or o.k != a.k or o.n_mats != a.n_mats
                                                   for o in origs) or (v.type, v.k, v.n_mats) != (a.type, a.k, a.n_mats)
                    or v.rows != sum(o.rows for o in origs)):
                raise ValueError(name)
        done[name] = v
        return v

    from quant.qtensor import QTensor

    try:
        output = get("output", w.output)
        embd = get("token_embd", w.token_embd)
        layers = []
        for i, ly in enumerate(w.layers):
            groups = ly.fused_parts()
            stacked = {key: get(f"layers.{i}.{key}", *(getattr(ly, n) for n in names)) for key, names in groups.items()}
            vals = {f.name: get(f"layers.{i}.{f.name}", getattr(ly, f.name)) for f in fields(ly) if f.name not in groups}
            for key, names in groups.items():
                if stacked[key] is None and any(vals[n] is None and getattr(ly, n) is not None for n in names):
                    raise ValueError(key)  # a part neither stacked nor kept
            layers.append(replace(ly, **vals, **stacked))
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    if len(got) != len(done):
        return None
    return replace(w, layers=layers, output=output, token_embd=embd)


class _NotCacheable(Exception):
    pass


def _data_start(header: dict) -> int:
    """Where the arrays start: the header's length depends on the offsets written in it, so
    size it with room for every offset to grow to 20 digits."""
    n = len(json.dumps(header, separators=(",", ":")).encode()) + 24 * (len(header["arrays"]) + 1)
    return -(-(len(MAGIC) + 40 + n) // ALIGN) * ALIGN


def _encode(v, arrays: list) -> Any:
    from quant.kernels.layouts import Mat

    if isinstance(v, str):  # SAME, NONE
        return v
    if isinstance(v, tuple) and v[0] == "alias":
        return {"alias": v[1]}
    if not isinstance(v, Mat) or not is_dataclass(v.arrays):
        raise _NotCacheable
    cls = type(v.arrays)
    if not cls.__module__.startswith("quant.kernels."):
        raise _NotCacheable
    fs = {}
    for f in fields(v.arrays):
        x = getattr(v.arrays, f.name)
        if isinstance(x, np.ndarray):
            if not x.flags.c_contiguous or x.dtype.str not in DTYPES:
                raise _NotCacheable  # a copy would change the kernels' argument types
            fs[f.name] = {"array": len(arrays)}
            arrays.append(x)
        elif x is None or type(x) is int:
            fs[f.name] = x
        elif isinstance(x, int):  # the GGML type enum
            fs[f.name] = {"T": int(x)}
        else:
            raise _NotCacheable
    return {"mat": {"name": v.name, "type": int(v.type), "rows": v.rows, "k": v.k, "n_mats": v.n_mats,
                    "cls": f"{cls.__module__}:{cls.__qualname__}", "fields": fs}}


def _decode(v, arrays: list[np.ndarray]) -> Any:
    from gguf import GGMLQuantizationType as T

    from quant.kernels.layouts import INT8, Mat

    if v in (SAME, NONE):
        return v
    if "alias" in v:
        return ("alias", str(v["alias"]))
    m = v["mat"]
    mod, _, qual = m["cls"].partition(":")
    if not mod.startswith("quant.kernels."):
        raise ValueError(mod)
    cls = getattr(import_module(mod), qual)
    if not is_dataclass(cls):
        raise ValueError(qual)
    kw = {}
    for name, x in m["fields"].items():
        if isinstance(x, dict):
            kw[name] = arrays[x["array"]] if "array" in x else T(x["T"])
        else:
            kw[name] = x
    t = T(m["type"])
    return Mat(str(m["name"]), t, int(m["rows"]), int(m["k"]), INT8[t], cls(**kw), int(m["n_mats"]))


def _view(mm: mmap.mmap, a: dict, size: int) -> np.ndarray:
    dt = np.dtype(a["dtype"])
    if a["dtype"] not in DTYPES:
        raise ValueError(a["dtype"])
    shape = tuple(int(s) for s in a["shape"])
    off = int(a["offset"])
    count = 1
    for s in shape:
        if s < 0:
            raise ValueError(shape)
        count *= s
    if off % ALIGN or off < 0 or off + count * dt.itemsize > size:
        raise ValueError(off)
    return np.frombuffer(mm, dt, count, off).reshape(shape)


def _prune(d: Path, room: int) -> None:
    """Delete the least recently used entries until the rest take at most `room` bytes, and
    temporary files a killed writer left an hour ago or more."""
    import time

    try:
        entries = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in d.glob("*.bin")), reverse=True)
        kept = 0
        for i, (_, size, p) in enumerate(entries):
            kept += size
            if kept > room or i >= MAX_ENTRIES - 1:  # the entry being written is one more
                p.unlink(missing_ok=True)
        for p in d.glob(".*.tmp"):
            if p.stat().st_mtime < time.time() - 3600:
                p.unlink(missing_ok=True)
    except OSError:  # another process pruned first
        pass
