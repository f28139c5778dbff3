"""The float steps of a prefill as numba kernels over all threads: RMSNorm, SwiGLU, residual
adds, the q/k norms + RoPE + cache write of every token, and causal attention in blocks.

numpy ran each of these on one core, several passes and temporaries per step (the q/k norms
and RoPE alone were ~10 ufunc calls a layer); here each is one pass, split over rows (or heads
x query blocks). They match the numpy path (ops_cpu.py, kept for --exact) to float32 rounding:
sums are reassociated and x / sqrt(.) becomes x * (1 / sqrt(.)).

`attend` never holds a score matrix larger than one tile: each (KV head, query block) job walks
the keys in blocks with an online softmax (running max and sum, the accumulator rescaled when
the max grows), reading the cache in its own format (f32, f16 or q8_0, kv_cpu.py). So a 32K
prompt needs no (n, T) scores, and nothing keys-long is kept beyond the cache itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .kv_cpu import _bits_f32, kv_load, kv_store
from .layer_cpu import FAST, _norm_rope, rms_norm_row

BQ = 32  # query tokens per attention job: with G heads per KV head, G * BQ rows share each key tile
BK = 64  # keys per tile: K, V and the scores of one tile stay in L1 / L2


@njit(cache=True, inline="always", fastmath=FAST)
def _exp(x):
    """e**x for float32 x <= 0 (a score minus its row's max, or -|g|), vectorisable where
    numba's np.exp is a libm call per value. Worked in float64: x = k ln2 + f, |f| <= ln2 / 2,
    e**f by its Taylor series to f**10 (relative error < 1e-11), times 2**k, rounded once to
    float32: the correctly rounded value, as glibc's expf gives, but where the exact one lies
    within ~1e-11 of a halfway point. So prefill's softmax rounds as decode's (np.exp in
    layer_cpu.attend_one): a last-bit difference there flips 8-bit activations downstream
    (measured: a 0.8% move of the logits of a tiny q8_0 model from token 4 on). Below -87 the
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


@njit(parallel=True, cache=True, fastmath=FAST)
def attend(q, kc, vc, ks, vs, li, p, out):
    """Causal attention of tokens p..p+n over the cache's positions 0..p+n of layer li.
    q (Hq, n, D) after norm and RoPE; out (n, Hq D). One job per (KV head, block of BQ query
    tokens), threads over jobs; per job, the G query heads of the KV head and the block's
    tokens are G * BQ rows that share each tile of BK keys (read from the cache once per job).
    Keys go four at a time: one read of the query row (or the accumulator) serves four."""
    Hq, n, D = q.shape
    Hkv = kc.shape[1]
    G = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(D))
    nqb = (n + BQ - 1) // BQ
    for job in prange(Hkv * nqb):
        h = job // nqb
        qb = nqb - 1 - job % nqb  # the last blocks see the most keys: they start first
        s0 = qb * BQ
        c = min(n, s0 + BQ) - s0
        R = G * c  # row r: query head h G + r // c, token s0 + r % c
        K = np.empty((BK, D), np.float32)
        V = np.empty((BK, D), np.float32)
        qs = np.empty((R, D), np.float32)
        acc = np.zeros((R, D), np.float32)
        m = np.full(R, -np.inf, np.float32)
        tot = np.zeros(R, np.float32)
        s = np.empty(BK, np.float32)
        for r in range(R):
            for d in range(D):
                qs[r, d] = q[h * G + r // c, s0 + r % c, d]
        end = p + s0 + c  # keys 0..end: up to the block's last token
        for t0 in range(0, end, BK):
            b = min(end, t0 + BK) - t0
            for t in range(b):
                kv_load(K[t], kc, ks, li, h, t0 + t)
                kv_load(V[t], vc, vs, li, h, t0 + t)
            for r in range(R):
                lim = min(b, p + s0 + r % c + 1 - t0)  # token at position P sees keys 0..P
                if lim <= 0:
                    continue
                t = 0
                while t + 4 <= lim:
                    a0 = a1 = a2 = a3 = np.float32(0.0)
                    for d in range(D):
                        x = qs[r, d]
                        a0 += x * K[t, d]
                        a1 += x * K[t + 1, d]
                        a2 += x * K[t + 2, d]
                        a3 += x * K[t + 3, d]
                    s[t], s[t + 1], s[t + 2], s[t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
                    t += 4
                for u in range(t, lim):
                    a = np.float32(0.0)
                    for d in range(D):
                        a += qs[r, d] * K[u, d]
                    s[u] = a * scale
                mx = m[r]
                for t in range(lim):
                    mx = max(mx, s[t])
                if mx > m[r]:  # a larger max: what was summed so far shrinks by exp(old - new)
                    corr = _exp(m[r] - mx)
                    tot[r] *= corr
                    for d in range(D):
                        acc[r, d] *= corr
                    m[r] = mx
                sm = np.float32(0.0)
                for t in range(lim):
                    s[t] = _exp(s[t] - mx)
                    sm += s[t]
                tot[r] += sm
                t = 0
                while t + 4 <= lim:
                    e0, e1, e2, e3 = s[t], s[t + 1], s[t + 2], s[t + 3]
                    for d in range(D):
                        acc[r, d] += (e0 * V[t, d] + e1 * V[t + 1, d]) + (e2 * V[t + 2, d] + e3 * V[t + 3, d])
                    t += 4
                for u in range(t, lim):
                    e0 = s[u]
                    for d in range(D):
                        acc[r, d] += e0 * V[u, d]
        for r in range(R):
            o = (h * G + r // c) * D
            for d in range(D):  # as decode's attend_one: scale after the dot, divide at the end
                out[s0 + r % c, o + d] = acc[r, d] / tot[r]
