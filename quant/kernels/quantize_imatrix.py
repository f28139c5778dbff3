"""numba quantizers weighted by an importance matrix, bit-exact with ggml's quantize_*_impl.

With an imatrix, ggml does not run the _ref quantizers at all: each row goes through a
weighted search whose weights are the column's importance times sqrt(sigma2 + x^2) (Q4_0,
Q5_0, Q4_1, Q5_1, Q4_K, Q5_K) or the importance alone (Q6_K, in quantize_cpu.q6_k). The same
float32 discipline as quantize_cpu holds: every operation in ggml's order, no float64.

qw is the importance of one row's columns, (k,) float32, shared by all rows of the call.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# ggml's make_qkx3_quants without the MAD option is make_qkx2_quants: one copy serves both
from .quantize_cpu import GROUP_MAX_EPS, _make_qkx2_quants, _make_qx_quants, _nearest_int, fp16_round, k_final_levels

f32 = np.float32


@njit(cache=True, inline="always")
def _row_sigma2(xr):
    s = f32(0.0)
    for j in range(xr.shape[0]):
        s += xr[j] * xr[j]
    return s / f32(xr.shape[0])


@njit(parallel=True, cache=True)
def qx_0(x, qw, nmax, d_out, L_out):
    """ggml's quantize_row_q4_0_impl (nmax 8) / q5_0_impl (nmax 16): x (rows, k) -> d_out
    (rows, k/32) float32, L_out (rows, k) levels 0..2*nmax-1 (value = d * (level - nmax))."""
    rows, k = x.shape
    for r in prange(rows):
        xr = x[r]
        sigma2 = _row_sigma2(xr)
        w = np.empty(32, np.float32)
        L = np.empty(32, np.int32)
        for b in range(k // 32):
            o = b * 32
            for j in range(32):
                w[j] = qw[o + j] * f32(math.sqrt(sigma2 + xr[o + j] * xr[o + j]))
            d_out[r, b] = _make_qx_quants(xr, o, 32, nmax, L, w, 0)
            for j in range(32):
                L_out[r, o + j] = L[j]


@njit(cache=True)
def _make_qp_quants(x, n, nmax, L, qw):
    """ggml's make_qp_quants: one positive scale for the n values x (sub-block scales or mins)
    with levels 0..nmax in L, weighted by qw. ggml keeps L in uint8, so a negative level wraps
    modulo 256 and later arithmetic sees the wrapped value: so does this."""
    mx = f32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i]) & 255
    scale = f32(1.0) / iscale
    best = f32(0.0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = (f32(0.1) * f32(s) + f32(nmax)) / mx
        scale_s = f32(1.0) / iscale_s
        mse = f32(0.0)
        for i in range(n):
            li = min(nmax, _nearest_int(iscale_s * x[i]))
            diff = x[i] - scale_s * f32(li)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_s
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        li = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = li & 255
        sumlx += qw[i] * x[i] * f32(li)
        suml2 += qw[i] * f32(li) * f32(li)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fl = f32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > f32(0.0) and sl2 > f32(0.0):
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 255
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > f32(0.0) else f32(0.0)


@njit(parallel=True, cache=True)
def qx_1(x, qw, nmax, d_out, m_out, L_out):
    """ggml's quantize_row_q4_1_impl (nmax 15) / q5_1_impl (nmax 31): x (rows, k) -> d, m
    (rows, k/32) float32 (value = d * level + m) and L_out (rows, k) levels 0..nmax."""
    rows, k = x.shape
    for r in prange(rows):
        xr = x[r]
        sigma2 = _row_sigma2(xr)
        w = np.empty(32, np.float32)
        L = np.empty(k, np.int32)
        Laux = np.empty(32, np.int32)
        for b in range(k // 32):
            o = b * 32
            for j in range(32):
                w[j] = qw[o + j] * f32(math.sqrt(sigma2 + xr[o + j] * xr[o + j]))
            d, mn = _make_qkx2_quants(xr, o, w, 32, nmax, L, o, Laux, f32(-0.9), f32(0.05), 36)
            d_out[r, b] = d
            m_out[r, b] = -mn
            for j in range(32):
                L_out[r, o + j] = L[o + j]


@njit(parallel=True, cache=True)
def k_quant_levels(x, qw, nmax, clamp63, d_out, dmin_out, sc_out, L_out):
    """ggml's quantize_row_q4_K_impl (nmax 15) and q5_K_impl (nmax 31, clamp63: it caps the
    6-bit scales at 63, Q4_K does not) up to the bit packing; outputs as in
    quantize_cpu.k_quant_levels."""
    rows, k = x.shape
    for r in prange(rows):
        xr = x[r]
        L = np.empty(256, np.int32)
        Laux = np.empty(32, np.int32)
        w = np.empty(32, np.float32)
        sw = np.empty(8, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        Ls = np.empty(8, np.int32)
        Lm = np.empty(8, np.int32)
        for b in range(k // 256):
            o = b * 256
            s2 = f32(0.0)
            for l in range(256):
                s2 += xr[o + l] * xr[o + l]
            sigma2 = f32(2.0) * s2 / f32(256.0)
            for j in range(8):
                oj = o + 32 * j
                sumw = f32(0.0)
                for l in range(32):
                    w[l] = qw[oj + l] * f32(math.sqrt(sigma2 + xr[oj + l] * xr[oj + l]))
                    sumw += w[l]
                sw[j] = sumw
                scales[j], mins[j] = _make_qkx2_quants(xr, oj, w, 32, nmax, L, 32 * j, Laux,
                                                       f32(-0.9), f32(0.05), 36)
            d_block = _make_qp_quants(scales, 8, 63, Ls, sw)
            m_block = _make_qp_quants(mins, 8, 63, Lm, sw)
            for t in range(12):
                sc_out[r, b, t] = 0
            for j in range(8):
                ls, lm = Ls[j], Lm[j]
                if clamp63:
                    ls, lm = min(63, ls), min(63, lm)
                if j < 4:
                    sc_out[r, b, j] = ls
                    sc_out[r, b, j + 4] = lm
                else:
                    sc_out[r, b, j + 4] = (ls & 15) | ((lm & 15) << 4)
                    sc_out[r, b, j - 4] |= ((ls >> 4) << 6) & 255
                    sc_out[r, b, j] |= ((lm >> 4) << 6) & 255
            d16 = fp16_round(d_block)
            dmin16 = fp16_round(m_block)
            d_out[r, b] = d16
            dmin_out[r, b] = dmin16
            k_final_levels(xr, o, nmax, d16, dmin16, sc_out[r, b], L)
            for t in range(256):
                L_out[r, b, t] = L[t]
