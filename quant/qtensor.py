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
