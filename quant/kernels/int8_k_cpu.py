"""Q4_K and Q6_K decode products with x quantized as ggml's Q8_K: one float scale per 256,
quants rounded half to even (d = max / -127 for the signed max, clamped at 127), and the
quants' sums per 16 for the offsets and minimums.

The scheme is int8_cpu's (read its docstring first), with the lanes 16 elements wide so that a
group of 16 lanes is one super-block (no tails: k is a multiple of 256): Q6_K's sub-blocks are
the lanes, each of Q4_K's sub-blocks of 32 two lanes. Pair step p (0..7) of a super-block holds
elements 16t + 2p + e at 2t + e, for weights and x alike. Per super-block, the lanes' integer
sums are multiplied by their integer sub-block scales, still exact in int32, then by the two
float scales (Q4_K: d and dmin against sums of x per 16) into the row's <16 x float>.

Layouts, bytes a weight (file): Q6_K 0.8203 (0.8203): the 6-bit quants stay packed, 128 bytes
of low nibbles (chunk c: step c low, step c + 4 high) and 64 of high bit pairs (chunk u: step
4u + s at bits 2s), then the 16 int8 scales and d as in the file. Q4_K 0.5781 (0.5625, +2.8%):
nibbles in 4 chunks (step c low, c + 4 high), the 6-bit scales and minimums unpacked to a byte
each, d and dmin float16. On Zen 5 a Q4_K super-block is 8 vpmovzxbw + vpmaddwd + 7 vpdpwssd
(nibbles split by vpand / vgf2p8affineqb), Q6_K the same after joining the bits (more
vgf2p8affineqb shifts, vpternlogq); then vpmulld by the sub-block scales, vcvtdq2ps, vfmadd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from ..qtensor import QTensor
from .int8_cpu import _BIG, F32X16, G, _F32, _I8, _I32, _c_arrays, _f16, _hsum, _load, _pair_sums, _vt, _vzero

_I16 = ir.IntType(16)


def _const(t, v, n=32):
    return ir.Constant(_vt(t, n), [v] * n)


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_vt(_F32, G), None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vt(_I32, G), [0] * G))


def _super_block(q6):
    @intrinsic
    def sb(typingctx, acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin):
        """acc + one super-block's 16 lane sums: Q6_K sd * sc * (sum q x - 32 sum x);
        Q4_K sd * sc * sum q x - smin * m * sum x (sc | m: 8 + 8 bytes at sco)."""
        if not _c_arrays(w, sc, x, xs):
            return None

        def codegen(context, builder, sig, args):
            acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin = args
            ta = sig.args

            def at(base, n):
                return builder.add(base, ir.Constant(base.type, n))

            lq = [_load(context, builder, ta[1], w, at(wo, 32 * c), _vt(_I8, 32)) for c in range(4)]
            hq = [_load(context, builder, ta[1], w, at(wo, 128 + 32 * u), _vt(_I8, 32)) for u in range(2)] if q6 else []
            isum = None
            for p in range(8):
                v = builder.and_(lq[p], _const(_I8, 15)) if p < 4 else builder.lshr(lq[p - 4], _const(_I8, 4))
                if q6:
                    hb = builder.and_(builder.lshr(hq[p >> 2], _const(_I8, 2 * (p & 3))), _const(_I8, 3))
                    v = builder.or_(v, builder.shl(hb, _const(_I8, 4)))
                xv = _load(context, builder, ta[5], x, at(xo, 32 * p), _vt(_I16, 32))
                s = _pair_sums(builder, builder.zext(v, _vt(_I32, 32)), xv)
                isum = s if isum is None else builder.add(isum, s)
            xsv = _load(context, builder, ta[7], xs, xso, _vt(_I32, G))
            if q6:
                isum = builder.sub(isum, builder.shl(xsv, _const(_I32, 5, G)))
                scv = builder.sext(_load(context, builder, ta[3], sc, sco, _vt(_I8, G)), _vt(_I32, G))
            else:  # a sub-block's scale and minimum serve its two lanes
                pairs = ir.Constant(_vt(_I32, G), [i // 2 for i in range(G)])
                eight = _vt(_I8, 8)
                s8, m8 = (_load(context, builder, ta[3], sc, at(sco, o), eight) for o in (0, 8))
                scv = builder.zext(builder.shuffle_vector(s8, s8, pairs), _vt(_I32, G))
                mv = builder.zext(builder.shuffle_vector(m8, m8, pairs), _vt(_I32, G))
            a = builder.sitofp(builder.mul(isum, scv), _vt(_F32, G))
            acc = builder.fadd(acc, builder.fmul(a, _splat(builder, sd), flags=("contract",)), flags=("contract",))
            if not q6:
                b = builder.sitofp(builder.mul(xsv, mv), _vt(_F32, G))
                acc = builder.fsub(acc, builder.fmul(b, _splat(builder, smin), flags=("contract",)),
                                   flags=("contract",))
            return acc
        return F32X16(acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin), codegen
    return sb


_q4_k_sb = _super_block(False)
_q6_k_sb = _super_block(True)


# -- the activation ------------------------------------------------------------------------

@njit(cache=True)
def _quantize_x(x, xq, xd, xs):
    for b in range(x.shape[0] // 256):
        o = b * 256
        amax, mx, finite = np.float32(0.0), np.float32(0.0), True
        for i in range(256):
            if abs(x[o + i]) > amax:
                amax, mx = abs(x[o + i]), x[o + i]
            finite &= abs(x[o + i]) <= _BIG
        if not finite:  # quants 0, scale NaN (below): a broken activation stays visible downstream
            amax = np.float32(0.0)
        iscale = np.float32(np.float32(-127.0) / mx) if amax != 0 else np.float32(0.0)
        for t in range(16):
            s = 0
            for i in range(16 * t, 16 * t + 16):
                q = min(127, int(np.rint(np.float32(iscale * x[o + i]))))  # nearest_int: half to even
                xq[o + ((i & 15) >> 1) * 32 + 2 * (i >> 4) + (i & 1)] = q
                s += q
            xs[b * 16 + t] = s
        xd[b] = np.float32(np.float32(1.0) / iscale) if amax != 0 else np.float32(0.0)
        if not finite:
            xd[b] = np.float32(np.nan)


def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (k,) float32 -> (quants as int16 in the kernels' order, float32 scale per 256, int32
    sum of the quants per 16)."""
    x = np.ascontiguousarray(x, np.float32)
    k = x.shape[0]
    xq, xd, xs = np.empty(k, np.int16), np.empty(k // 256, np.float32), np.empty(k // 16, np.int32)
    _quantize_x(x, xq, xd, xs)
    return xq, xd, xs


# -- the weights ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _lane(t, c, e):
    # the element of a super-block at byte 2t + e of step c
    return 16 * t + 2 * c + e


@njit(parallel=True, cache=True)
def _pack_q4_k(raw, q, sm, d, dmin):
    for r in prange(raw.shape[0]):
        for b in range(d.shape[1]):
            o = b * 144
            d[r, b] = np.uint16(raw[r, o]) | (np.uint16(raw[r, o + 1]) << np.uint16(8))
            dmin[r, b] = np.uint16(raw[r, o + 2]) | (np.uint16(raw[r, o + 3]) << np.uint16(8))
            s = o + 4  # 12 bytes: 6-bit scales and minimums, the top bits of 4..7 spread over 0..7
            for j in range(8):
                if j < 4:
                    sc, mn = raw[r, s + j] & 63, raw[r, s + j + 4] & 63
                else:
                    sc = (raw[r, s + j + 4] & 15) | ((raw[r, s + j - 4] >> 6) << 4)
                    mn = (raw[r, s + j + 4] >> 4) | ((raw[r, s + j] >> 6) << 4)
                sm[r, b * 16 + j], sm[r, b * 16 + 8 + j] = sc, mn
            for c in range(4):
                for t in range(16):
                    for e in range(2):
                        nib = np.uint8(0)
                        for h in range(2):  # element E: sub-block E >> 5, low nibbles for even ones
                            E = _lane(t, c + 4 * h, e)
                            v = (raw[r, o + 16 + 32 * (E >> 6) + (E & 31)] >> (4 * ((E >> 5) & 1))) & 15
                            nib |= np.uint8(v << (4 * h))
                        q[r, b * 128 + 32 * c + 2 * t + e] = nib


@njit(parallel=True, cache=True)
def _pack_q6_k(raw, rawi, q, sc, d):
    for r in prange(raw.shape[0]):
        v = np.empty(256, np.uint8)  # a super-block's 6-bit values, in element order
        for b in range(d.shape[1]):
            o = b * 210
            for E in range(256):  # ggml's dequantize_row_q6_K, without the - 32
                n, qt, li = E >> 7, (E >> 5) & 3, E & 31
                lo = (raw[r, o + 64 * n + li + 32 * (qt & 1)] >> (4 * (qt >> 1))) & 15
                v[E] = lo | (((raw[r, o + 128 + 32 * n + li] >> (2 * qt)) & 3) << 4)
            for t in range(16):
                sc[r, b * 16 + t] = rawi[r, o + 192 + t]
                for e in range(2):
                    for c in range(4):
                        lo, hi = v[_lane(t, c, e)] & 15, v[_lane(t, c + 4, e)] & 15
                        q[r, b * 192 + 32 * c + 2 * t + e] = lo | (hi << 4)
                    for u in range(2):
                        hb = 0
                        for s in range(4):
                            hb |= (v[_lane(t, 4 * u + s, e)] >> 4) << (2 * s)
                        q[r, b * 192 + 128 + 32 * u + 2 * t + e] = hb
            d[r, b] = np.uint16(raw[r, o + 208]) | (np.uint16(raw[r, o + 209]) << np.uint16(8))


@dataclass(frozen=True)
class KPacked:
    """Q4_K: q (R, k/2) nibbles, s (R, k/16) uint8 (per super-block 8 scales, 8 minimums),
    d and dmin float16 bits (R, k/256). Q6_K: q (R, k*3/4), s int8 (R, k/16), d. R = n_mats *
    rows: a stack of experts, expert e at rows e * rows ..."""
    type: T
    rows: int
    k: int
    q: np.ndarray
    s: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    n_mats: int = 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.s, self.d, self.dmin) if a is not None)

    def expert(self, e: int) -> "KPacked":
        s = slice(e * self.rows, (e + 1) * self.rows)
        return replace(self, q=self.q[s], s=self.s[s], d=self.d[s],
                       dmin=None if self.dmin is None else self.dmin[s], n_mats=1)


def pack(w: QTensor) -> KPacked:
    """A matrix or an expert stack (rows pack alike: a stack is its experts' packs in turn)."""
    if w.type not in (T.Q4_K, T.Q6_K):
        raise ValueError(f"{w.name}: these kernels take Q4_K or Q6_K, not {w.type.name}")
    R, nsb = w.n_mats * w.rows, w.k // 256
    d = np.empty((R, nsb), np.uint16)
    if w.type == T.Q4_K:
        q, s, dmin = np.empty((R, nsb * 128), np.uint8), np.empty((R, nsb * 16), np.uint8), np.empty_like(d)
        _pack_q4_k(w.raw, q, s, d, dmin)
        return KPacked(w.type, w.rows, w.k, q, s, d, dmin, w.n_mats)
    q, s = np.empty((R, nsb * 192), np.uint8), np.empty((R, nsb * 16), np.int8)
    _pack_q6_k(w.raw, w.raw.view(np.int8), q, s, d)
    return KPacked(w.type, w.rows, w.k, q, s, d, n_mats=w.n_mats)


# -- the products --------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _mv_q4_k(xq, xd, xs, q, s, d, dmin, out):
    R, nsb = d.shape
    for r in prange(R):
        acc = _vzero()
        for b in range(nsb):
            i = r * nsb + b
            acc = _q4_k_sb(acc, q, i * 128, s, i * 16, xq, b * 256, xs, b * 16,
                           _f16(d, i) * xd[b], _f16(dmin, i) * xd[b])
        out[r] = _hsum(acc)


@njit(parallel=True, cache=True)
def _mv_q6_k(xq, xd, xs, q, s, d, out):
    R, nsb = d.shape
    for r in prange(R):
        acc = _vzero()
        for b in range(nsb):
            i = r * nsb + b
            acc = _q6_k_sb(acc, q, i * 192, s, i * 16, xq, b * 256, xs, b * 16, _f16(d, i) * xd[b], np.float32(0))
        out[r] = _hsum(acc)


def matvec(x: np.ndarray, w: KPacked, out: np.ndarray | None = None) -> np.ndarray:
    """x (k,) float32 @ W.T -> (rows,) float32, x quantized per 256 first."""
    if x.shape != (w.k,):
        raise ValueError(f"input of shape {x.shape}, weight expects ({w.k},)")
    if w.n_mats != 1:
        raise ValueError(f"a stack of {w.n_mats} experts: multiply one (w.expert(e)) or use int8_experts_cpu")
    out = np.empty(w.rows, np.float32) if out is None else out
    xq, xd, xs = quantize_x(x)
    if w.type == T.Q4_K:
        _mv_q4_k(xq, xd, xs, w.q, w.s, w.d, w.dmin, out)
    else:
        _mv_q6_k(xq, xd, xs, w.q, w.s, w.d, out)
    return out
