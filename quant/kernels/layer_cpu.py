"""The small steps of a decode step as numba kernels: RMSNorm of a few rows, SwiGLU, and the
whole attention of the new tokens of a decode step (q/k norms, RoPE, the cache write, all heads).

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
def attend_rows(q, k, v, qn, kn, eps, cos, sin, kc, vc, ks, vs, li, slots, ps, out):
    """One new token per row i, at position ps[i] of pool slot slots[i]: its k / v into layer
    li of that slot's cache, then causal attention of every q head over positions 0..ps[i].
    q (n, Hq D), k, v (n, Hkv D), cos, sin (n, D / 2), out (n, Hq D); kc, vc (slots, L, Hkv,
    ctx, D) in any of kv_cpu's formats, ks, vs their Q8_0 scales (one unused slot otherwise).
    A lone decode step is one row of a pool of one: every row runs the same code, so a batched
    step's row equals the lone step's bit for bit. Threads split (row, head) pairs."""
    n, Hkv, D = q.shape[0], kc.shape[2], kc.shape[4]
    Hq = q.shape[1] // D
    G = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(D))
    row = np.empty(D, np.float32)
    for i in range(n):
        s, p = slots[i], ps[i]
        si = min(s, ks.shape[0] - 1)
        for h in range(Hkv):
            _norm_rope(k[i], h * D, kn, eps, cos[i], sin[i], row)
            kv_store(row, kc[s], ks[si], li, h, p)
            kv_store(v[i, h * D:(h + 1) * D], vc[s], vs[si], li, h, p)
    for ih in prange(n * Hq):
        i, h = ih // Hq, ih % Hq
        s, T = slots[i], ps[i] + 1
        si = min(s, ks.shape[0] - 1)
        kcs, vcs, kss, vss = kc[s], vc[s], ks[si], vs[si]
        qh = np.empty(D, np.float32)
        _norm_rope(q[i], h * D, qn, eps, cos[i], sin[i], qh)
        kvh = h // G
        sc = np.empty(T, np.float32)
        mx = -np.inf
        for t in range(T):
            sc[t] = kv_dot(qh, kcs, kss, li, kvh, t) * scale
            mx = max(mx, sc[t])
        tot = np.float32(0.0)
        for t in range(T):
            sc[t] = np.exp(sc[t] - mx)
            tot += sc[t]
        acc = np.zeros(D, np.float32)
        for t in range(T):
            kv_axpy(acc, sc[t], vcs, vss, li, kvh, t)
        for d in range(D):
            out[i, h * D + d] = acc[d] / tot
