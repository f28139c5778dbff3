"""The small steps of a decode step as numba kernels: RMSNorm of a few rows, SwiGLU, and the
whole attention of one new token (q/k norms, RoPE, the cache write, all heads).

In numpy each of these is a handful of ufunc calls on vectors of a few thousand floats, and
a decode step makes ~20 of them per layer: about a quarter of a 0.6B model's step went to call
overhead. Prefill's counterparts, threaded over rows and query blocks, are in prefill_cpu.py;
ops_cpu.py's numpy path (kept for --exact) matches both to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .kv_cpu import kv_axpy, kv_dot, kv_store

# reassociation for vectorised sums, but NaN and inf kept: a corrupt file's NaN must reach the
# logits, where generate() reports it (full fastmath let max() drop it)
FAST = {"reassoc", "contract", "arcp"}


@njit(cache=True, fastmath=FAST, inline="always")
def rms_norm_row(x, w, eps, out, i):
    """Row i of out = x / rms(x) * w; decode's loop and prefill's threaded one share it."""
    k = x.shape[1]
    s = np.float32(0.0)
    for j in range(k):
        s += x[i, j] * x[i, j]
    inv = np.float32(1.0) / np.float32(math.sqrt(s / np.float32(k) + eps))
    for j in range(k):
        out[i, j] = (x[i, j] * inv) * w[j]


@njit(cache=True, fastmath=FAST)
def rms_norm_rows(x, w, eps, out):
    for i in range(x.shape[0]):
        rms_norm_row(x, w, eps, out, i)


@njit(cache=True, fastmath=FAST)
def silu_mul(gu, out):
    n, half = out.shape
    for i in range(n):
        for j in range(half):
            g = gu[i, j]
            out[i, j] = g / (np.float32(1.0) + np.exp(-g)) * gu[i, j + half]


@njit(cache=True, fastmath=FAST, inline="always")
def _norm_rope(src, o, nw, eps, cos, sin, dst):
    # dst = RoPE(RMSNorm(src[o:o + D]) * nw), NeoX halves
    D = dst.shape[0]
    half = D // 2
    s = np.float32(0.0)
    for d in range(D):
        s += src[o + d] * src[o + d]
    inv = np.float32(1.0) / np.float32(math.sqrt(s / np.float32(D) + eps))
    for d in range(half):
        x1 = (src[o + d] * inv) * nw[d]
        x2 = (src[o + d + half] * inv) * nw[d + half]
        dst[d] = x1 * cos[d] - x2 * sin[d]
        dst[d + half] = x2 * cos[d] + x1 * sin[d]


@njit(parallel=True, cache=True, fastmath=FAST)
def attend_one(q, k, v, qn, kn, eps, cos, sin, kc, vc, ks, vs, li, p, out):
    """One token at position p: its k / v into layer li of the cache, then causal attention of
    every q head over positions 0..p. q (Hq D,), k, v (Hkv D,), out (Hq D,); kc, vc
    (L, Hkv, ctx, D) in any of kv_cpu's formats, ks, vs their Q8_0 scales (unused otherwise)."""
    Hkv, D = kc.shape[1], kc.shape[3]
    Hq = q.shape[0] // D
    G = Hq // Hkv
    T = p + 1
    scale = np.float32(1.0 / math.sqrt(D))
    row = np.empty(D, np.float32)
    for h in range(Hkv):
        _norm_rope(k, h * D, kn, eps, cos, sin, row)
        kv_store(row, kc, ks, li, h, p)
        kv_store(v[h * D:(h + 1) * D], vc, vs, li, h, p)
    for h in prange(Hq):
        qh = np.empty(D, np.float32)
        _norm_rope(q, h * D, qn, eps, cos, sin, qh)
        kvh = h // G
        s = np.empty(T, np.float32)
        mx = -np.inf
        for t in range(T):
            s[t] = kv_dot(qh, kc, ks, li, kvh, t) * scale
            mx = max(mx, s[t])
        tot = np.float32(0.0)
        for t in range(T):
            s[t] = np.exp(s[t] - mx)
            tot += s[t]
        acc = np.zeros(D, np.float32)
        for t in range(T):
            kv_axpy(acc, s[t], vc, vs, li, kvh, t)
        for d in range(D):
            out[h * D + d] = acc[d] / tot
