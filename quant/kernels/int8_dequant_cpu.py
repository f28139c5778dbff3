"""Exact dequantization of int8_cpu's / int8_k_cpu's layouts (Q8_0, Q4_0, Q4_K, Q6_K): embedding
rows and the fallbacks that want float32 weights (int8_q5_cpu dequantizes its own).

`dequant` / `take` undo the layouts element for element and compute gguf-py's float32
arithmetic in its order (Q8_0 / Q4_0: d * q; Q4_K: (d * sc) * q - dmin * m; Q6_K: (d * sc) * q),
so they equal `gguf.quants.dequantize` of the file's bytes bit for bit.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .int8_cpu import G, Int8Packed, _f16
from .int8_k_cpu import KPacked


@njit(parallel=True, cache=True, nogil=True)
def _deq_q8_0(q, d, ids, out):
    # q (R, k) int8; element j of block b at int8_cpu._at(b, j, ng)
    k = q.shape[1]
    nb = k // 32
    ng = nb // G
    for i in prange(ids.shape[0]):
        r = ids[i]
        for g in range(ng):
            o = g * 32 * G
            for c in range(16):
                for t in range(G):
                    dd = _f16(d, r * nb + g * G + t)
                    for e in range(2):
                        out[i, (g * G + t) * 32 + 2 * c + e] = dd * np.float32(q[r, o + c * 2 * G + 2 * t + e])
        for b in range(ng * G, nb):
            dd = _f16(d, r * nb + b)
            for j in range(32):
                out[i, b * 32 + j] = dd * np.float32(q[r, b * 32 + j])


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_0(q, d, ids, out):
    # q (R, k / 2): chunk c of a group, byte 2t + e = the file's byte 2c + e of block t
    # (elements 2c + e low, 2c + e + 16 high); tail blocks as in the file
    nb = q.shape[1] // 16
    ng = nb // G
    for i in prange(ids.shape[0]):
        r = ids[i]
        for g in range(ng):
            for c in range(8):
                for t in range(G):
                    dd = _f16(d, r * nb + g * G + t)
                    for e in range(2):
                        v = np.int32(q[r, g * 16 * G + c * 2 * G + 2 * t + e])
                        o = (g * G + t) * 32 + 2 * c + e
                        out[i, o] = dd * np.float32((v & 15) - 8)
                        out[i, o + 16] = dd * np.float32((v >> 4) - 8)
        for b in range(ng * G, nb):
            dd = _f16(d, r * nb + b)
            for j in range(16):
                v = np.int32(q[r, b * 16 + j])
                out[i, b * 32 + j] = dd * np.float32((v & 15) - 8)
                out[i, b * 32 + j + 16] = dd * np.float32((v >> 4) - 8)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_k(q, s, d, dmin, ids, out):
    # super-block b: byte 32c + 2t + e holds element 16t + 2c + e (low) and 16t + 2c + 8 + e
    # (high); s: 8 scales then 8 minimums per super-block, one per 32 elements
    nsb = d.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        for b in range(nsb):
            dd, dm = _f16(d, r * nsb + b), _f16(dmin, r * nsb + b)
            for t in range(16):
                sub = t >> 1
                a = dd * np.float32(s[r, b * 16 + sub])
                m = dm * np.float32(s[r, b * 16 + 8 + sub])
                for c in range(4):
                    for e in range(2):
                        v = np.int32(q[r, b * 128 + 32 * c + 2 * t + e])
                        o = b * 256 + 16 * t + 2 * c + e
                        out[i, o] = a * np.float32(v & 15) - m
                        out[i, o + 8] = a * np.float32(v >> 4) - m


@njit(parallel=True, cache=True, nogil=True)
def _deq_q6_k(q, s, d, ids, out):
    # super-block b: low nibbles as Q4_K's (192 bytes: 128 of nibbles, then byte
    # 128 + 32u + 2t + e holds the high bit pairs of steps 4u..4u + 3 at bits 2s)
    nsb = d.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        for b in range(nsb):
            dd = _f16(d, r * nsb + b)
            for t in range(16):
                a = dd * np.float32(s[r, b * 16 + t])
                for e in range(2):
                    for c in range(8):
                        lo = (np.int32(q[r, b * 192 + 32 * (c & 3) + 2 * t + e]) >> (4 * (c >> 2))) & 15
                        hi = (np.int32(q[r, b * 192 + 128 + 32 * (c >> 2) + 2 * t + e]) >> (2 * (c & 3))) & 3
                        out[i, b * 256 + 16 * t + 2 * c + e] = a * np.float32((lo | (hi << 4)) - 32)


def _deq_rows(w: Int8Packed | KPacked, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        out = np.empty((len(ids), w.k), np.float32)
    elif out.shape != (len(ids), w.k) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(len(ids), w.k)}, not {out.dtype} {out.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= w.rows):
        raise IndexError(f"row ids must lie in [0, {w.rows}), got {ids.min()}..{ids.max()}")
    if w.type == T.Q8_0:
        _deq_q8_0(w.q, w.d, ids, out)
    elif w.type == T.Q4_0:
        _deq_q4_0(w.q, w.d, ids, out)
    elif w.type == T.Q4_K:
        _deq_q4_k(w.q, w.s, w.d, w.dmin, ids, out)
    elif w.type == T.Q6_K:
        _deq_q6_k(w.q, w.s, w.d, ids, out)
    else:
        raise ValueError(f"no int8 layout for {w.type.name}")
    return out


def dequant(w: Int8Packed | KPacked, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows lo..hi of w as float32 (hi - lo, k), exactly gguf's dequantization of the file."""
    hi = w.rows if hi is None else hi
    if not 0 <= lo <= hi <= w.rows:
        raise IndexError(f"rows {lo}..{hi} of a {w.rows}-row matrix")
    return _deq_rows(w, np.arange(lo, hi, dtype=np.int64), out)


def take(w: Int8Packed | KPacked, ids) -> np.ndarray:
    """Rows ids of w as float32 (len(ids), k) (embedding lookup), exactly as `dequant`."""
    return _deq_rows(w, np.ascontiguousarray(ids, np.int64).reshape(-1), None)
