"""The exact path's products for few rows of x (decode), over matmul_cpu's `Packed` layout.

One flat loop per row (a scale looked up per element or byte) lets LLVM vectorise; the
32-element block loops over raw GGUF bytes did not (FEASIBILITY.md: 3-10x slower). Every weight
byte is read once per token. layouts.LAYOUTS names, per type, the `mv_*` (x (n, k) @ w.T ->
out (n, rows), n <= matmul_cpu.SMALL_N) and `ids_*` (MoE slots, experts_cpu.py) that serve it;
matmul_cpu looks them up there (`layouts.Exact`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import experts_cpu as experts
from . import lowbit_cpu as lowbit


# Two copies of one loop: the group shift must be a literal for LLVM to vectorise (a runtime
# shift measured 4x slower).
@njit(parallel=True, cache=True, fastmath=True)
def _mv_q8_0(x, q, d, out):
    n, k = x.shape
    for r in prange(q.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * (d[r, j >> 5] * np.float32(q[r, j]))
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q6_k(x, q, d, out):
    n, k = x.shape
    for r in prange(q.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * (d[r, j >> 4] * np.float32(q[r, j]))
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4(xlo, xhi, xs, q, d, o, factor, out):
    # Byte b of a row holds two elements of group b >> 4; the caller permuted x into xlo / xhi
    # to match, so the loop is flat, one scale per byte and contiguous: it vectorises (4.5x the
    # half-row layout, 25 GB/s hot). The offsets come out as sum_g o_g * sum(x in g), with
    # o = d, factor 8 for Q4_0 (q - 8) and o = the minimums, factor 1 for Q4_K.
    nbytes, ng = q.shape[1], d.shape[1]
    m, s = np.uint8(15), np.uint8(4)  # uint8 arithmetic: int literals widen the lanes to 64 bits
    for r in prange(q.shape[0]):
        a = np.float32(0.0)
        for b in range(nbytes):
            v = q[r, b]
            a += d[r, b >> 4] * (xlo[b] * np.float32(v & m) + xhi[b] * np.float32(v >> s))
        c = np.float32(0.0)
        for g in range(ng):
            c += o[r, g] * xs[g]
        out[r] = a - factor * c


_PERM: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _split_x(x: np.ndarray):
    """x in the 4-bit kernels' byte order: (low-nibble elements, high-nibble elements, group sums)."""
    k = x.shape[0]
    if k not in _PERM:
        b = np.arange(k // 2)
        lo = (b >> 4) * 32 + (b & 15)
        _PERM[k] = (lo, lo + 16)
    lo, hi = _PERM[k]
    return x[lo], x[hi], x.reshape(-1, 32).sum(1)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q8o(x, xs, q, d, o, out):
    # int8 quants with a scale and an offset per 32 (Q4_1, Q5_0, Q5_1, Q5_K): value = d q - o
    k, ng = x.shape[0], d.shape[1]
    for r in prange(q.shape[0]):
        a = np.float32(0.0)
        for j in range(k):
            a += x[j] * (d[r, j >> 5] * np.float32(q[r, j]))
        c = np.float32(0.0)
        for g in range(ng):
            c += o[r, g] * xs[g]
        out[r] = a - c


ROW_CHUNK = 64  # rows per parallel task in the 16-bit float kernels (one scratch row each)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_bf16(x, w16, out):
    # bf16 -> f32 is a 16-bit shift; numba cannot reinterpret a scalar, so widen a row into
    # a uint32 scratch row and read it back through a float32 view
    n, k = x.shape
    R = w16.shape[0]
    for c in prange((R + ROW_CHUNK - 1) // ROW_CHUNK):
        u = np.empty(k, np.uint32)
        f = u.view(np.float32)
        for r in range(c * ROW_CHUNK, min(R, (c + 1) * ROW_CHUNK)):
            for j in range(k):
                u[j] = np.uint32(w16[r, j]) << np.uint32(16)
            for i in range(n):
                acc = np.float32(0.0)
                for j in range(k):
                    acc += x[i, j] * f[j]
                out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f32(x, w, out):
    # numpy's BLAS is pinned to one thread (threads.py): decode's F32 products go here
    n, k = x.shape
    for r in prange(w.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * w[r, j]
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f16(x, w16, out, lut):
    n, k = x.shape
    for r in prange(w16.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * lut[w16[r, j]]
            out[i, r] = acc


_F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# -- the products as layouts.LAYOUTS names them (Entry.exact) ------------------------------
# mv_*: x (n, k) @ w.T -> out (n, rows); ids_*: slot s = x[xi[s]] @ expert ids[s] of the stack
# w, all slots in one launch. w: a matmul_cpu.Packed, or the float types' QTensor.

def mv_q8_0(x, w, out):
    _mv_q8_0(x, w.q, w.d, out)


def mv_q6_k(x, w, out):
    _mv_q6_k(x, w.q, w.d, out)


def mv_nibbles(x, w, out, o, factor):
    """Q4_0 / Q4_K: value = d q - factor o (_mv_q4), o and factor the entry's."""
    for i in range(x.shape[0]):
        xlo, xhi, xs = _split_x(x[i])
        _mv_q4(xlo, xhi, xs, w.q, w.d, o, factor, out[i])


def mv_offsets(x, w, out):
    """int8 quants with a scale and an offset per 32 (Q4_1, Q5_0, Q5_1, Q5_K's exact repack)."""
    for i in range(x.shape[0]):
        _mv_q8o(x[i], x[i].reshape(-1, 32).sum(1), w.q, w.d, w.o, out[i])


def mv_q2_k(x, w, out):
    for i in range(x.shape[0]):
        lowbit.mv_q2_k(lowbit.split_x(x[i]), x[i].reshape(-1, 16).sum(1), w.q, w.d, w.o, w.sb, out[i])


def mv_q3_k(x, w, out):
    for i in range(x.shape[0]):
        lowbit.mv_q3_k(lowbit.split_x(x[i]), w.q, w.h, w.d, w.sb, out[i])


def mv_f32(x, w, out):
    _mv_f32(x, w.raw.view(np.float32), out)


def mv_bf16(x, w, out):
    _mv_bf16(x, w.raw.view(np.uint16), out)


def mv_f16(x, w, out):
    _mv_f16(x, w.raw.view(np.uint16), out, _F16_LUT)


def ids_q8_0(x, w, ids, xi, out):
    experts.mv_q8_0_ids(x, xi, ids, w.rows, w.q, w.d, out)


def ids_q6_k(x, w, ids, xi, out):
    experts.mv_q6_k_ids(x, xi, ids, w.rows, w.q, w.d, out)


def ids_nibbles(x, w, ids, xi, out, o, factor):
    parts = [_split_x(row) for row in x]
    xlo, xhi, xs = (np.stack([p[i] for p in parts]) for i in range(3))
    experts.mv_q4_ids(xlo, xhi, xs, xi, ids, w.rows, w.q, w.d, o, factor, out)


def ids_offsets(x, w, ids, xi, out):
    experts.mv_q8o_ids(x, x.reshape(x.shape[0], -1, 32).sum(2), xi, ids, w.rows, w.q, w.d, w.o, out)
