"""Q5_K and Q5_0 decode products with x quantized to 8 bits, in layouts of the file's size.

The schemes are int8_k_cpu's (Q5_K, x as ggml's Q8_K per 256) and int8_cpu's (Q5_0, x as
Q8_0 per 32); read those docstrings first. A 5-bit quant is its 4-bit nibble, laid out as Q4_K's
(resp. Q4_0's) nibbles there, plus a fifth bit kept packed: one byte holds the fifth bits of
the same lane position in 8 pair steps, so one 32-byte load serves 8 steps and each step
moves its bit to bit 4 (a shift and an and) and ors it onto the nibble. Values are then 0..31
and go through the same widening multiply-add as the 4-bit ones.

Q5_K (0.7031 bytes a weight against the file's 0.6875, +2.3%): per super-block 128 bytes of
nibbles (chunk c: step c low, step c + 4 high), 32 bytes of fifth bits (byte 2t + e, bit p:
step p), the 6-bit scales and minimums a byte each (8 + 8), d and dmin float16. value =
d sc q - dmin m per sub-block of 32; the minimums meet x's quant sums per 16, as Q4_K's.
Q5_0 (0.6875, the file's size): per group of 16 blocks 256 bytes of nibbles (chunk c: step c
low, c + 8 high: the file's bytes 2c, 2c + 1 of each block), 64 of fifth bits (chunk u, bit
s: step 8u + s); value = d (q - 16), the 16 taken off as 16 * x's block sums. Blocks after
the last full group keep the file's order (16 bytes of nibbles, the 4 bytes of qh), summed
by a scalar loop.

On this Zen 5 (znver5; `python scripts/bench_int8.py --asm --formats q5_k q5_0`) the loop
over a row's Q5_K super-blocks is: 5 loads of 32 bytes, 10 vgf2p8affineqb + 1 vpaddb (the
byte shifts: high nibbles down, fifth bits to bit 4), 8 vpternlogq (and + or: the quants),
8 vpmovzxbw + vpmaddwd + 7 vpdpwssd (x from memory), then 2 vpmulld (scales, minimums), 2
vcvtdq2ps, vfmadd + vfnmadd: about 50 instructions against Q4_K's 30, and at 2 threads on
0.6B shapes it reads file bytes at ~0.9x Q4_K's rate, 1.3-1.5x the float path's (int8 with
float scale and offset per 32). A Q5_0 group is the same over 16 steps (15 vpdpwssd).

`dequant` / `take` give the weights as float32, equal to gguf's dequantization of the file's
bytes (the same float32 operations in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from ..errors import UnsupportedQuantType
from ..qtensor import QTensor, stack_parts, u16
from . import int8_cpu, int8_k_cpu
from .int8_cpu import F32X16, G, _F32, _I8, _I32, _c_arrays, _f16, _hsum, _load, _pair_sums, _vt, _vzero
from .int8_k_cpu import _I16, _const, _nibbles_q4_k, _scales_q4_k, _splat
from .variants import variant


def _fifth(builder, h, s, n=32):
    # bit s of each byte of h, moved to bit 4 (the 16 of a 5-bit quant)
    if s < 4:
        h = builder.shl(h, _const(_I8, 4 - s, n))
    elif s > 4:
        h = builder.lshr(h, _const(_I8, s - 4, n))
    return builder.and_(h, _const(_I8, 16, n))


def _nibbles(builder, chunks, p, half):
    # step p's nibbles: chunk p low, or chunk p - half high
    if p < half:
        return builder.and_(chunks[p], _const(_I8, 15))
    return builder.lshr(chunks[p - half], _const(_I8, 4))


def _isum(context, builder, tys, args, steps):
    """Sum over pair steps of (nibble | fifth bit) . x: 16 int32 lanes. args: w, wo, h, ho, x, xo;
    tys: the types of w, h, x. w holds steps / 2 chunks of 32 bytes, h steps / 8."""
    w, wo, h, ho, x, xo = args
    wt, ht, xt = tys

    def at(base, n):
        return builder.add(base, ir.Constant(base.type, n))

    lq = [_load(context, builder, wt, w, at(wo, 32 * c), _vt(_I8, 32)) for c in range(steps // 2)]
    hq = [_load(context, builder, ht, h, at(ho, 32 * u), _vt(_I8, 32)) for u in range(steps // 8)]
    isum = None
    for p in range(steps):
        v = builder.or_(_nibbles(builder, lq, p, steps // 2), _fifth(builder, hq[p >> 3], p & 7))
        xv = _load(context, builder, xt, x, at(xo, 32 * p), _vt(_I16, 32))
        s = _pair_sums(builder, builder.zext(v, _vt(_I32, 32)), xv)
        isum = s if isum is None else builder.add(isum, s)
    return isum


@intrinsic
def _q5_k_sb(typingctx, acc, w, wo, h, ho, sm, smo, x, xo, xs, xso, sd, smin):
    """acc + one super-block's 16 lane sums: sd * sc * sum q x - smin * m * sum x (sc | m: 8 + 8
    bytes at smo; lane t is sub-block t // 2)."""
    if not _c_arrays(w, h, sm, x, xs):
        return None

    def codegen(context, builder, sig, args):
        acc, w, wo, h, ho, sm, smo, x, xo, xs, xso, sd, smin = args
        ta = sig.args
        isum = _isum(context, builder, (ta[1], ta[3], ta[7]), (w, wo, h, ho, x, xo), 8)
        xsv = _load(context, builder, ta[9], xs, xso, _vt(_I32, G))
        pairs = ir.Constant(_vt(_I32, G), [i // 2 for i in range(G)])
        s8, m8 = (_load(context, builder, ta[5], sm, builder.add(smo, ir.Constant(smo.type, o)), _vt(_I8, 8))
                  for o in (0, 8))
        scv = builder.zext(builder.shuffle_vector(s8, s8, pairs), _vt(_I32, G))
        mv = builder.zext(builder.shuffle_vector(m8, m8, pairs), _vt(_I32, G))
        a = builder.sitofp(builder.mul(isum, scv), _vt(_F32, G))
        acc = builder.fadd(acc, builder.fmul(a, _splat(builder, sd), flags=("contract",)), flags=("contract",))
        b = builder.sitofp(builder.mul(xsv, mv), _vt(_F32, G))
        return builder.fsub(acc, builder.fmul(b, _splat(builder, smin), flags=("contract",)), flags=("contract",))
    return F32X16(acc, w, wo, h, ho, sm, smo, x, xo, xs, xso, sd, smin), codegen


@intrinsic
def _q5_0_group(typingctx, acc, w, wo, h, ho, x, xo, xs, xso, d, do, xd, xdo):
    """acc + (16 block sums of a group - 16 * x's block sums) * (d * xd)."""
    if not _c_arrays(w, h, x, xs, d, xd):
        return None

    def codegen(context, builder, sig, args):
        acc, w, wo, h, ho, x, xo, xs, xso, d, do, xd, xdo = args
        ta = sig.args
        isum = _isum(context, builder, (ta[1], ta[3], ta[5]), (w, wo, h, ho, x, xo), 16)
        xsv = _load(context, builder, ta[7], xs, xso, _vt(_I32, G))
        isum = builder.sub(isum, builder.shl(xsv, _const(_I32, 4, G)))
        dh = _load(context, builder, ta[9], d, do, _vt(_I16, G))
        scale = builder.fmul(builder.fpext(builder.bitcast(dh, _vt(ir.HalfType(), G)), _vt(_F32, G)),
                             _load(context, builder, ta[11], xd, xdo, _vt(_F32, G)))
        prod = builder.fmul(builder.sitofp(isum, _vt(_F32, G)), scale, flags=("contract",))
        return builder.fadd(acc, prod, flags=("contract",))
    return F32X16(acc, w, wo, h, ho, x, xo, xs, xso, d, do, xd, xdo), codegen


@njit(cache=True, inline="always")
def _q5_0_tail(q, qo, h, ho, xq, xo):
    # a block after the last full group, in the file's order (none in Qwen3's shapes: k / 32 is
    # a multiple of 16 there, so a scalar loop); q 0..31, the caller takes off 16 * x's sum
    s = 0
    for j in range(32):
        nib = (np.int32(q[qo + (j & 15)]) >> (4 * (j >> 4))) & 15
        s += (nib | (((np.int32(h[ho + (j >> 3)]) >> (j & 7)) & 1) << 4)) * np.int32(xq[xo + j])
    return s


# -- the weights (from the file's bytes, once) ---------------------------------------------

# The repacks move 2-byte pairs (uint16 views, qtensor.u16) as int8_cpu's and int8_k_cpu's do.

@njit(cache=True, inline="always")
def _even_bits(x):
    # bits 0, 2, .., 14 of x -> bits 0..7
    x &= 0x5555
    x = (x | (x >> 1)) & 0x3333
    x = (x | (x >> 2)) & 0x0F0F
    return (x | (x >> 4)) & 0x00FF


@njit(parallel=True, cache=True)
def _pack_q5_k(raw, w, q, h, sm, d, dmin):
    # w: raw as uint16 (R, 88 nsb): d, dmin, 6 pairs of scale bytes, 16 of fifth bits (element
    # E: bit E >> 5 of byte E % 32), 64 of nibbles (as Q4_K's); q, h as uint16
    for r in prange(raw.shape[0]):
        for b in range(d.shape[1]):
            o = 88 * b
            d[r, b], dmin[r, b] = w[r, o], w[r, o + 1]
            _scales_q4_k(raw, r, 176 * b + 4, sm, 16 * b)
            _nibbles_q4_k(w, r, o + 24, q, 64 * b)
            for t in range(16):  # pair t: bit p of byte e holds step p's element 16t + 2p + e
                i, sh = o + 8 + 8 * (t & 1), t >> 1
                v = 0
                for p in range(8):
                    v |= ((w[r, i + p] >> sh) & 0x0101) << p
                h[r, 16 * b + t] = v


@njit(parallel=True, cache=True)
def _pack_q5_0(raw, w, q, h, d):
    # w: raw as uint16 (R, 11 nb): d, 2 pairs of qh (bit j: element j), 8 of nibble bytes
    # (file bytes 2c, 2c + 1 -> chunk c, as int8_cpu's Q4_0); q, h as uint16
    nb = d.shape[1]
    ng = nb // G
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = w[r, 11 * b]
        for g in range(ng):
            for c in range(8):
                for t in range(G):
                    q[r, 128 * g + 16 * c + t] = w[r, 11 * (G * g + t) + 3 + c]
            for u in range(2):  # pair u of lane t: step 8u + s (elements 16u + 2s + e) at bit s
                for t in range(G):
                    x = w[r, 11 * (G * g + t) + 1 + u]
                    h[r, 32 * g + 16 * u + t] = _even_bits(x) | (_even_bits(x >> 1) << 8)
        for b in range(ng * G, nb):  # the file's order: 8 pairs of nibbles, 2 of qh
            for c in range(8):
                q[r, 8 * b + c] = w[r, 11 * b + 3 + c]
            for u in range(2):
                h[r, 2 * b + u] = w[r, 11 * b + 1 + u]


@dataclass(frozen=True)
class Q5Packed:
    """q: nibbles uint8 (rows, k/2); h: fifth bits uint8 (rows, k/8); d: float16 bits, uint16
    (rows, k/256) for Q5_K, (rows, k/32) for Q5_0; Q5_K also s uint8 (rows, k/16: per
    super-block 8 scales then 8 minimums) and dmin (as d). A stack of experts is rows =
    n_mats * rows of one; every array's first axis is rows."""
    type: T
    rows: int
    k: int
    q: np.ndarray
    h: np.ndarray
    d: np.ndarray
    s: np.ndarray | None = None
    dmin: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def row_slice(self, lo: int, hi: int) -> "Q5Packed":
        """Rows lo:hi (an expert, a tile) as views."""
        return replace(self, rows=hi - lo, **{n: a[lo:hi] for n, a in self.arrays().items()})


def pack(*ws: QTensor, after=None) -> Q5Packed:
    """A matrix, or several stacked into one (qtensor.stack_parts), each packed into its rows."""
    w = ws[0]
    if w.type not in (T.Q5_K, T.Q5_0):
        raise UnsupportedQuantType(f"{w.name}: these kernels take Q5_K or Q5_0, not {w.type.name}")
    rows, parts = stack_parts(list(ws))
    R, k = w.n_mats * rows, w.k
    q, h = np.empty((R, k // 2), np.uint8), np.empty((R, k // 8), np.uint8)
    k5 = w.type == T.Q5_K
    d = np.empty((R, k // (256 if k5 else 32)), np.uint16)
    s, dmin = (np.empty((R, k // 16), np.uint8), np.empty_like(d)) if k5 else (None, None)
    q16, h16 = q.view(np.uint16), h.view(np.uint16)
    for raw, at in parts:
        n, raw = raw.shape[0], np.ascontiguousarray(raw)
        if k5:
            _pack_q5_k(raw, u16(raw), q16[at:at + n], h16[at:at + n], s[at:at + n], d[at:at + n], dmin[at:at + n])
        else:
            _pack_q5_0(raw, u16(raw), q16[at:at + n], h16[at:at + n], d[at:at + n])
        if after is not None:  # the caller may let this part's file pages go
            after(at, n)
    return Q5Packed(w.type, R, k, q, h, d, s, dmin)


# -- the products --------------------------------------------------------------------------

# A few rows of x at once, each as alone: variants of int8_cpu.rows_body.

@njit(cache=True, inline="always")
def _q5_k_steps(w):  # (q, h, s, d, dmin): a step is a super-block
    return w[3].shape[0], w[3].shape[1]


@njit(cache=True, inline="always")
def _q5_k_step(acc, w, x, o, r, b):
    q, h, s, d, dmin = w[0], w[1], w[2], w[3], w[4]
    i = r * d.shape[1] + b
    xd = x[1][o[1] + b]
    return _q5_k_sb(acc, q, i * 128, h, i * 32, s, i * 16, x[0], o[0] + b * 256, x[2], o[2] + b * 16,
                    _f16(d, i) * xd, _f16(dmin, i) * xd)


@njit(cache=True, inline="always")
def _q5_0_steps(w):  # (q, h, d, ...): a step is a group of G blocks
    return w[2].shape[0], w[2].shape[1] // G


@njit(cache=True, inline="always")
def _q5_0_step(acc, w, x, o, r, g):
    q, h, d = w[0], w[1], w[2]
    nb = d.shape[1]
    return _q5_0_group(acc, q, r * nb * 16 + g * 16 * G, h, r * nb * 4 + g * 4 * G, x[0], o[0] + g * 32 * G,
                       x[2], o[2] + g * G, d, r * nb + g * G, x[1], o[1] + g * G)


@njit(cache=True, inline="always")
def _q5_0_end(acc, w, x, o, r, t, out):
    q, h, d = w[0], w[1], w[2]
    nb = d.shape[1]
    s = _hsum(acc)
    for b in range(nb // G * G, nb):  # the blocks after the last full group
        isum = _q5_0_tail(q[r], b * 16, h[r], b * 4, x[0], o[0] + b * 32) - 16 * x[2][o[2] + b]
        s += (_f16(d, r * nb + b) * x[1][o[1] + b]) * np.float32(isum)
    out[t, r] = s


# A lone row: see int8_cpu._mv1_q8_0.

@njit(parallel=True, cache=True)
def _mv1_q5_k(xq, xd, xs, q, h, s, d, dmin, out):
    R, nsb = d.shape
    for r in prange(R):
        acc = _vzero()
        for b in range(nsb):
            i = r * nsb + b
            acc = _q5_k_sb(acc, q, i * 128, h, i * 32, s, i * 16, xq, b * 256, xs, b * 16,
                           _f16(d, i) * xd[b], _f16(dmin, i) * xd[b])
        out[r] = _hsum(acc)


@njit(parallel=True, cache=True)
def _mv1_q5_0(xq, xd, xs, q, h, d, out):
    R, nb = d.shape
    ng = nb // G
    for r in prange(R):
        acc = _vzero()
        for g in range(ng):
            acc = _q5_0_group(acc, q, r * nb * 16 + g * 16 * G, h, r * nb * 4 + g * 4 * G, xq, g * 32 * G,
                              xs, g * G, d, r * nb + g * G, xd, g * G)
        s = _hsum(acc)
        for b in range(ng * G, nb):
            isum = _q5_0_tail(q[r], b * 16, h[r], b * 4, xq, b * 32) - 16 * xs[b]
            s += (_f16(d, r * nb + b) * xd[b]) * np.float32(isum)
        out[r] = s


_mv_q5_k = variant(int8_cpu.rows_body, "_mv_q5_k", {"_steps": _q5_k_steps, "_step": _q5_k_step,
                                                    "_end": int8_k_cpu.sum_end}, parallel=True, cache=True)
_mv_q5_0 = variant(int8_cpu.rows_body, "_mv_q5_0", {"_steps": _q5_0_steps, "_step": _q5_0_step, "_end": _q5_0_end},
                   parallel=True, cache=True)


def matvec_rows(x: np.ndarray, w: Q5Packed, out: np.ndarray | None = None) -> np.ndarray:
    """x (n, k) float32 @ W.T -> (n, rows) float32 for a few rows, each quantized to 8 bits
    first (Q8_K for Q5_K, Q8_0 for Q5_0)."""
    out = int8_cpu.check_rows(x, w, out)
    if w.type == T.Q5_K:
        xq, xd, xs = int8_cpu.quantize_rows(x, int8_k_cpu.quantize_x)
        if x.shape[0] == 1:
            _mv1_q5_k(xq[0], xd[0], xs[0], w.q, w.h, w.s, w.d, w.dmin, out[0])
        else:
            _mv_q5_k(*int8_cpu.rows_args(xq, xd, xs, w.q, w.h, w.s, w.d, w.dmin), out)
    else:
        xq, xd, xs = int8_cpu.quantize_rows(x)
        if x.shape[0] == 1:
            _mv1_q5_0(xq[0], xd[0], xs[0], w.q, w.h, w.d, out[0])
        else:
            _mv_q5_0(*int8_cpu.rows_args(xq, xd, xs, w.q, w.h, w.d), out)
    return out


def matvec(x: np.ndarray, w: Q5Packed, out: np.ndarray | None = None) -> np.ndarray:
    """x (k,) float32 @ W.T -> (rows,) float32: matvec_rows of one row."""
    return int8_cpu.matvec(x, w, out, matvec_rows)


# -- dequantization (prefill tiles, embedding rows) ----------------------------------------

@njit(cache=True, nogil=True)
def _deq_q5_k(q, h, sm, d, dmin, rows, out):
    nsb = d.shape[1]
    for n in range(rows.shape[0]):
        r = rows[n]
        for b in range(nsb):
            dd, dm = _f16(d, r * nsb + b), _f16(dmin, r * nsb + b)
            for t in range(16):
                # gguf's order of float32 operations: (d * sc) * q - dmin * m
                d1 = dd * np.float32(sm[r, b * 16 + (t >> 1)])
                m1 = dm * np.float32(sm[r, b * 16 + 8 + (t >> 1)])
                for e in range(2):
                    hb = h[r, b * 32 + 2 * t + e]
                    for p in range(8):
                        nib = (q[r, b * 128 + 32 * (p & 3) + 2 * t + e] >> (4 * (p >> 2))) & 15
                        out[n, b * 256 + 16 * t + 2 * p + e] = d1 * np.float32(nib | (((hb >> p) & 1) << 4)) - m1


@njit(cache=True, nogil=True)
def _deq_q5_0(q, h, d, rows, out):
    nb = d.shape[1]
    ng = nb // G
    for n in range(rows.shape[0]):
        r = rows[n]
        for b in range(ng * G):
            dd, g, t = _f16(d, r * nb + b), b // G, b % G
            for u in range(2):  # steps 8u + s: chunk s, nibble u; fifth bits: chunk u, bit s
                for e in range(2):
                    hb = h[r, g * 4 * G + 32 * u + 2 * t + e]
                    for s in range(8):
                        nib = (q[r, g * 16 * G + s * 2 * G + 2 * t + e] >> (4 * u)) & 15
                        out[n, b * 32 + 16 * u + 2 * s + e] = dd * np.float32((nib | (((hb >> s) & 1) << 4)) - 16)
        for b in range(ng * G, nb):
            dd = _f16(d, r * nb + b)
            for j in range(32):
                nib = (q[r, b * 16 + (j & 15)] >> (4 * (j >> 4))) & 15
                bit = (h[r, b * 4 + (j >> 3)] >> (j & 7)) & 1
                out[n, b * 32 + j] = dd * np.float32((nib | (bit << 4)) - 16)


def _deq(w: Q5Packed, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if rows.size and (rows.min() < 0 or rows.max() >= w.rows):
        raise IndexError(f"rows {rows.min()}..{rows.max()} of a {w.rows}-row matrix")
    out = np.empty((rows.shape[0], w.k), np.float32) if out is None else out
    if w.type == T.Q5_K:
        _deq_q5_k(w.q, w.h, w.s, w.d, w.dmin, rows, out)
    else:
        _deq_q5_0(w.q, w.h, w.d, rows, out)
    return out


def dequant(w: Q5Packed, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows lo:hi as float32 (hi - lo, k), equal to gguf's dequantization of the file's bytes."""
    return _deq(w, np.arange(w.rows)[lo:hi], out)


def take(w: Q5Packed, ids) -> np.ndarray:
    """Rows ids as float32 (an embedding lookup)."""
    return _deq(w, np.asarray(ids, np.int64).reshape(-1), None)
