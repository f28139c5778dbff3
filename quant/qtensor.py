"""QTensor: a weight matrix (or a stack of expert matrices) kept in its GGUF encoding.

The bytes are usually a view into the memory-mapped file: nothing is dequantized at load.
`rows` is the output dimension and `k` the input (row) length, as in torch's (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from .formats import Format, get_format


@dataclass(frozen=True)
class QTensor:
    name: str
    type: T
    rows: int
    k: int
    raw: np.ndarray  # uint8 (n_mats * rows, row_bytes)
    n_mats: int = 1

    def __post_init__(self):
        want = (self.n_mats * self.rows, self.fmt.row_bytes(self.k))
        if self.raw.shape != want:
            raise ValueError(f"{self.name}: raw bytes shaped {self.raw.shape}, expected {want}")

    @property
    def fmt(self) -> Format:
        return get_format(self.type, self.name)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def dequant(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows lo:hi as float32 (n, k)."""
        return self.fmt.decode(self.raw[lo:hi], self.k)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (an embedding lookup)."""
        return self.fmt.decode(self.raw[np.asarray(ids, np.int64)], self.k)

    def expert(self, e: int) -> "QTensor":
        return QTensor(f"{self.name}[{e}]", self.type, self.rows, self.k,
                       self.raw[e * self.rows:(e + 1) * self.rows])

    @classmethod
    def from_f32(cls, name: str, x: np.ndarray, t: T = T.F32) -> "QTensor":
        x = np.ascontiguousarray(x, np.float32)
        return cls(name, t, x.shape[0], x.shape[1], get_format(t, name).encode(x))


def stack_parts(ws: list[QTensor]) -> tuple[int, list[tuple[np.ndarray, int]]]:
    """Where the rows of ws (alike in type, k and expert count) go when stacked into one matrix
    (q|k|v), per expert for stacks (expert e: its rows of ws[0], then of ws[1], ...): the rows
    of one stacked expert, and each part's raw rows with the stacked row they start at. A
    repacking can then write each part straight into its rows, without stacking the file's
    bytes first."""
    a = ws[0]
    for w in ws:
        if w.type != a.type or w.k != a.k or w.n_mats != a.n_mats:
            raise ValueError(f"cannot stack {w.name} ({w.type.name}, k {w.k}, {w.n_mats} matrices) "
                             f"with {a.name} ({a.type.name}, k {a.k}, {a.n_mats} matrices)")
    rows = sum(w.rows for w in ws)
    if len(ws) == 1:
        return rows, [(a.raw, 0)]
    parts = []
    for e in range(a.n_mats):
        at = e * rows
        for w in ws:
            parts.append((w.raw[e * w.rows:(e + 1) * w.rows], at))
            at += w.rows
    return rows, parts


def u16(raw: np.ndarray) -> np.ndarray:
    """raw's bytes read as uint16 (a little-endian host's, as the float16 scales are read): every
    GGUF block is an even number of bytes, so each field starts on an even byte and the repacks
    can move 2-byte pairs instead of single bytes."""
    return np.ascontiguousarray(raw).view(np.uint16)
