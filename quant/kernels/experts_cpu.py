"""MoE decode: the selected experts' products in one launch per matrix stack.

Token by token, a MoE layer multiplies k experts' small matrices (8 of 128 in Qwen3-30B-A3B);
one launch per expert and matrix is ~16 launches a layer whose fixed costs rival the work.
Here output slot s multiplies x[xi[s]] by expert ids[s] of the stack, all slots' rows in one
parallel loop, with the dense kernels' inner loops (matmul_cpu.py). Prefill keeps grouping the
tokens by expert (each expert's weights read once for all its tokens).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


# Two copies of one loop, as in matmul_cpu: the group shift must be a literal to vectorise
@njit(parallel=True, cache=True, fastmath=True)
def mv_q8_0_ids(x, xi, ids, rows, q, d, out):
    k = x.shape[1]
    for t in prange(ids.shape[0] * rows):
        s, r = t // rows, t % rows
        row, xv = ids[s] * rows + r, x[xi[s]]  # 1-D views: the inner loops vectorise as the dense ones
        qr, dr = q[row], d[row]
        acc = np.float32(0.0)
        for j in range(k):
            acc += xv[j] * (dr[j >> 5] * np.float32(qr[j]))
        out[s, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def mv_q6_k_ids(x, xi, ids, rows, q, d, out):
    k = x.shape[1]
    for t in prange(ids.shape[0] * rows):
        s, r = t // rows, t % rows
        row, xv = ids[s] * rows + r, x[xi[s]]
        qr, dr = q[row], d[row]
        acc = np.float32(0.0)
        for j in range(k):
            acc += xv[j] * (dr[j >> 4] * np.float32(qr[j]))
        out[s, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def mv_q8o_ids(x, xs, xi, ids, rows, q, d, o, out):
    # int8 + scale + offset per 32 (Q4_1, Q5_0, Q5_1, Q5_K); xs: x's sums per 32
    k, ng = x.shape[1], d.shape[1]
    for t in prange(ids.shape[0] * rows):
        s, r = t // rows, t % rows
        row, xr = ids[s] * rows + r, xi[s]
        xv, qr, dr = x[xr], q[row], d[row]
        a = np.float32(0.0)
        for j in range(k):
            a += xv[j] * (dr[j >> 5] * np.float32(qr[j]))
        c = np.float32(0.0)
        for g in range(ng):
            c += o[row, g] * xs[xr, g]
        out[s, r] = a - c


@njit(parallel=True, cache=True, fastmath=True)
def mv_q4_ids(xlo, xhi, xs, xi, ids, rows, q, d, o, factor, out):
    # Q4_0 / Q4_K nibbles, x permuted per row of x as matmul_cpu._split_x does
    nbytes, ng = q.shape[1], d.shape[1]
    m, sh = np.uint8(15), np.uint8(4)
    for t in prange(ids.shape[0] * rows):
        s, r = t // rows, t % rows
        row, xr = ids[s] * rows + r, xi[s]
        lo, hi, qr, dr = xlo[xr], xhi[xr], q[row], d[row]
        a = np.float32(0.0)
        for b in range(nbytes):
            v = qr[b]
            a += dr[b >> 4] * (lo[b] * np.float32(v & m) + hi[b] * np.float32(v >> sh))
        c = np.float32(0.0)
        for g in range(ng):
            c += o[row, g] * xs[xr, g]
        out[s, r] = a - factor * c
