"""Q2_K and Q3_K on the CPU, kept nearly as small as in the file.

People pick these types to fit a model in little memory, so unlike the int8 repacks of the
wider formats the 2-bit quants stay packed: the 64 quant bytes of a 256-element block are kept
as they are (byte l of half h holds elements 128 h + 32 j + l at bit 2 j, j = 0..3), the 4-bit
or 6-bit sub-block scales stay integers and only the super-block scales become float32. Q3_K's
third bit is regrouped beside its quant byte (one nibble a byte). Memory: Q2_K 0.41 bytes a
weight (file 0.33), Q3_K 0.58 (file 0.43).

The decode loops run flat over a row's quant bytes with x permuted into four arrays in that
byte order (`split_x`) and the sub-block scales stored per bit position j (index j * nc + c
for 16-byte chunk c), so every load in the inner loop is contiguous and it vectorises.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .half import half


ROWS = 16  # rows per parallel task in the decode loops (one scale scratch each, not one per row)


def split_x(x: np.ndarray) -> np.ndarray:
    """(4, k/4): row j holds the elements that quant byte b carries at bit 2 j."""
    return np.ascontiguousarray(x.reshape(-1, 4, 32).transpose(1, 0, 2).reshape(4, -1))


@njit(cache=True, inline="always")
def _chunk_group(c, j):
    # sub-block (16 elements) of the quants at bit 2 j of 16-byte chunk c
    return (c >> 1) * 8 + 2 * j + (c & 1)


# -- repacking -----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_q2_k(raw, q, sc, m, sb):
    # block: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin (fp16)
    nblk = sb.shape[1] // 2
    nc = q.shape[1] // 16
    for r in prange(raw.shape[0]):
        for blk in range(nblk):
            o = blk * 84
            sb[r, 2 * blk] = half(raw[r, o + 80], raw[r, o + 81])
            sb[r, 2 * blk + 1] = half(raw[r, o + 82], raw[r, o + 83])
            for g in range(16):
                m[r, blk * 16 + g] = raw[r, o + g] >> 4
            for l in range(64):
                q[r, blk * 64 + l] = raw[r, o + 16 + l]
            for cc in range(4):
                c = blk * 4 + cc
                for j in range(4):
                    sc[r, j * nc + c] = raw[r, o + _chunk_group(cc, j)] & 15


@njit(parallel=True, cache=True)
def pack_q3_k(raw, q, h, sc, sb):
    # block: hmask[32] (bit 4 half + j of byte l: the third bit of element 128 half + 32 j + l),
    # qs[64], scales[12] (16 six-bit scales, biased by 32), d (fp16)
    nblk = sb.shape[1]
    nc = q.shape[1] // 16
    for r in prange(raw.shape[0]):
        s = np.empty(16, np.int32)
        for blk in range(nblk):
            o = blk * 110
            sb[r, blk] = half(raw[r, o + 108], raw[r, o + 109])
            for i in range(16):
                lo = np.int32(raw[r, o + 96 + (i & 7)])
                lo = (lo >> 4) if i >= 8 else (lo & 15)
                hi = (np.int32(raw[r, o + 104 + (i & 3)]) >> (2 * (i >> 2))) & 3
                s[i] = (lo | (hi << 4)) - 32
            for l in range(64):
                q[r, blk * 64 + l] = raw[r, o + 32 + l]
                h[r, blk * 64 + l] = (raw[r, o + (l & 31)] >> (4 * (l >> 5))) & 15
            for cc in range(4):
                c = blk * 4 + cc
                for j in range(4):
                    sc[r, j * nc + c] = s[_chunk_group(cc, j)]


# -- decode: one row of x ------------------------------------------------------------------

@njit(cache=True, inline="always")
def _row_scales(sc, sb, r, stride, s):
    # float sub-block scales of row r in the loops' order; a flat loop reading them vectorises,
    # one over 16-byte chunks with the integer scales hoisted did not (3x slower)
    nc = s.shape[0] // 4
    for j in range(4):
        for c in range(nc):
            s[j * nc + c] = sb[r, stride * (c >> 2)] * np.float32(sc[r, j * nc + c])


@njit(parallel=True, cache=True, fastmath=True)
def mv_q2_k(x4, xs, q, sc, m, sb, out):
    # value = d sc q - dmin m: the minimums come out as sum over sub-blocks of dmin m sum(x)
    nb = q.shape[1]
    nc = nb // 16
    R = q.shape[0]
    for ch in prange((R + ROWS - 1) // ROWS):
        s = np.empty(4 * nc, np.float32)
        for r in range(ch * ROWS, min(R, (ch + 1) * ROWS)):
            _row_scales(sc, sb, r, 2, s)
            a = np.float32(0.0)
            for b in range(nb):
                v = np.int32(q[r, b])
                c = b >> 4
                a += (x4[0, b] * s[c] * np.float32(v & 3) + x4[1, b] * s[nc + c] * np.float32((v >> 2) & 3)
                      + x4[2, b] * s[2 * nc + c] * np.float32((v >> 4) & 3)
                      + x4[3, b] * s[3 * nc + c] * np.float32(v >> 6))
            mm = np.float32(0.0)
            for g in range(m.shape[1]):
                mm += sb[r, 2 * (g >> 4) + 1] * np.float32(m[r, g]) * xs[g]
            out[r] = a - mm


@njit(parallel=True, cache=True, fastmath=True)
def mv_q3_k(x4, q, h, sc, sb, out):
    # value = d sc (q3 - 4), q3 = the 2 bits of q and the third from h
    nb = q.shape[1]
    nc = nb // 16
    R = q.shape[0]
    for ch in prange((R + ROWS - 1) // ROWS):
        s = np.empty(4 * nc, np.float32)
        for r in range(ch * ROWS, min(R, (ch + 1) * ROWS)):
            _row_scales(sc, sb, r, 1, s)
            a = np.float32(0.0)
            for b in range(nb):
                v, hb = np.int32(q[r, b]), np.int32(h[r, b])
                c = b >> 4
                a += (x4[0, b] * s[c] * np.float32(((v & 3) | ((hb & 1) << 2)) - 4)
                      + x4[1, b] * s[nc + c] * np.float32((((v >> 2) & 3) | ((hb & 2) << 1)) - 4)
                      + x4[2, b] * s[2 * nc + c] * np.float32((((v >> 4) & 3) | (hb & 4)) - 4)
                      + x4[3, b] * s[3 * nc + c] * np.float32(((v >> 6) | ((hb & 8) >> 1)) - 4))
            out[r] = a


# -- prefill: dequantize tiles for BLAS ----------------------------------------------------

@njit(parallel=True, cache=True)
def deq_q2_k(q, sc, m, sb, out):
    nb = q.shape[1]
    nc = nb // 16
    for r in prange(q.shape[0]):
        for b in range(nb):
            v = np.int32(q[r, b])
            c, blk = b >> 4, b >> 6
            base = (b >> 5) * 128 + (b & 31)
            for j in range(4):
                g = blk * 16 + _chunk_group(c & 3, j)
                out[r, base + 32 * j] = ((sb[r, 2 * blk] * np.float32(sc[r, j * nc + c])) * np.float32((v >> (2 * j)) & 3)
                                         - sb[r, 2 * blk + 1] * np.float32(m[r, g]))


@njit(parallel=True, cache=True)
def deq_q3_k(q, h, sc, sb, out):
    nb = q.shape[1]
    nc = nb // 16
    for r in prange(q.shape[0]):
        for b in range(nb):
            v, hb = np.int32(q[r, b]), np.int32(h[r, b])
            c = b >> 4
            base = (b >> 5) * 128 + (b & 31)
            for j in range(4):
                q3 = ((v >> (2 * j)) & 3) | (((hb >> j) & 1) << 2)
                out[r, base + 32 * j] = (sb[r, b >> 6] * np.float32(sc[r, j * nc + c])) * np.float32(q3 - 4)
