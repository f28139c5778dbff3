"""numba quantizers, bit-exact with ggml's reference C (and so with gguf-py).

Every value is kept in float32 on purpose: ggml computes in float32, and one float64
intermediate is enough to change a rounding and therefore a byte. No fastmath, so LLVM
neither reassociates sums nor fuses multiply-adds. Kernels fill float32 scales and int8
quants; `quant.formats` packs them into GGUF blocks (the fp16 conversion happens there,
in numpy, which rounds to nearest-even exactly as ggml does).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)
FLT_MAX = f32(3.4028234663852886e38)


@njit(cache=True, inline="always")
def _roundf(v):
    # C roundf: half away from zero. Adding 0.5 and truncating is wrong for 0.49999997.
    a = abs(v)
    fl = np.floor(a)
    r = fl + np.floor(f32(2.0) * (a - fl))
    return -r if v < 0 else r


@njit(cache=True, inline="always")
def _nearest_int(v):
    # ggml's nearest_int adds 1.5*2^23: round half to even, like rint.
    return int(np.rint(v))


@njit(cache=True)
def fp16_round(v):
    """float32 -> nearest float16 (ties to even) -> float32, without numpy's float16."""
    a = abs(float(v))
    if a != a or a == 0.0:
        return f32(v)
    if a >= 65520.0:
        return f32(math.copysign(math.inf, v))
    m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    if e < -13:  # subnormal half: fixed quantum 2**-24
        q = math.ldexp(1.0, -24)
    else:
        q = math.ldexp(1.0, e - 11)
    r = np.rint(a / q) * q
    return f32(math.copysign(r, v))


@njit(parallel=True, cache=True)
def q8_0(x, d_out, q_out):
    """x (rows, k) float32 -> d_out (rows, k/32) float32, q_out (rows, k) int8."""
    rows, k = x.shape
    nb = k // 32
    for r in prange(rows):
        for b in range(nb):
            o = b * 32
            amax = f32(0.0)
            for j in range(32):
                a = abs(x[r, o + j])
                if a > amax:
                    amax = a
            d = amax / f32(127.0)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            d_out[r, b] = d
            for j in range(32):
                q_out[r, o + j] = np.int8(_roundf(x[r, o + j] * inv))


@njit(cache=True, inline="always")
def _signed_absmax(x, r, o):
    """The value of largest magnitude in x[r, o:o+32], sign kept (the first one on ties)."""
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(32):
        v = x[r, o + j]
        if abs(v) > amax:
            amax = abs(v)
            mx = v
    return mx


@njit(parallel=True, cache=True)
def q4_0(x, d_out, q_out):
    """x (rows, k) float32 -> d_out (rows, k/32) float32, q_out (rows, k/2) uint8 nibbles.

    Element j of a block is the low nibble of byte j, element j+16 the high nibble.
    """
    rows, k = x.shape
    nb = k // 32
    for r in prange(rows):
        for b in range(nb):
            o = b * 32
            d = _signed_absmax(x, r, o) / f32(-8.0)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            d_out[r, b] = d
            for j in range(16):
                lo = min(15, int(x[r, o + j] * inv + f32(8.5)))
                hi = min(15, int(x[r, o + 16 + j] * inv + f32(8.5)))
                q_out[r, b * 16 + j] = np.uint8(lo | (hi << 4))


@njit(parallel=True, cache=True)
def q5_0(x, d_out, q_out, qh_out):
    """ggml's quantize_row_q5_0_ref: like q4_0 with 32 levels; the fifth bits of a block's 32
    elements go to qh_out (rows, nb) uint32, bit j for element j."""
    rows, k = x.shape
    nb = k // 32
    for r in prange(rows):
        for b in range(nb):
            o = b * 32
            d = _signed_absmax(x, r, o) / f32(-16.0)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            d_out[r, b] = d
            qh = np.uint32(0)
            for j in range(16):
                lo = min(31, int(x[r, o + j] * inv + f32(16.5)))
                hi = min(31, int(x[r, o + 16 + j] * inv + f32(16.5)))
                q_out[r, b * 16 + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
                qh |= np.uint32((lo >> 4) & 1) << np.uint32(j)
                qh |= np.uint32((hi >> 4) & 1) << np.uint32(j + 16)
            qh_out[r, b] = qh


@njit(cache=True)
def _make_qx_quants(x, o, n, nmax, L, qw, qo):
    """ggml's make_qx_quants with rmse_type 1: levels L[0:n] for x[o:o+n], weighted by
    qw[qo:qo+n], or by x squared when qw is empty (no importance matrix)."""
    mx = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[o + i])
        if ax > amax:
            amax = ax
            mx = x[o + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    fnmax = f32(nmax)
    iscale = -fnmax / mx
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        xi = x[o + i]
        li = max(-nmax, min(nmax - 1, _nearest_int(iscale * xi)))
        L[i] = li + nmax
        w = qw[qo + i] if qw.shape[0] else xi * xi
        fl = f32(li)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != f32(0.0) else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + f32(0.1) * f32(step)) / mx
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            xi = x[o + i]
            fl = f32(max(-nmax, min(nmax - 1, _nearest_int(iscale * xi))))
            w = qw[qo + i] if qw.shape[0] else xi * xi
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        if suml2 > f32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[o + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(parallel=True, cache=True)
def q6_k(x, qw, d_out, sc_out, ql_out, qh_out):
    """x (rows, k) float32, k % 256 == 0 -> per 256-block: d float32, 16 int8 scales,
    128 bytes of low nibbles and 64 bytes of high bits (ggml's block_q6_K order).
    qw (k,): importance per column, used as is (ggml's q6_K_impl); empty for none."""
    rows, k = x.shape
    nb = k // 256
    for r in prange(rows):
        xr = x[r]
        L = np.empty(256, np.int32)
        Ls = np.empty(16, np.int32)
        scales = np.empty(16, np.float32)
        for b in range(nb):
            o = b * 256
            max_scale = f32(0.0)
            max_abs = f32(0.0)
            for ib in range(16):
                s = _make_qx_quants(xr, o + 16 * ib, 16, 32, Ls, qw, o + 16 * ib)
                for i in range(16):
                    L[16 * ib + i] = Ls[i]
                scales[ib] = s
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < GROUP_MAX_EPS:
                d_out[r, b] = f32(0.0)
                for i in range(16):
                    sc_out[r, b, i] = 0
                for i in range(128):
                    ql_out[r, b, i] = 0
                for i in range(64):
                    qh_out[r, b, i] = 0
                continue
            iscale = f32(-128.0) / max_scale
            d16 = fp16_round(f32(1.0) / iscale)
            d_out[r, b] = d16
            for ib in range(16):
                sc_out[r, b, ib] = np.int8(min(127, _nearest_int(iscale * scales[ib])))
            for j in range(16):
                d = d16 * f32(sc_out[r, b, j])
                if d == f32(0.0):
                    continue
                for ii in range(16):
                    li = _nearest_int(xr[o + 16 * j + ii] / d)
                    L[16 * j + ii] = max(-32, min(31, li)) + 32
            for half in range(2):
                j = half * 128
                for l in range(32):
                    q1 = L[j + l] & 0xF
                    q2 = L[j + l + 32] & 0xF
                    q3 = L[j + l + 64] & 0xF
                    q4 = L[j + l + 96] & 0xF
                    ql_out[r, b, half * 64 + l] = np.uint8(q1 | (q3 << 4))
                    ql_out[r, b, half * 64 + l + 32] = np.uint8(q2 | (q4 << 4))
                    qh_out[r, b, half * 32 + l] = np.uint8(
                        (L[j + l] >> 4)
                        | ((L[j + l + 32] >> 4) << 2)
                        | ((L[j + l + 64] >> 4) << 4)
                        | ((L[j + l + 96] >> 4) << 6)
                    )


@njit(cache=True)
def _make_qkx2_quants(x, o, w, n, nmax, L, lo, Laux, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (squared error): scale and min for x[o:o+n] with weights w,
    levels in L[lo:lo+n]; tries nstep+1 rescalings around nmax / (max - min). Returns
    (scale, -min)."""
    mn = x[o]
    mx = x[o]
    sum_w = w[0]
    sum_x = sum_w * x[o]
    for i in range(1, n):
        v = x[o + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > f32(0.0):
        mn = f32(0.0)
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return f32(0.0), -mn
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1.0) / iscale
    best = f32(0.0)
    for i in range(n):
        lv = max(0, min(nmax, _nearest_int(iscale * (x[o + i] - mn))))
        L[lo + i] = lv
        diff = scale * f32(lv) + mn - x[o + i]
        best += w[i] * (diff * diff)
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * f32(s) + f32(nmax)) / (mx - mn)
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            lv = max(0, min(nmax, _nearest_int(iscale * (x[o + i] - mn))))
            Laux[i] = lv
            wl = w[i] * f32(lv)
            sum_l += wl
            sum_l2 += wl * f32(lv)
            sum_xl += wl * x[o + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > f32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > f32(0.0):
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            cur = f32(0.0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[o + i]
                cur += w[i] * (diff * diff)
            if cur < best:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(parallel=True, cache=True)
def k_quant_levels(x, nmax, rmin, nstep, d_out, dmin_out, sc_out, L_out):
    """ggml's quantize_row_q4_K_ref (nmax 15, rmin -1, nstep 20) and q5_K_ref (31, -0.5, 15) up
    to the bit packing: x (rows, k) -> d, dmin (rows, nb) float32 (fp16-exact), sc_out
    (rows, nb, 12) packed 6-bit scales and mins, L_out (rows, nb, 256) levels 0..nmax."""
    rows, k = x.shape
    nb = k // 256
    for r in prange(rows):
        L = np.empty(256, np.int32)
        Laux = np.empty(32, np.int32)
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(nb):
            o = b * 256
            max_scale = f32(0.0)
            max_min = f32(0.0)
            for j in range(8):
                s2 = f32(0.0)
                for l in range(32):
                    v = x[r, o + 32 * j + l]
                    s2 += v * v
                av = np.float32(math.sqrt(s2 / f32(32.0)))
                for l in range(32):
                    w[l] = av + abs(x[r, o + 32 * j + l])
                sc, mn = _make_qkx2_quants(x[r], o + 32 * j, w, 32, nmax, L, 32 * j, Laux, rmin, f32(0.1), nstep)
                scales[j] = sc
                mins[j] = mn
                if sc > max_scale:
                    max_scale = sc
                if mn > max_min:
                    max_min = mn
            inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
            inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
            for t in range(12):
                sc_out[r, b, t] = 0
            for j in range(8):
                ls = min(63, _nearest_int(inv_scale * scales[j]) & 255)
                lm = min(63, _nearest_int(inv_min * mins[j]) & 255)
                if j < 4:
                    sc_out[r, b, j] = ls
                    sc_out[r, b, j + 4] = lm
                else:
                    sc_out[r, b, j + 4] = (ls & 15) | ((lm & 15) << 4)
                    sc_out[r, b, j - 4] |= (ls >> 4) << 6
                    sc_out[r, b, j] |= (lm >> 4) << 6
            d16 = fp16_round(max_scale / f32(63.0))
            dmin16 = fp16_round(max_min / f32(63.0))
            d_out[r, b] = d16
            dmin_out[r, b] = dmin16
            k_final_levels(x[r], o, nmax, d16, dmin16, sc_out[r, b], L)
            for t in range(256):
                L_out[r, b, t] = L[t]


@njit(cache=True, inline="always")
def k_final_levels(xr, o, nmax, d16, dmin16, sc12, L):
    """Q4_K / Q5_K's last step: the levels of xr[o:o+256] again, now with the fp16 super-block
    scales and the packed 6-bit sub-block scales and mins the file will hold."""
    for j in range(8):
        if j < 4:
            sc = np.int32(sc12[j]) & 63
            m = np.int32(sc12[j + 4]) & 63
        else:
            sc = (np.int32(sc12[j + 4]) & 15) | ((np.int32(sc12[j - 4]) >> 6) << 4)
            m = (np.int32(sc12[j + 4]) >> 4) | ((np.int32(sc12[j]) >> 6) << 4)
        d = d16 * f32(sc)
        if d == f32(0.0):
            continue  # keep the levels the search chose, as ggml does
        dm = dmin16 * f32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, _nearest_int((xr[o + 32 * j + ii] + dm) / d)))


@njit(parallel=True, cache=True)
def qx_1(x, nmax, d_out, m_out, L_out):
    """ggml's quantize_row_q4_1_ref (nmax 15) / q5_1_ref (nmax 31): x (rows, k) -> d, m (rows,
    k/32) float32 (value = d * level + m) and L_out (rows, k) levels 0..nmax."""
    rows, k = x.shape
    for r in prange(rows):
        for b in range(k // 32):
            o = b * 32
            mn = FLT_MAX
            mx = -FLT_MAX
            for j in range(32):
                v = x[r, o + j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / f32(nmax)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            d_out[r, b] = d
            m_out[r, b] = mn
            for j in range(32):
                t = int((x[r, o + j] - mn) * inv + f32(0.5))
                # Q4_1 clamps to 15; Q5_1 keeps the low 5 bits of its uint8, as the block does
                L_out[r, o + j] = min(15, t) if nmax == 15 else t & 31
