"""numba-cuda kernels: the GPU twins of the CPU path, over the same packed layouts.

Weights are the arrays of `matmul_cpu.Packed` (int8 quants with per-group scales, Q4 nibbles,
Q2_K / Q3_K 2-bit bytes) uploaded as they are, so one repacking serves both devices and the
CPU tests of the layouts cover the GPU's input too. Matrix-vector kernels give one block of TPB
threads to one (output row, input row) pair; threads stride over the row (coalesced loads) and
meet in a shared-memory tree. No warp shuffles: the simulator has none, and one code path is
what CI tests. Every product takes `ids`/`xdiv` so that MoE experts run on the device: output
row t multiplies x[t // xdiv] by matrix ids[t] of the stack (dense: ids = 0, xdiv = 1).

Small unsigned integers are widened to int32 before any shift: the simulator keeps numpy's
uint8 arithmetic, which wraps.
"""

from __future__ import annotations

import math

from numba import config, cuda, float32, int32

TPB = 8 if config.ENABLE_CUDASIM else 128  # threads per block (the simulator runs each as a Python thread)


@cuda.jit(device=True)
def _block_sum(v, sh):
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    s = TPB // 2
    while s > 0:
        if t < s:
            sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()  # sh is reused by the caller's next reduction
    return r


@cuda.jit(device=True)
def _block_max(v, sh):
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    s = TPB // 2
    while s > 0:
        if t < s:
            sh[t] = max(sh[t], sh[t + s])
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


# -- matrix x vector: out[t, r] (+)= sum_j x[t // xdiv, j] * W_ids[t][r, j] -------------------

@cuda.jit(device=True)
def _store(out, t, r, a, acc):
    # acc: add into out (the residual stream) instead of overwriting it, saving a launch
    if cuda.threadIdx.x == 0:
        if acc:
            out[t, r] += a
        else:
            out[t, r] = a


@cuda.jit
def mv_float(x, xdiv, ids, w, acc, out):
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    row, xi = ids[t] * out.shape[1] + r, t // xdiv
    sh = cuda.shared.array(TPB, float32)
    a = float32(0.0)
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        a += x[xi, j] * float32(w[row, j])
    a = _block_sum(a, sh)
    _store(out, t, r, a, acc)


@cuda.jit
def mv_i8(x, xdiv, ids, q, d, gshift, o, acc, out):
    # value = d[group] q - o[j / 32]; o has one column of zeros when the format has no offset
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    row, xi = ids[t] * out.shape[1] + r, t // xdiv
    has_o = o.shape[1] > 1
    sh = cuda.shared.array(TPB, float32)
    a = float32(0.0)
    for j in range(cuda.threadIdx.x, x.shape[1], TPB):
        w = d[row, j >> gshift] * float32(q[row, j])
        if has_o:
            w -= o[row, j >> 5]
        a += x[xi, j] * w
    a = _block_sum(a, sh)
    _store(out, t, r, a, acc)


@cuda.jit
def mv_q4(x, xdiv, ids, q, d, o, factor, acc, out):
    # byte b: elements 32 g + (b & 15) (low nibble) and + 16 (high), g = b >> 4; value = d q - factor o
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    row, xi = ids[t] * out.shape[1] + r, t // xdiv
    sh = cuda.shared.array(TPB, float32)
    a = float32(0.0)
    for b in range(cuda.threadIdx.x, q.shape[1], TPB):
        v = int32(q[row, b])
        g = b >> 4
        j = g * 32 + (b & 15)
        dg, off = d[row, g], factor * o[row, g]
        a += x[xi, j] * (dg * float32(v & 15) - off) + x[xi, j + 16] * (dg * float32(v >> 4) - off)
    a = _block_sum(a, sh)
    _store(out, t, r, a, acc)


@cuda.jit(device=True)
def _sub_block(c, j):
    return (c >> 1) * 8 + 2 * j + (c & 1)


@cuda.jit
def mv_q2_k(x, xdiv, ids, q, sc, m, sb, acc, out):
    # lowbit_cpu's layout: byte b holds elements 128 (b >> 5) + 32 j + (b & 31) at bit 2 j
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    row, xi = ids[t] * out.shape[1] + r, t // xdiv
    nc = q.shape[1] // 16
    sh = cuda.shared.array(TPB, float32)
    a = float32(0.0)
    for b in range(cuda.threadIdx.x, q.shape[1], TPB):
        v = int32(q[row, b])
        c, blk = b >> 4, b >> 6
        base = (b >> 5) * 128 + (b & 31)
        for j in range(4):
            g = blk * 16 + _sub_block(c & 3, j)
            w = sb[row, 2 * blk] * float32(int32(sc[row, j * nc + c])) * float32((v >> (2 * j)) & 3) \
                - sb[row, 2 * blk + 1] * float32(int32(m[row, g]))
            a += x[xi, base + 32 * j] * w
    a = _block_sum(a, sh)
    _store(out, t, r, a, acc)


@cuda.jit
def mv_q3_k(x, xdiv, ids, q, h, sc, sb, acc, out):
    r, t = cuda.blockIdx.x, cuda.blockIdx.y
    row, xi = ids[t] * out.shape[1] + r, t // xdiv
    nc = q.shape[1] // 16
    sh = cuda.shared.array(TPB, float32)
    a = float32(0.0)
    for b in range(cuda.threadIdx.x, q.shape[1], TPB):
        v, hb = int32(q[row, b]), int32(h[row, b])
        c = b >> 4
        base = (b >> 5) * 128 + (b & 31)
        for j in range(4):
            q3 = ((v >> (2 * j)) & 3) | (((hb >> j) & 1) << 2)
            a += x[xi, base + 32 * j] * (sb[row, b >> 6] * float32(int32(sc[row, j * nc + c])) * float32(q3 - 4))
    a = _block_sum(a, sh)
    _store(out, t, r, a, acc)


# -- the rest of a layer -------------------------------------------------------------------

@cuda.jit
def rms_norm(x, w, eps, out):
    r = cuda.blockIdx.x
    n = x.shape[1]
    sh = cuda.shared.array(TPB, float32)
    s = float32(0.0)
    for j in range(cuda.threadIdx.x, n, TPB):
        s += x[r, j] * x[r, j]
    inv = float32(1.0) / math.sqrt(_block_sum(s, sh) / float32(n) + eps)
    for j in range(cuda.threadIdx.x, n, TPB):
        out[r, j] = x[r, j] * inv * w[j]


# -- the KV cache: f32, f16 or q8_0 rows ------------------------------------------------------
# c (n_layers, n_kv, ctx, D) in the type's element (float32, float16, int8), s (..., D // 32)
# float16 scales for q8_0 and a dummy (1, 1, 1, 1) otherwise; q8 says which. One kernel serves
# every type: element stores and loads convert (float32 -> float16 rounds to nearest even, as
# numpy and the CPU cache do), and the q8 branch is uniform across a block, so it costs no
# divergence. The CPU's format code is kv_cpu.py; both hold the same bytes for the same rows.

QK = 32  # values per Q8_0 block (ggml's QK8_0)
FLT_MAX = 3.4028234663852886e38


@cuda.jit(device=True)
def _roundf(v):
    # C roundf, half away from zero, as quantize_cpu._roundf: exact for every float32 (adding
    # 0.5 and truncating is not: 0.49999997 + 0.5 rounds up to 1.0)
    a = abs(v)
    fl = math.floor(a)
    r = float32(fl + math.floor(float32(2.0) * (a - fl)))
    return -r if v < float32(0.0) else r


@cuda.jit(device=True)
def _block_scale(x, o):
    # ggml's Q8_0 scale of x[o:o + 32], as kv_cpu._block_scale: (d, 1 / d) with d = amax / 127
    # (1 / d taken as 0 for an all-zero block), or (NaN, 0) where the block holds NaN or inf
    amax = float32(0.0)
    finite = True
    for j in range(o, o + QK):
        a = abs(x[j])
        finite = finite and a <= float32(FLT_MAX)  # False for NaN too
        amax = max(amax, a)
    if not finite:
        return float32(math.nan), float32(0.0)
    d = amax / float32(127.0)
    return d, (float32(1.0) / d if d != float32(0.0) else float32(0.0))


@cuda.jit(device=True)
def _quantize_block(x, o, c, s, li, h, t, b):
    # ggml's quantize_row_q8_0_ref on x[o:o + 32] into block b of row (li, h, t), step for step
    # as kv_cpu.quantize_q8_0: d = amax / 127, q = roundf(x * (1 / d)), d kept as half; a block
    # holding NaN or inf gets a NaN scale (and zero quants), so the damage reaches the logits
    d, inv = _block_scale(x, o)
    if math.isnan(d):
        s[li, h, t, b] = d
        for j in range(QK):
            c[li, h, t, o + j] = 0
        return
    s[li, h, t, b] = d
    for j in range(QK):
        c[li, h, t, o + j] = _roundf(x[o + j] * inv)  # a whole number in -127..127: exact as int8


@cuda.jit(device=True)
def _store_row(x, c, s, q8, li, h, t):
    # x (D,) float32, written by the whole block before, into cache row (li, h, t). q8_0: one
    # thread per 32-value block (a row is one token's and need not be fast)
    if q8:
        for b in range(cuda.threadIdx.x, x.shape[0] // QK, TPB):
            _quantize_block(x, b * QK, c, s, li, h, t, b)
    else:
        for d in range(cuda.threadIdx.x, x.shape[0], TPB):
            c[li, h, t, d] = x[d]


@cuda.jit(device=True)
def _kv(c, s, q8, li, h, t, d):
    # element d of cache row (li, h, t) as float32: float16 widened exactly, q8_0 quant times
    # its block's scale
    x = float32(c[li, h, t, d])
    if q8:
        x *= float32(s[li, h, t, d >> 5])
    return x


@cuda.jit
def qkv_rope_store(q, k, v, qn, kn, eps, cos, sin, p, li, qout, kout, kc, vc, ks, vs, q8):
    # block (token i, head): q and k heads get their RMSNorm and NeoX RoPE at position p + i;
    # q lands in qout (n, Hq, D); k (through kout (n, Hkv, D): a q8_0 block needs its whole 32
    # values, which different threads rotate) and v go into the cache at layer li
    i, hh = cuda.blockIdx.x, cuda.blockIdx.y
    Hq, Hkv, D = qout.shape[1], kc.shape[1], qout.shape[2]
    half = D // 2
    pos = p + i
    sh = cuda.shared.array(TPB, float32)
    if hh >= Hq + Hkv:
        h = hh - Hq - Hkv
        _store_row(v[i, h * D:(h + 1) * D], vc, vs, q8, li, h, pos)
        return
    is_q = hh < Hq
    h = hh if is_q else hh - Hq
    src = q if is_q else k
    nw = qn if is_q else kn
    s = float32(0.0)
    for d in range(cuda.threadIdx.x, D, TPB):
        s += src[i, h * D + d] * src[i, h * D + d]
    inv = float32(1.0) / math.sqrt(_block_sum(s, sh) / float32(D) + eps)
    for d in range(cuda.threadIdx.x, half, TPB):
        x1 = src[i, h * D + d] * inv * nw[d]
        x2 = src[i, h * D + d + half] * inv * nw[d + half]
        c, sn = cos[pos, d], sin[pos, d]
        if is_q:
            qout[i, h, d] = x1 * c - x2 * sn
            qout[i, h, d + half] = x2 * c + x1 * sn
        else:
            kout[i, h, d] = x1 * c - x2 * sn
            kout[i, h, d + half] = x2 * c + x1 * sn
    if not is_q:
        cuda.syncthreads()  # the block's global writes to kout are visible to all its threads after
        _store_row(kout[i, h], kc, ks, q8, li, h, pos)


MAX_QD = 256  # the largest head_dim whose q the decode over a q8_0 cache quantizes (Qwen3's: 128)
MAX_QB = MAX_QD // QK  # its blocks (a shared array's size must be a plain constant)


@cuda.jit(device=True)
def _quantize_q(qh, i, h, scale, qs, qd):
    # decode over a q8_0 cache quantizes q as the CPU does (kv_cpu.quantize_q, as llama.cpp):
    # per 32 values d = amax / 127, q = roundf(q / d) through the float32 reciprocal, d kept
    # in float32 times the softmax's scale; a block with NaN or inf: d NaN, quants 0. One
    # thread per block, into the block's shared qs / qd
    x = qh[i, h]
    for b in range(cuda.threadIdx.x, x.shape[0] // QK, TPB):
        o = b * QK
        d, inv = _block_scale(x, o)
        if math.isnan(d):
            qd[b] = d
            for j in range(o, o + QK):
                qs[j] = 0
            continue
        qd[b] = d * scale
        for j in range(o, o + QK):
            qs[j] = int32(_roundf(x[j] * inv))
    cuda.syncthreads()


@cuda.jit
def attention(qh, kc, vc, ks, vs, q8, qq, li, p, i0, scale, scores, out):
    # block (head, query i0 + y): scores against keys 0 .. p + i (causal) into row y of the
    # scratch, softmax, weighted values; the cache read in its type (_kv). qq (decode over a
    # q8_0 cache, head_dim <= MAX_QD): q quantized, each score the sum over blocks of the exact
    # integer dot times both scales, as the CPU's decode (kv_cpu.kv_scores)
    h, y = cuda.blockIdx.x, cuda.blockIdx.y
    i = i0 + y
    Hq, D = qh.shape[1], qh.shape[2]
    kvh = h // (Hq // kc.shape[1])
    T = p + i + 1
    sh = cuda.shared.array(TPB, float32)
    qs = cuda.shared.array(MAX_QD, int32)
    qd = cuda.shared.array(MAX_QB, float32)
    if qq:
        _quantize_q(qh, i, h, scale, qs, qd)
    mx = float32(-math.inf)
    for t in range(cuda.threadIdx.x, T, TPB):
        s = float32(0.0)
        if qq:
            for b in range(D // QK):
                dot = int32(0)
                for d in range(b * QK, b * QK + QK):
                    dot += qs[d] * int32(kc[li, kvh, t, d])
                s += float32(dot) * (qd[b] * float32(ks[li, kvh, t, b]))
        else:
            for d in range(D):
                s += qh[i, h, d] * _kv(kc, ks, q8, li, kvh, t, d)
            s *= scale
        scores[h, y, t] = s
        mx = max(mx, s)
    mx = _block_max(mx, sh)
    tot = float32(0.0)
    for t in range(cuda.threadIdx.x, T, TPB):
        e = math.exp(scores[h, y, t] - mx)
        scores[h, y, t] = e
        tot += e
    tot = _block_sum(tot, sh)
    for d in range(cuda.threadIdx.x, D, TPB):
        a = float32(0.0)
        for t in range(T):
            a += scores[h, y, t] * _kv(vc, vs, q8, li, kvh, t, d)
        out[i, h * D + d] = a / tot


@cuda.jit
def silu_mul(g, u, out):
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        a = g[i, j]
        out[i, j] = a / (float32(1.0) + math.exp(-a)) * u[i, j]


@cuda.jit
def route(logits, k_used, norm, probs, ids, wts):
    # one thread per token: softmax over the experts, then the top k by repeated argmax (the
    # lowest index wins a tie, as the CPU's stable sort does)
    i = cuda.grid(1)
    if i >= logits.shape[0]:
        return
    E = logits.shape[1]
    mx = logits[i, 0]
    for e in range(1, E):
        mx = max(mx, logits[i, e])
    tot = float32(0.0)
    for e in range(E):
        probs[i, e] = math.exp(logits[i, e] - mx)
        tot += probs[i, e]
    picked = float32(0.0)
    for s in range(k_used):
        best = 0
        for e in range(1, E):
            if probs[i, e] > probs[i, best]:
                best = e
        ids[i * k_used + s] = best
        wts[i * k_used + s] = probs[i, best] / tot
        picked += probs[i, best] / tot
        probs[i, best] = float32(-1.0)
    if norm:
        for s in range(k_used):
            wts[i * k_used + s] /= picked


@cuda.jit
def weighted_sum(y, wts, k_used, acc, out):
    # out[i] (+)= sum over slots s of wts[i k + s] y[i k + s]
    i, c = cuda.grid(2)
    if i < out.shape[0] and c < out.shape[1]:
        a = float32(0.0)
        for s in range(k_used):
            a += wts[i * k_used + s] * y[i * k_used + s, c]
        if acc:
            out[i, c] += a
        else:
            out[i, c] = a
