"""The small steps of a decode step as numba kernels: RMSNorm of a few rows, SwiGLU, and the
q/k norm + RoPE of one head that decode's attention (attention_cpu.attend_rows) applies.

In numpy each of these is a handful of ufunc calls on vectors of a few thousand floats, and
a decode step makes ~20 of them per layer: about a quarter of a 0.6B model's step went to call
overhead. Prefill's counterparts, threaded over rows and query blocks, are in prefill_cpu.py;
ops_cpu.py's numpy path (kept for --exact) matches both to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


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
