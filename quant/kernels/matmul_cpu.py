"""y = x @ W.T for a QTensor W on the CPU.

Few rows of x (decode): numba kernels that read the GGUF blocks directly, so every weight
byte is read once per token. Many rows (prefill), or formats without a kernel: dequantize a
tile of W at a time and hand it to BLAS. This is the correct, simple baseline; the tuned
kernels (repacked blocks, int8 dot products) replace the numba ones without touching callers.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from ..qtensor import QTensor

SMALL_N = 8  # rows of x up to which the direct kernels beat dequantize + BLAS
TILE_ELEMS = 1 << 22  # float32 elements dequantized at once (16 MiB)


@njit(cache=True, inline="always")
def _half(lo, hi):
    """IEEE half from its two little-endian bytes (numba has no float16 on the CPU)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = math.ldexp(np.float64(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(np.float64(m | 1024), e - 25)
    return np.float32(-v if h & 0x8000 else v)


@njit(parallel=True, cache=True, fastmath=True)
def _q8_0(x, raw, rawi, out):
    n, k = x.shape
    nb = k // 32
    for r in prange(raw.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                o = b * 34
                d = _half(raw[r, o], raw[r, o + 1])
                s = np.float32(0.0)
                for j in range(32):
                    s += x[i, b * 32 + j] * np.float32(rawi[r, o + 2 + j])
                acc += d * s
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _q4_0(x, raw, out):
    n, k = x.shape
    nb = k // 32
    for r in prange(raw.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                o = b * 18
                d = _half(raw[r, o], raw[r, o + 1])
                s = np.float32(0.0)
                for j in range(16):
                    q = raw[r, o + 2 + j]
                    s += x[i, b * 32 + j] * np.float32(np.int32(q & 15) - 8)
                    s += x[i, b * 32 + j + 16] * np.float32(np.int32(q >> 4) - 8)
                acc += d * s
            out[i, r] = acc


@njit(parallel=True, cache=True)
def _dequant_q8_0(raw, rawi, out):
    nb = out.shape[1] // 32
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d = _half(raw[r, b * 34], raw[r, b * 34 + 1])
            for j in range(32):
                out[r, b * 32 + j] = d * np.float32(rawi[r, b * 34 + 2 + j])


@njit(parallel=True, cache=True)
def _dequant_q4_0(raw, out):
    nb = out.shape[1] // 32
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d = _half(raw[r, b * 18], raw[r, b * 18 + 1])
            for j in range(16):
                q = raw[r, b * 18 + 2 + j]
                out[r, b * 32 + j] = d * np.float32(np.int32(q & 15) - 8)
                out[r, b * 32 + j + 16] = d * np.float32(np.int32(q >> 4) - 8)


def dequant(w: QTensor, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows lo:hi as float32; numba for the block formats that have a kernel, else the codec."""
    raw = w.raw[lo:hi]
    if w.type == T.Q8_0:
        out = np.empty((hi - lo, w.k), np.float32) if out is None else out
        _dequant_q8_0(raw, raw.view(np.int8), out)
        return out
    if w.type == T.Q4_0:
        out = np.empty((hi - lo, w.k), np.float32) if out is None else out
        _dequant_q4_0(raw, out)
        return out
    return w.dequant(lo, hi)


def matmul(x: np.ndarray, w: QTensor, out: np.ndarray | None = None) -> np.ndarray:
    """(n, k) float32 @ W.T -> (n, w.rows) float32."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    if x.shape[1] != w.k:
        raise ValueError(f"{w.name}: input has {x.shape[1]} features, weight expects {w.k}")
    if out is None:
        out = np.empty((n, w.rows), np.float32)
    if w.type == T.F32:
        np.matmul(x, w.raw.view(np.float32).T, out=out)
    elif n <= SMALL_N and w.type == T.Q8_0:
        _q8_0(x, w.raw, w.raw.view(np.int8), out)
    elif n <= SMALL_N and w.type == T.Q4_0:
        _q4_0(x, w.raw, out)
    else:
        step = max(1, TILE_ELEMS // w.k)
        for lo in range(0, w.rows, step):
            hi = min(w.rows, lo + step)
            np.matmul(x, dequant(w, lo, hi).T, out=out[:, lo:hi])
    return out
