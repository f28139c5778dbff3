"""Causal attention over the KV cache as numba kernels: prefill's in blocks, decode's split along the keys.

Both read the cache in its own format (f32, f16 or q8_0, kv_cpu.py), keep no score matrix
larger than a tile or chunk, and read every key and value from memory once for the G query
heads of its KV head (GQA), not once per query head.

- `attend` (prefill): one job per (KV head, block of BQ query tokens), threads over jobs; it
  walks the keys in float32 tiles of BK with an online softmax (running max and sum, the
  accumulator rescaled when the max grows); the tile's rows are the G heads x the block's tokens.
- `attend_rows` (decode, one new token per row): flash-decoding. Each (row, KV head) splits its
  keys into chunks of CH; one job per chunk keeps its own max, sum and accumulator per query
  head, and a second pass merges a head's chunks in order. A token at depth 16K is 64 chunks
  per KV head, so all cores work on it whatever the head count. The chunks depend only on the token's
  position, never on the thread count or on the other rows of a batch: a batched row equals
  the lone step bit for bit, and one thread gives what two give. Over a q8_0 cache a job's
  scores are llama.cpp's: q quantized to Q8_0 and integer dots per block (kv_cpu.kv_scores),
  its values accumulated a whole block at a time (kv_values); 4.5-6x the per-value scale
  loops it replaced, and faster than f16 (it reads half the bytes).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .kv_cpu import kv_load, kv_scores, kv_store, kv_values
from .layer_cpu import FAST, _norm_rope
from .prefill_cpu import _exp

BQ = 32  # query tokens per prefill job: with G heads per KV head, G * BQ rows share each key tile
BK = 32  # keys per tile: a tile's K and V (32 KB as float32 at D 128) stay in L1 while every row
         # passes over them; 64 put them in L2 (prefill attention 4096 deep, 512 tokens: 1.3x slower)
CH = 256  # keys per decode job: 64 chunks a KV head at depth 16K, room for any thread count


def _exp_for(c, x):
    """e**x (x <= 0) in decode's chunk softmax, by the cache's format."""


@overload(_exp_for, inline="always")
def _exp_for_ol(c, x):
    if c.dtype == types.int8:
        # q8_0 (whose numerics changed with its integer dots anyway): prefill's vectorisable
        # e**x, float32-accurate; numba's np.exp is a libm call per score, ~10% of a q8_0
        # layer at 4096-16384 keys once the dots were fast
        return lambda c, x: _exp(x)
    return lambda c, x: np.exp(x)  # f32 / f16 keep their bits


@njit(cache=True, fastmath=FAST, inline="always")
def _tile(qs, R, c, K, V, b, first, t0, S, m, tot, acc, scale):
    """Rows 0..R of qs (query heads x c tokens; row r is the token at position first + r % c)
    against keys t0..t0 + b (float32 tiles K, V): the causal scores, the running max m and sum
    tot, and acc += softmax weights x V, rescaled when a row's max grows. Two rows by four keys
    at a time, the scores into S (R, BK) and then the weighted values, so each load of a key or
    value vector serves two rows and each of a query row or accumulator four keys (512 tokens
    1024-4096 deep: 1.1x for the scores', 1.24x for the values' pairing, over one row at a time)."""
    D = K.shape[1]
    r = 0
    while r < R:  # scores two rows at a time: each key vector's load serves both
        # the token at position P sees keys 0..P
        la = max(0, min(b, first + r % c + 1 - t0))
        lb = max(0, min(b, first + (r + 1) % c + 1 - t0)) if r + 1 < R else 0
        both = min(la, lb)
        t = 0
        while t + 4 <= both:
            a0 = a1 = a2 = a3 = np.float32(0.0)
            b0 = b1 = b2 = b3 = np.float32(0.0)
            for d in range(D):
                x, y = qs[r, d], qs[r + 1, d]
                k0, k1, k2, k3 = K[t, d], K[t + 1, d], K[t + 2, d], K[t + 3, d]
                a0 += x * k0
                a1 += x * k1
                a2 += x * k2
                a3 += x * k3
                b0 += y * k0
                b1 += y * k1
                b2 += y * k2
                b3 += y * k3
            S[r, t], S[r, t + 1], S[r, t + 2], S[r, t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            S[r + 1, t], S[r + 1, t + 1], S[r + 1, t + 2], S[r + 1, t + 3] = b0 * scale, b1 * scale, b2 * scale, b3 * scale
            t += 4
        for q in range(r, min(r + 2, R)):
            lq = la if q == r else lb
            u = t
            while u + 4 <= lq:
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(D):
                    x = qs[q, d]
                    a0 += x * K[u, d]
                    a1 += x * K[u + 1, d]
                    a2 += x * K[u + 2, d]
                    a3 += x * K[u + 3, d]
                S[q, u], S[q, u + 1], S[q, u + 2], S[q, u + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
                u += 4
            for w in range(u, lq):
                a = np.float32(0.0)
                for d in range(D):
                    a += qs[q, d] * K[w, d]
                S[q, w] = a * scale
        r += 2
    for r in range(R):  # the online softmax, row by row
        lim = min(b, first + r % c + 1 - t0)
        if lim <= 0:
            continue
        s = S[r]
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
    r = 0
    while r < R:
        la = max(0, min(b, first + r % c + 1 - t0))
        lb = max(0, min(b, first + (r + 1) % c + 1 - t0)) if r + 1 < R else 0
        both = min(la, lb)
        t = 0
        while t + 4 <= both:  # two rows share each value vector's load
            e0, e1, e2, e3 = S[r, t], S[r, t + 1], S[r, t + 2], S[r, t + 3]
            f0, f1, f2, f3 = S[r + 1, t], S[r + 1, t + 1], S[r + 1, t + 2], S[r + 1, t + 3]
            for d in range(D):
                v0, v1, v2, v3 = V[t, d], V[t + 1, d], V[t + 2, d], V[t + 3, d]
                acc[r, d] += (e0 * v0 + e1 * v1) + (e2 * v2 + e3 * v3)
                acc[r + 1, d] += (f0 * v0 + f1 * v1) + (f2 * v2 + f3 * v3)
            t += 4
        for q in range(r, min(r + 2, R)):  # what one row sees past the other (the diagonal)
            lq = la if q == r else lb
            u = t
            while u + 4 <= lq:
                e0, e1, e2, e3 = S[q, u], S[q, u + 1], S[q, u + 2], S[q, u + 3]
                for d in range(D):
                    acc[q, d] += (e0 * V[u, d] + e1 * V[u + 1, d]) + (e2 * V[u + 2, d] + e3 * V[u + 3, d])
                u += 4
            for w in range(u, lq):
                e0 = S[q, w]
                for d in range(D):
                    acc[q, d] += e0 * V[w, d]
        r += 2


@njit(parallel=True, cache=True, fastmath=FAST)
def attend(q, kc, vc, ks, vs, li, p, out):
    """Causal attention of tokens p..p+n over the cache's positions 0..p+n of layer li.
    q (Hq, n, D) after norm and RoPE; out (n, Hq D). One job per (KV head, block of BQ query
    tokens), threads over jobs; per job, the G query heads of the KV head and the block's
    tokens are G * BQ rows that share each tile of BK keys (read from the cache once per job)."""
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
        qs = np.empty((R, D), np.float32)
        acc = np.zeros((R, D), np.float32)
        m = np.full(R, -np.inf, np.float32)
        tot = np.zeros(R, np.float32)
        for r in range(R):
            for d in range(D):
                qs[r, d] = q[h * G + r // c, s0 + r % c, d]
        K = np.empty((BK, D), np.float32)
        V = np.empty((BK, D), np.float32)
        s = np.empty((R, BK), np.float32)
        end = p + s0 + c  # keys 0..end: up to the block's last token
        for t0 in range(0, end, BK):
            b = min(end, t0 + BK) - t0
            for t in range(b):
                kv_load(K[t], kc, ks, li, h, t0 + t)
                kv_load(V[t], vc, vs, li, h, t0 + t)
            _tile(qs, R, c, K, V, b, p + s0, t0, s, m, tot, acc, scale)
        for r in range(R):
            o = (h * G + r // c) * D
            # scale after the dot, divide at the end, as decode: by one reciprocal in a local.
            # `acc / tot[r]` in the loop left it to LLVM: its vector loop hoisted the reciprocal
            # (arcp), its scalar fallback (taken when a run-time overlap check of out against
            # the scratch fails, by where malloc put them) divided, 1 ulp apart: one call, two
            # answers (test_prefill_kernels' ..._does_not_depend_on_where_its_arrays_lie)
            inv = np.float32(1.0) / tot[r]
            for d in range(D):
                out[s0 + r % c, o + d] = acc[r, d] * inv


@njit(parallel=True, cache=True, fastmath=FAST)
def attend_rows(q, k, v, qn, kn, eps, cos, sin, kc, vc, ks, vs, li, slots, ps, out):
    """One new token per row i, at position ps[i] of pool slot slots[i]: its k / v into layer
    li of that slot's cache, then causal attention of every q head over positions 0..ps[i].
    q (n, Hq D), k, v (n, Hkv D), cos, sin (n, D / 2), out (n, Hq D); kc, vc (slots, L, Hkv,
    ctx, D) in any of kv_cpu's formats, ks, vs their Q8_0 scales (one unused slot otherwise).
    A lone decode step is one row of a pool of one.

    Jobs are (row, KV head, chunk of CH keys). A job computes a plain softmax over its chunk
    (scores, max, exponentials, sum, the weighted values) for the G query heads of its KV head,
    straight from the cache rows: each key row, then each value row, is read once and serves
    the G heads from L1, so the cache streams from memory once per token, not G times. Then
    every (row, q head) merges its chunks in order. Straight from the cache rather than through
    prefill's float32 tiles: at G = 2 a tile's conversion and copy cost more than they save
    (1 thread, f16, 16K keys: 10.9 ms a layer straight, 18.7 tiled)."""
    n, Hkv, D = q.shape[0], kc.shape[2], kc.shape[4]
    Hq = q.shape[1] // D
    G = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(D))
    row = np.empty(D, np.float32)
    first = np.zeros(n + 1, np.int64)  # row i's jobs are first[i]..first[i + 1]
    for i in range(n):
        s, p = slots[i], ps[i]
        si = min(s, ks.shape[0] - 1)
        for h in range(Hkv):
            _norm_rope(k[i], h * D, kn, eps, cos[i], sin[i], row)
            kv_store(row, kc[s], ks[si], li, h, p)
            kv_store(v[i, h * D:(h + 1) * D], vc[s], vs[si], li, h, p)
        first[i + 1] = first[i] + Hkv * (p // CH + 1)
    J = first[n]
    pm = np.empty((J, G), np.float32)
    pt = np.empty((J, G), np.float32)
    pacc = np.zeros((J, G, D), np.float32)
    for j in prange(J):
        i = 0
        while first[i + 1] <= j:
            i += 1
        s, p = slots[i], ps[i]
        si = min(s, ks.shape[0] - 1)
        kcs, vcs, kss, vss = kc[s], vc[s], ks[si], vs[si]
        nc = p // CH + 1
        h, ch = (j - first[i]) // nc, (j - first[i]) % nc
        t0, t1 = ch * CH, min(p + 1, (ch + 1) * CH)
        qh = np.empty((G, D), np.float32)
        for g in range(G):
            _norm_rope(q[i], (h * G + g) * D, qn, eps, cos[i], sin[i], qh[g])
        sc = np.empty((G, t1 - t0), np.float32)
        mx = np.full(G, -np.inf, np.float32)
        kv_scores(qh, kcs, kss, li, h, t0, t1, scale, sc, mx)
        for g in range(G):
            tot = np.float32(0.0)
            for t in range(t1 - t0):
                sc[g, t] = _exp_for(kcs, sc[g, t] - mx[g])
                tot += sc[g, t]
            pm[j, g], pt[j, g] = mx[g], tot
        kv_values(sc, vcs, vss, li, h, t0, t1, pacc[j])
    for ih in prange(n * Hq):
        i, hq = ih // Hq, ih % Hq
        g = hq % G
        nc = ps[i] // CH + 1
        j0 = first[i] + (hq // G) * nc
        mx = -np.inf
        for c in range(nc):
            mx = max(mx, pm[j0 + c, g])
        # one chunk: weight exp(0) = 1 exactly, so this is acc / tot as an unsplit softmax gives
        tot = np.float32(0.0)
        o = np.zeros(D, np.float32)
        for c in range(nc):
            w = np.exp(pm[j0 + c, g] - mx)
            tot += w * pt[j0 + c, g]
            for d in range(D):
                o[d] += w * pacc[j0 + c, g, d]
        inv = np.float32(1.0) / tot  # as attend: one reciprocal, whichever loop LLVM runs
        for d in range(D):
            out[i, hq * D + d] = o[d] * inv
