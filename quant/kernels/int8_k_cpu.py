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

from ..qtensor import QTensor, stack_parts, u16
from . import int8_cpu
from .int8_cpu import _BIG, F32X16, G, _F32, _I8, _I32, _c_arrays, _f16, _hsum, _load, _pair_sums, _vt, _vzero
from .variants import variant

_I16 = ir.IntType(16)


def _const(t, v, n=32):
    return ir.Constant(_vt(t, n), [v] * n)


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_vt(_F32, G), None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vt(_I32, G), [0] * G))


def _scale_lanes(context, builder, ta, acc, isum, sc, sco, xs, xso, sd, smin, q6):
    # acc + the 16 lanes' integer sums under their sub-block scales and the two float scales
    def at(base, n):
        return builder.add(base, ir.Constant(base.type, n))

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


def _super_block(q6, ub=False):
    @intrinsic
    def sb(typingctx, acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin):
        """acc + one super-block's 16 lane sums: Q6_K sd * sc * (sum q x - 32 sum x);
        Q4_K sd * sc * sum q x - smin * m * sum x (sc | m: 8 + 8 bytes at sco). x int16 in pair
        steps; ub: int8 in the same order, see _q4_k_sb_ub."""
        if not _c_arrays(w, sc, x, xs):
            return None

        def codegen(context, builder, sig, args):
            acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin = args
            ta = sig.args

            def at(base, n):
                return builder.add(base, ir.Constant(base.type, n))

            lq = [_load(context, builder, ta[1], w, at(wo, 32 * c), _vt(_I8, 32)) for c in range(4)]
            hq = [_load(context, builder, ta[1], w, at(wo, 128 + 32 * u), _vt(_I8, 32)) for u in range(2)] if q6 else []
            isum = s16 = None
            for p in (0, 4, 1, 5, 2, 6, 3, 7) if ub else range(8):  # ub: Q6_K widens each pair of steps
                v = builder.and_(lq[p], _const(_I8, 15)) if p < 4 else builder.lshr(lq[p - 4], _const(_I8, 4))
                if q6:
                    hb = builder.and_(builder.lshr(hq[p >> 2], _const(_I8, 2 * (p & 3))), _const(_I8, 3))
                    v = builder.or_(v, builder.shl(hb, _const(_I8, 4)))
                xv = _load(context, builder, ta[5], x, at(xo, 32 * p), _vt(_I8 if ub else _I16, 32))
                if not ub:
                    s = _pair_sums(builder, builder.zext(v, _vt(_I32, 32)), xv)
                    isum = s if isum is None else builder.add(isum, s)
                    continue
                m = int8_cpu.maddubs(builder, v, xv)
                s16 = m if s16 is None else builder.add(s16, m)
                if p >= 4 and (q6 or p == 7):
                    wide = builder.sext(s16, _vt(_I32, G))
                    isum, s16 = (wide if isum is None else builder.add(isum, wide)), None
            return _scale_lanes(context, builder, ta, acc, isum, sc, sco, xs, xso, sd, smin, q6)
        return F32X16(acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin), codegen
    return sb


@intrinsic
def _q4_k_sb_vnni(typingctx, acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin):
    """_q4_k_sb with AVX512-VNNI's vpdpbusd: x int8 in quad steps (quantize_x(quad=True)), the
    nibbles of chunks 2h, 2h + 1 woven (int8_cpu.QUAD; it moves byte pairs, so LLVM emits one vpermw,
    AVX512BW), their low nibbles quad step h and high ones step 2 + h. On Zen 4 (znver4) a
    super-block is 2 vpermw + 2 vpandq + 2 vgf2p8affineqb (the shift) + 4 vpdpbusd (u8 nibbles
    x s8 x, 4 products a lane) against the generic 8 vpmovzxbw + 8 vpdpwssd: 1.45-1.70x per
    product at Qwen3-1.7B's shapes. The lanes' integer sums are the same integers, so the
    result equals _q4_k_sb's bit for bit."""
    if not _c_arrays(w, sc, x, xs):
        return None

    def codegen(context, builder, sig, args):
        acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin = args
        ta = sig.args
        isum = int8_cpu.woven_nibble_sums(context, builder, ta[1], w, wo, ta[5], x, xo, 2)
        return _scale_lanes(context, builder, ta, acc, isum, sc, sco, xs, xso, sd, smin, False)
    return F32X16(acc, w, wo, sc, sco, x, xo, xs, xso, sd, smin), codegen


# _q4_k_sb_ub / _q6_k_sb_ub: _q4_k_sb / _q6_k_sb with AVX2's vpmaddubsw, for x86 CPUs
# without VNNI: x int8 in pair steps (the generic kernel's order, a byte each:
# quantize_x(pairs8=True)), so a step's
# 32 weight bytes (Q4_K: a chunk's low nibbles are step c, its high ones step c + 4)
# against its 32 bytes of x are one vpmaddubsw (u8 quants x s8 x, lane t's two products
# summed into i16 lane t), with no shuffle. Sums stay exact in i16, then are widened: Q4_K
# over the 8 steps (8 x 2 x 15 x 127 = 30480 < 2^15), Q6_K over 2 (2 x 2 x 63 x 127 =
# 32004). Compiled for Haswell (AVX2), a Q4_K super-block is 8 vpmaddubsw + 7 vpaddw,
# then 2 vpmaddwd that widen and apply the sub-block scales at once, against the generic
# 16 vpmovzxbw + 16 vpmaddwd + 14 vpaddd + 4 vpmulld (x as int16, twice the bytes); Q6_K
# 8 vpmaddubsw + 4 vpaddw + 8 vpmovsxwd. The same integer lane sums, so the result equals
# the generic kernel's bit for bit (1.4-1.8x per Q4_K product at Qwen3 shapes, 1.1-1.3x
# Q6_K, 2 threads, NUMBA_CPU_NAME=haswell on an Emerald Rapids VM).
_q4_k_sb_ub = _super_block(False, ub=True)
_q6_k_sb_ub = _super_block(True, ub=True)
_q4_k_sb = _super_block(False)
_q6_k_sb = _super_block(True)


# -- the activation ------------------------------------------------------------------------

@njit(cache=True)
def _quantize_x(x, xq, xd, xs, quad):
    # quad: int8 quants in _q4_k_sb_vnni's quad steps (element 16t + 4s + j at 64s + 4t + j of
    # its super-block), else int16 in pair steps
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
                if quad:
                    xq[o + ((i & 15) >> 2) * 64 + 4 * (i >> 4) + (i & 3)] = q
                else:
                    xq[o + ((i & 15) >> 1) * 32 + 2 * (i >> 4) + (i & 1)] = q
                s += q
            xs[b * 16 + t] = s
        xd[b] = np.float32(np.float32(1.0) / iscale) if amax != 0 else np.float32(0.0)
        if not finite:
            xd[b] = np.float32(np.nan)


def quantize_x(x: np.ndarray, quad: bool = False, pairs8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (k,) float32 -> (quants as int16 in the kernels' order, int8 in the same order (pairs8,
    the AVX2 kernel's) or int8 in the VNNI kernel's (quad), float32 scale per 256, int32 sum of
    the quants per 16)."""
    x = np.ascontiguousarray(x, np.float32)
    k = x.shape[0]
    xq = np.empty(k, np.int8 if quad or pairs8 else np.int16)
    xd, xs = np.empty(k // 256, np.float32), np.empty(k // 16, np.int32)
    _quantize_x(x, xq, xd, xs, quad)
    return xq, xd, xs


def _quantize_quad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_x(x, True)


def _quantize_pairs8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_x(x, pairs8=True)


# -- the weights ---------------------------------------------------------------------------

# The repacks read and write 2-byte pairs (uint16 views, qtensor.u16), elements 2p, 2p + 1 of
# a lane: a lane's 16 elements lie in one 32-element run of the file's quants, so each pair of
# the layout is one pair of the file's, shifted and masked alike in both bytes; no per-element
# index arithmetic (the byte-wise loops measured 3-10x slower).

@njit(cache=True, inline="always")
def _scales_q4_k(raw, r, s, sm, at):
    # 12 bytes at s: 6-bit scales and minimums, the top bits of 4..7 spread over 0..7 -> 8 + 8
    for j in range(8):
        if j < 4:
            sc, mn = raw[r, s + j] & 63, raw[r, s + j + 4] & 63
        else:
            sc = (raw[r, s + j + 4] & 15) | ((raw[r, s + j - 4] >> 6) << 4)
            mn = (raw[r, s + j + 4] >> 4) | ((raw[r, s + j] >> 6) << 4)
        sm[r, at + j], sm[r, at + 8 + j] = sc, mn


@njit(cache=True, inline="always")
def _nibbles_q4_k(w, r, o, q, at):
    # 64 pairs of nibble bytes at pair o (element E: byte 32 (E >> 6) + E % 32, high nibble for
    # odd E >> 5) -> pair c of lane t at at + 16 c + t: step c low, step c + 4 (8 elements on) high
    for c in range(4):
        for t in range(16):
            i = o + 16 * (t >> 2) + 8 * (t & 1) + c
            sh = 4 * ((t >> 1) & 1)
            q[r, at + 16 * c + t] = ((w[r, i] >> sh) & 0x0F0F) | (((w[r, i + 4] >> sh) & 0x0F0F) << 4)


@njit(parallel=True, cache=True)
def _pack_q4_k(raw, w, q, sm, d, dmin):
    # w: raw as uint16 (R, 72 nsb), q as uint16 (R, 64 nsb)
    for r in prange(raw.shape[0]):
        for b in range(d.shape[1]):
            d[r, b], dmin[r, b] = w[r, 72 * b], w[r, 72 * b + 1]
            _scales_q4_k(raw, r, 144 * b + 4, sm, 16 * b)
            _nibbles_q4_k(w, r, 72 * b + 8, q, 64 * b)


@njit(parallel=True, cache=True)
def _pack_q6_k(raw, w, q, sc, d):
    # w: raw as uint16 (R, 105 nsb): 64 pairs of low nibbles (element E, n = E >> 7, m = E >> 5
    # & 3: byte 64 n + 32 (m & 1) + E % 32, high nibble for m >= 2), 32 of high bit pairs (byte
    # 128 + 32 n + E % 32, bits 2 m), 8 of int8 scales, d; q as uint16 (R, 96 nsb)
    for r in prange(raw.shape[0]):
        for b in range(d.shape[1]):
            o = 105 * b
            for t in range(16):
                sc[r, 16 * b + t] = raw[r, 210 * b + 192 + t]
            for c in range(4):  # low nibbles: pair c of lane t, step c low, step c + 4 high
                for t in range(16):
                    i = o + 32 * (t >> 3) + 16 * ((t >> 1) & 1) + 8 * (t & 1) + c
                    sh = 4 * ((t >> 2) & 1)
                    q[r, 96 * b + 16 * c + t] = ((w[r, i] >> sh) & 0x0F0F) | (((w[r, i + 4] >> sh) & 0x0F0F) << 4)
            for u in range(2):  # high bit pairs: pair u of lane t, step 4u + s at bits 2s
                for t in range(16):
                    i = o + 64 + 16 * (t >> 3) + 8 * (t & 1) + 4 * u
                    sh = 2 * ((t >> 1) & 3)
                    v = 0
                    for s in range(4):
                        v |= ((w[r, i + s] >> sh) & 0x0303) << (2 * s)
                    q[r, 96 * b + 64 + 16 * u + t] = v
            d[r, b] = w[r, o + 104]


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


def pack(*ws: QTensor, after=None) -> KPacked:
    """A matrix or an expert stack (rows pack alike: a stack is its experts' packs in turn);
    several matrices are stacked into one (qtensor.stack_parts), each packed into its rows."""
    w = ws[0]
    if w.type not in (T.Q4_K, T.Q6_K):
        raise ValueError(f"{w.name}: these kernels take Q4_K or Q6_K, not {w.type.name}")
    rows, parts = stack_parts(list(ws))
    R, nsb = w.n_mats * rows, w.k // 256
    d = np.empty((R, nsb), np.uint16)
    q4 = w.type == T.Q4_K
    q = np.empty((R, nsb * (128 if q4 else 192)), np.uint8)
    s = np.empty((R, nsb * 16), np.uint8 if q4 else np.int8)
    dmin = np.empty_like(d) if q4 else None
    q16 = q.view(np.uint16)
    for raw, at in parts:
        n, raw = raw.shape[0], np.ascontiguousarray(raw)
        if q4:
            _pack_q4_k(raw, u16(raw), q16[at:at + n], s[at:at + n], d[at:at + n], dmin[at:at + n])
        else:
            _pack_q6_k(raw.view(np.int8), u16(raw), q16[at:at + n], s[at:at + n], d[at:at + n])
        if after is not None:  # the caller may let this part's file pages go
            after(at, n)
    return KPacked(w.type, rows, w.k, q, s, d, dmin, w.n_mats)


# -- the products --------------------------------------------------------------------------

# A few rows of x at once, each as alone: variants of int8_cpu.rows_body; a step is a super-block.

@njit(cache=True, inline="always")
def _super_blocks(w):  # Q6_K (q, s, d, ...); Q4_K (q, s, d, dmin, ...)
    return w[2].shape[0], w[2].shape[1]


@njit(cache=True, inline="always")
def _q4_k_step(acc, w, x, o, r, b):
    q, s, d, dmin = w[0], w[1], w[2], w[3]
    i = r * d.shape[1] + b
    xd = x[1][o[1] + b]
    return _q4_k_sb(acc, q, i * 128, s, i * 16, x[0], o[0] + b * 256, x[2], o[2] + b * 16,
                    _f16(d, i) * xd, _f16(dmin, i) * xd)


@njit(cache=True, inline="always")
def _q6_k_step(acc, w, x, o, r, b):
    q, s, d = w[0], w[1], w[2]
    i = r * d.shape[1] + b
    return _q6_k_sb(acc, q, i * 192, s, i * 16, x[0], o[0] + b * 256, x[2], o[2] + b * 16,
                    _f16(d, i) * x[1][o[1] + b], np.float32(0))


@njit(cache=True, inline="always")
def sum_end(acc, w, x, o, r, t, out):
    out[t, r] = _hsum(acc)


# A lone row: see int8_cpu._mv1_q8_0.

@njit(parallel=True, cache=True)
def _mv1_q4_k(xq, xd, xs, q, s, d, dmin, out):
    R, nsb = d.shape
    for r in prange(R):
        acc = _vzero()
        for b in range(nsb):
            i = r * nsb + b
            acc = _q4_k_sb(acc, q, i * 128, s, i * 16, xq, b * 256, xs, b * 16,
                           _f16(d, i) * xd[b], _f16(dmin, i) * xd[b])
        out[r] = _hsum(acc)


@njit(parallel=True, cache=True)
def _mv1_q6_k(xq, xd, xs, q, s, d, out):
    R, nsb = d.shape
    for r in prange(R):
        acc = _vzero()
        for b in range(nsb):
            i = r * nsb + b
            acc = _q6_k_sb(acc, q, i * 192, s, i * 16, xq, b * 256, xs, b * 16, _f16(d, i) * xd[b], np.float32(0))
        out[r] = _hsum(acc)


_mv_q4_k = variant(int8_cpu.rows_body, "_mv_q4_k", {"_steps": _super_blocks, "_step": _q4_k_step, "_end": sum_end},
                   parallel=True, cache=True)
_mv1_q4_k_vnni = variant(_mv1_q4_k.py_func, "_mv1_q4_k_vnni", {"_q4_k_sb": _q4_k_sb_vnni}, parallel=True, cache=True)
_q4_k_step_vnni = variant(_q4_k_step.py_func, "_q4_k_step_vnni", {"_q4_k_sb": _q4_k_sb_vnni}, cache=True, inline="always")
_mv_q4_k_vnni = variant(int8_cpu.rows_body, "_mv_q4_k_vnni",
                        {"_steps": _super_blocks, "_step": _q4_k_step_vnni, "_end": sum_end}, parallel=True, cache=True)
_mv1_q4_k_ub = variant(_mv1_q4_k.py_func, "_mv1_q4_k_ub", {"_q4_k_sb": _q4_k_sb_ub}, parallel=True, cache=True)
_q4_k_step_ub = variant(_q4_k_step.py_func, "_q4_k_step_ub", {"_q4_k_sb": _q4_k_sb_ub}, cache=True, inline="always")
_mv_q4_k_ub = variant(int8_cpu.rows_body, "_mv_q4_k_ub",
                      {"_steps": _super_blocks, "_step": _q4_k_step_ub, "_end": sum_end}, parallel=True, cache=True)
_mv1_q6_k_ub = variant(_mv1_q6_k.py_func, "_mv1_q6_k_ub", {"_q6_k_sb": _q6_k_sb_ub}, parallel=True, cache=True)
_q6_k_step_ub = variant(_q6_k_step.py_func, "_q6_k_step_ub", {"_q6_k_sb": _q6_k_sb_ub}, cache=True, inline="always")
_mv_q6_k_ub = variant(int8_cpu.rows_body, "_mv_q6_k_ub",
                      {"_steps": _super_blocks, "_step": _q6_k_step_ub, "_end": sum_end}, parallel=True, cache=True)
_mv_q6_k = variant(int8_cpu.rows_body, "_mv_q6_k", {"_steps": _super_blocks, "_step": _q6_k_step, "_end": sum_end},
                   parallel=True, cache=True)


def matvec_rows(x: np.ndarray, w: KPacked, out: np.ndarray | None = None, vnni: bool | None = None,
                avx2: bool | None = None) -> np.ndarray:
    """x (n, k) float32 @ W.T -> (n, rows) float32 for a few rows, each quantized per 256 first.
    Q4_K takes vpdpbusd where the CPU has AVX512-VNNI (vnni: None asks int8_tiles_cpu); Q4_K
    and Q6_K take vpmaddubsw where it has AVX2 but not VNNI (avx2: None asks); the same result
    bit for bit."""
    out = int8_cpu.check_rows(x, w, out)
    isa = int8_cpu.decode_isa(vnni, avx2)
    if w.type == T.Q6_K and isa == "avx2":
        xq, xd, xs = int8_cpu.quantize_rows(x, _quantize_pairs8)
        if x.shape[0] == 1:
            _mv1_q6_k_ub(xq[0], xd[0], xs[0], w.q, w.s, w.d, out[0])
        else:
            _mv_q6_k_ub(*int8_cpu.rows_args(xq, xd, xs, w.q, w.s, w.d), out)
        return out
    if w.type == T.Q4_K and isa is not None:
        quad = isa == "vnni"
        xq, xd, xs = int8_cpu.quantize_rows(x, _quantize_quad if quad else _quantize_pairs8)
        if x.shape[0] == 1:
            (_mv1_q4_k_vnni if quad else _mv1_q4_k_ub)(xq[0], xd[0], xs[0], w.q, w.s, w.d, w.dmin, out[0])
        else:
            (_mv_q4_k_vnni if quad else _mv_q4_k_ub)(*int8_cpu.rows_args(xq, xd, xs, w.q, w.s, w.d, w.dmin), out)
        return out
    xq, xd, xs = int8_cpu.quantize_rows(x, quantize_x)
    if x.shape[0] == 1 and w.type == T.Q4_K:
        _mv1_q4_k(xq[0], xd[0], xs[0], w.q, w.s, w.d, w.dmin, out[0])
    elif x.shape[0] == 1:
        _mv1_q6_k(xq[0], xd[0], xs[0], w.q, w.s, w.d, out[0])
    elif w.type == T.Q4_K:
        _mv_q4_k(*int8_cpu.rows_args(xq, xd, xs, w.q, w.s, w.d, w.dmin), out)
    else:
        _mv_q6_k(*int8_cpu.rows_args(xq, xd, xs, w.q, w.s, w.d), out)
    return out


def matvec(x: np.ndarray, w: KPacked, out: np.ndarray | None = None) -> np.ndarray:
    """x (k,) float32 @ W.T -> (rows,) float32: matvec_rows of one row."""
    return int8_cpu.matvec(x, w, out, matvec_rows)
