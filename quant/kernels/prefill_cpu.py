"""The float steps of a prefill as numba kernels over all threads: RMSNorm, SwiGLU, residual
adds, the q/k norms + RoPE + cache write of every token (the attention itself, in blocks, is
attention_cpu.py's).

numpy ran each of these on one core, several passes and temporaries per step (the q/k norms
and RoPE alone were ~10 ufunc calls a layer); here each is one pass, split over rows (or heads
x query blocks). They match the numpy path (ops_cpu.py, kept for --exact) to float32 rounding:
sums are reassociated and x / sqrt(.) becomes x * (1 / sqrt(.)).

"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .kv_cpu import _bits_f32, kv_store
from .layer_cpu import FAST, _norm_rope, rms_norm_row


@njit(cache=True, inline="always", fastmath=FAST)
def _exp(x):
    """e**x for float32 x <= 0 (a score minus its row's max, or -|g|), vectorisable where
    numba's np.exp is a libm call per value. Worked in float64: x = k ln2 + f, |f| <= ln2 / 2,
    e**f by its Taylor series to f**10 (relative error < 1e-11), times 2**k, rounded once to
    float32: the correctly rounded value, as glibc's expf gives, but where the exact one lies
    within ~1e-11 of a halfway point. The softmax of prefill and decode (attention_cpu.py)
    and the exact path's numpy (np.exp) round alike: a last-bit difference there flips 8-bit
    activations downstream (measured: a 0.8% move of the logits of a tiny q8_0 model from
    token 4 on). Below -87 the
    result is 0 (a subnormal for numpy, nothing a sum can see); NaN stays NaN."""
    y = np.float64(max(x, np.float32(-87.0)))
    kf = math.floor(y * 1.4426950408889634 + 0.5)
    kf = 0.0 if math.isnan(kf) else kf  # a NaN's exponent bits: any finite will do
    f = (y - kf * 0.6931471803691238) - kf * 1.9082149292705877e-10
    e = 1.0 / 3628800.0
    e = e * f + 1.0 / 362880.0
    e = e * f + 1.0 / 40320.0
    e = e * f + 1.0 / 5040.0
    e = e * f + 1.0 / 720.0
    e = e * f + 1.0 / 120.0
    e = e * f + 1.0 / 24.0
    e = e * f + 1.0 / 6.0
    e = e * f + 0.5
    e = e * f + 1.0
    e = e * f + 1.0
    r = np.float32(e * np.float64(_bits_f32(np.uint32(np.int32(kf) + 127) << np.uint32(23))))
    r = r if x >= np.float32(-87.0) else np.float32(0.0)
    return x if math.isnan(x) else r


@njit(parallel=True, cache=True, fastmath=FAST)
def rms_norm(x, w, eps, out):
    """out = x / rms(x) * w, rows over the threads."""
    for i in prange(x.shape[0]):
        rms_norm_row(x, w, eps, out, i)


@njit(parallel=True, cache=True, fastmath=FAST)
def silu_mul(gu, out):
    """out = silu(gate) * up of the stacked gate|up rows; the sigmoid from e**-|g| (<= 1, so
    _exp's range), which vectorises where np.exp was a libm call per value, slower than numpy's."""
    n, half = out.shape
    for i in prange(n):
        for j in range(half):
            g = gu[i, j]
            e = _exp(-abs(g))
            sig = (np.float32(1.0) if g >= np.float32(0.0) else e) / (np.float32(1.0) + e)
            out[i, j] = g * sig * gu[i, j + half]


@njit(parallel=True, cache=True, fastmath=FAST)
def add(y, x):
    """y += x (the residual stream added to a product's output, in place)."""
    n, k = y.shape
    for i in prange(n):
        for j in range(k):
            y[i, j] += x[i, j]


@njit(parallel=True, cache=True, fastmath=FAST)
def qk_rope_store(q, k, v, qn, kn, eps, cos, sin, kc, vc, ks, vs, li, p, qout):
    """Tokens p..p+n: q heads normed and rotated into qout (Hq, n, D); k heads normed, rotated
    and v, both into layer li of the cache. q (n, Hq D), k, v (n, Hkv D), cos / sin (n, D / 2)."""
    n = q.shape[0]
    Hq, D = qout.shape[0], qout.shape[2]
    Hkv = kc.shape[1]
    for i in prange(n):
        row = np.empty(D, np.float32)
        for h in range(Hq):
            _norm_rope(q[i], h * D, qn, eps, cos[i], sin[i], qout[h, i])
        for h in range(Hkv):
            _norm_rope(k[i], h * D, kn, eps, cos[i], sin[i], row)
            kv_store(row, kc, ks, li, h, p + i)
            for d in range(D):
                row[d] = v[i, h * D + d]
            kv_store(row, vc, vs, li, h, p + i)
