"""The KV cache: the keys and values of every layer, KV head and position, kept as f32, f16 or
q8_0 (ggml's Q8_0: 32 int8 quants and one float16 scale per 32 values of a head).

f16 is the default, as in llama.cpp: half the memory of f32 for logits that move by float16
rounding (tests/test_kv_cache.py measures it against f32). q8_0 takes 34 bytes per 32 values,
about a quarter of f32. Its scales are float16 as in ggml, so a cache block is ggml's block
byte for byte, and its 2-byte scales cost 6% where float32 ones would cost 12%. The CUDA
backend keeps the same three types, and the same bytes for finite values (f16 as float16
device arrays rather than uint16 bits: ops_cuda.cache_alloc; NaN's payload is the hardware's).
The formats' kernels live in quant/kernels/kv_cpu.py, and in quant/kernels/cuda.py for the GPU.
"""

from __future__ import annotations

import mmap

import numpy as np

from quant.kernels.kv_cpu import read_rows, write_rows

from ..errors import Qwen3CliError

CACHE_TYPES = ("f32", "f16", "q8_0")
DEFAULT = {"cpu": "f16", "cuda": "f16"}  # what a backend gets when no type is asked for (llama.cpp's)
QK = 32  # values per Q8_0 block
_ELEMENT = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}  # f16 as its bits (see kv_cpu.py)


class CacheTypeError(Qwen3CliError):
    """A KV cache type this model or backend cannot have."""


def check_type(cache_type: str | None, head_dim: int, backend: str = "cpu") -> str:
    """The cache type to use: the backend's default for None (f16 on both); refuses unknown
    types, and q8_0 for heads that are not whole blocks of 32 (on every backend)."""
    t = DEFAULT.get(backend, "f16") if cache_type is None else cache_type
    if t not in CACHE_TYPES:
        raise CacheTypeError(f"unknown KV cache type {t!r}: use one of {', '.join(CACHE_TYPES)}")
    if t == "q8_0" and head_dim % QK:
        raise CacheTypeError(f"a q8_0 KV cache needs a head size that is a multiple of {QK}; "
                             f"this model's is {head_dim}: use f16 or f32")
    return t


def row_nbytes(cache_type: str, head_dim: int) -> int:
    """Bytes of one head's keys (or values) at one position."""
    if cache_type == "q8_0":
        return head_dim + 2 * (head_dim // QK)
    return head_dim * np.dtype(_ELEMENT[cache_type]).itemsize


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeroed memory whose pages appear as they are first written, in small pages: each
    (layer, head) row of the cache is touched a few KB at a time, and with transparent huge
    pages every first touch would zero 2 MB (measured: 2.1 s for a 128-token prompt on the
    0.6B shape at ctx 8192, against 0.03 s with 4 KB pages)."""
    count = int(np.prod(shape))
    try:
        m = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
    except (OSError, ValueError):
        return np.zeros(shape, dtype)
    return np.frombuffer(m, dtype, count).reshape(shape)


_NO_SCALES = np.zeros((1, 1, 1, 1), np.uint16)  # what the kernels are given for f32 / f16 caches


class KVCache:
    """k, v (n_layers, n_kv, ctx, head_dim) in the type's element; for q8_0 ks, vs
    (n_layers, n_kv, ctx, head_dim // 32) hold the scales' float16 bits. `alloc(shape, dtype)`
    makes the arrays (the CUDA backend allocates on the device).

    Every cache is slot `slot` of a pool, `pool` = (k, v, ks, vs) with a leading slot axis:
    `pooled` makes several caches in one (a batch's, serve --parallel), so one attention
    kernel reaches all their rows; a lone cache is a pool of one (views, no copy)."""

    rope_offset = 0  # RoPE position less row index of the rows written from now on (Model.skip_positions)

    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int, cache_type: str = "f32",
                 alloc=lazy_zeros, slots: int = 0):
        shape = (max(slots, 1), n_layers, n_kv, ctx, head_dim)
        self.type = cache_type
        k, v = alloc(shape, _ELEMENT[cache_type]), alloc(shape, _ELEMENT[cache_type])
        if cache_type == "q8_0":
            ks = alloc(shape[:4] + (head_dim // QK,), np.uint16)
            vs = alloc(shape[:4] + (head_dim // QK,), np.uint16)
        else:
            ks = vs = _NO_SCALES[None]
        self.pool, self.slot = (k, v, ks, vs), 0
        self._at(0)
        self.ctx = ctx
        self.n = 0  # positions filled

    def _at(self, slot: int) -> None:
        k, v, ks, vs = self.pool
        self.slot, self.k, self.v = slot, k[slot], v[slot]
        self.ks, self.vs = (ks[slot], vs[slot]) if self.type == "q8_0" else (_NO_SCALES, _NO_SCALES)

    @classmethod
    def pooled(cls, n: int, n_layers: int, n_kv: int, ctx: int, head_dim: int, cache_type: str = "f32",
               alloc=lazy_zeros) -> list["KVCache"]:
        """n caches over one pool (pages appear as each slot's positions are first written)."""
        first = cls(n_layers, n_kv, ctx, head_dim, cache_type, alloc, slots=n)
        out = [first]
        for s in range(1, n):
            c = object.__new__(cls)
            c.type, c.pool, c.ctx, c.n = cache_type, first.pool, ctx, 0
            c._at(s)
            out.append(c)
        return out

    def truncate(self, n: int) -> None:
        """Forget everything after the first n positions (to reuse a shared prefix)."""
        self.n = min(self.n, n)

    def write(self, li: int, p: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (n_kv, n, head_dim) float32 into layer li at positions p..p+n."""
        n = k.shape[1]
        if self.type == "f32":
            self.k[li, :, p:p + n] = k
            self.v[li, :, p:p + n] = v
            return
        write_rows(np.ascontiguousarray(k, np.float32), self.k, self.ks, li, p)
        write_rows(np.ascontiguousarray(v, np.float32), self.v, self.vs, li, p)

    def read(self, li: int, h: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of layer li, KV head h, positions 0..T as float32 (T, head_dim):
        views of an f32 cache, converted copies otherwise."""
        if self.type == "f32":
            return self.k[li, h, :T], self.v[li, h, :T]
        D = self.k.shape[3]
        K, V = np.empty((T, D), np.float32), np.empty((T, D), np.float32)
        read_rows(self.k, self.ks, li, h, K)
        read_rows(self.v, self.vs, li, h, V)
        return K, V
