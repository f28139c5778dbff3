"""Split GGUF files, as llama.cpp's `llama-gguf-split` writes them: `NAME-00001-of-00003.gguf`
and its siblings, each a whole GGUF file with `split.no`, `split.count` and (on every part)
`split.tensors.count`; the first part carries the model's metadata, every part some tensors.

`open_gguf` opens a plain file or any part of a split one; a split model is a `SplitGGUF`,
which answers as one `GGUFFile` does (metadata, tensors, raw, release_pages, close), so the
loader never knows. Parts come from strangers like whole files: a missing, foreign, duplicated
or renumbered part is a GGUFFormatError naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValue, GGUFValueType as VT, Keys

from .errors import GGUFFormatError
from .gguf_file import GGUFFile, TensorInfo

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_PARTS = 9999  # what the five-digit names hold with room; a header claiming more is corrupt


def part_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's name for part `no` (1-based) of `count`."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def part_paths(path: str | os.PathLike) -> list[Path] | None:
    """All parts' paths when `path` is named as one part of a split file, else None."""
    p = Path(path)
    m = PART_NAME.match(p.name)
    if m is None or int(m["count"]) < 1:
        return None
    count = int(m["count"])
    return [p.with_name(part_name(m["prefix"], i, count)) for i in range(1, count + 1)]


def _int(g: GGUFFile, key: str) -> int | None:
    v = g.metadata.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise GGUFFormatError(f"{g.path}: {key!r} must be a whole number, got {type(v).__name__}")
    return int(v)


class SplitGGUF:
    """The parts of one split GGUF model, read as one file."""

    def __init__(self, parts: list[GGUFFile]):
        self.parts = parts
        first = parts[0]
        self.path = first.path
        self.size = sum(g.size for g in parts)
        self.alignment = first.alignment
        self.metadata: dict[str, Any] = first.metadata
        self.value_types = first.value_types
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, GGUFFile] = {}
        for g in parts:
            for name, t in g.tensors.items():
                if name in self._owner:
                    raise GGUFFormatError(f"{g.path}: tensor {name!r} is also in {self._owner[name].path.name}")
                self.tensors[name] = t
                self._owner[name] = g
        want = _int(first, SPLIT_TENSORS)
        if want is not None and want != len(self.tensors):
            raise GGUFFormatError(f"{first.path}: the split says {want} tensors, its {len(parts)} parts hold "
                                  f"{len(self.tensors)}")

    def raw(self, name: str) -> np.ndarray:
        return self._owner[name].raw(name)

    def release_pages(self, name: str, rows: tuple[int, int] | None = None) -> None:
        self._owner[name].release_pages(name, rows)

    def release_header(self) -> None:
        for g in self.parts:
            g.release_header()

    def close(self) -> None:
        for g in self.parts:
            g.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile | SplitGGUF:
    """A GGUF file, or all parts of the split file that `path` is one part of."""
    g = GGUFFile(path)
    count = _int(g, SPLIT_COUNT)
    if count is None or count == 1 and part_paths(path) is None:
        return g
    if not 1 <= count <= MAX_PARTS:
        g.close()
        raise GGUFFormatError(f"{g.path}: {SPLIT_COUNT!r} is {count}")
    paths = part_paths(path)
    if paths is None or len(paths) != count:
        g.close()
        raise GGUFFormatError(f"{g.path}: part of a {count}-part split file, but not named "
                              f"NAME-0000K-of-{count:05d}.gguf, so its other parts cannot be found")
    opened: list[GGUFFile] = []
    try:
        for i, p in enumerate(paths):
            if p.name == g.path.name:
                part = g
            elif not p.exists():
                raise GGUFFormatError(f"{p}: missing: part {i + 1} of {count} of the split file {paths[0].name}")
            else:
                part = GGUFFile(p)
            opened.append(part)
            no, n = _int(part, SPLIT_NO), _int(part, SPLIT_COUNT)
            if no != i or n != count:  # split.no counts from 0
                raise GGUFFormatError(f"{p}: says it is part {'?' if no is None else no + 1} of "
                                      f"{'?' if n is None else n}, expected part {i + 1} of {count}")
        return SplitGGUF(opened)
    except BaseException:
        for part in opened:
            part.close()
        if g not in opened:
            g.close()
        raise


def plan_parts(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Tensor indices per part, in order: a part takes tensors while its data stays within
    max_bytes (a soft limit, as llama-gguf-split's: a bigger tensor gets a part of its own)."""
    if max_bytes < 1:
        raise ValueError(f"a split's size must be at least 1 byte, got {max_bytes}")
    parts: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if parts[-1] and used + n > max_bytes:
            parts.append([])
            used = 0
        parts[-1].append(i)
        used += n
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{len(parts)} parts: more than {MAX_PARTS}; raise the split size")
    return parts


def split_kv(no: int, count: int, n_tensors: int) -> dict[str, GGUFValue]:
    """The keys every part carries (split.no counts from 0, as llama.cpp's)."""
    return {SPLIT_NO: GGUFValue(no, VT.UINT16), SPLIT_COUNT: GGUFValue(count, VT.UINT16),
            SPLIT_TENSORS: GGUFValue(n_tensors, VT.INT32)}


SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.I)


def parse_size(text: str) -> int:
    """'50G', '500M', '2.5G' -> bytes, in powers of 1000 as llama-gguf-split counts them."""
    m = SIZE.match(text.strip())
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a size such as 500M or 50G")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2].upper() or " "))
