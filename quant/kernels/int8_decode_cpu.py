"""Decode products with x quantized to 8 bits, over matmul_cpu's `Packed` arrays as they are.

int8_cpu.py / int8_k_cpu.py need layouts of their own (blocks as vector lanes, float16
scales); the engine keeps one copy of the weights, in `Packed`'s layout, so these kernels read
that: elements of a block contiguous, float32 scales. x is quantized once per product as Q8_0
(`quantize_x`: ggml's rounding, d = max|x| / 127 per 32). A block of 32 weights then meets its
block of x in one step (int8_cpu's `_pair_sums`: widen, multiply, add neighbouring lanes,
which LLVM maps to vpmaddwd): 16 exact int32 sums of element pairs, converted to float and
multiplied into a <16 x float> accumulator by the block's scale d * xd. Lanes are never summed
across inside the row loop (a horizontal add per block would cost more than the float kernel
saves); the row ends with one. Q6_K has a scale per 16: lanes 0-7 of a block are its first
16 elements, lanes 8-15 the next, so the scale vector is two splats.

Q4_0 / Q4_K bytes hold elements j (low nibble) and j + 16 (high) of a block, so the two nibble
halves side by side are the block in order. Their offsets (Q4_0: 8 d; Q4_K: the minimums)
use the exact quant sums of x per block: sum_b o_b * xd_b * sum(xq in b), a flat float loop.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .int8_cpu import F32X16, G, _F32, _I8, _I32, _c_arrays, _hsum, _load, _pair_sums, _quantize_x, _vt, _vzero

_I16 = ir.IntType(16)
# Rows of x up to which a product per row beats the float kernel: the Q8_0 / Q6_K float kernels
# read the weights once for all rows, and at 8 rows won (int8 0.85x on 6144 x 1024, Zen 5);
# the Q4 float kernel also works row by row (int8 1.55x at 8 rows).
MAX_ROWS = {T.Q8_0: 4, T.Q6_K: 4, T.Q4_0: 8, T.Q4_K: 8}


def _step(four_bit):
    @intrinsic
    def step(typingctx, acc, w, wo, x, xo, s0, s1):
        """acc + (pair sums of block w[wo:] . x[xo:]) * scales, s0 on lanes 0-7, s1 on 8-15."""
        if not _c_arrays(w, x) or s0 != types.float32 or s1 != types.float32:
            return None

        def codegen(context, builder, sig, args):
            acc, w, wo, x, xo, s0, s1 = args
            ta = sig.args
            if four_bit:
                b = _load(context, builder, ta[1], w, wo, _vt(_I8, 16))
                lo = builder.and_(b, ir.Constant(b.type, [15] * 16))
                hi = builder.lshr(b, ir.Constant(b.type, [4] * 16))
                both = builder.shuffle_vector(lo, hi, ir.Constant(_vt(_I32, 32), list(range(32))))
                wv = builder.zext(both, _vt(_I32, 32))
            else:
                wv = builder.sext(_load(context, builder, ta[1], w, wo, _vt(_I8, 32)), _vt(_I32, 32))
            xv = _load(context, builder, ta[3], x, xo, _vt(_I16, 32))
            isum = _pair_sums(builder, wv, xv)
            two = builder.insert_element(ir.Constant(_vt(_F32, 2), None), s0, ir.Constant(_I32, 0))
            two = builder.insert_element(two, s1, ir.Constant(_I32, 1))
            scale = builder.shuffle_vector(two, two, ir.Constant(_vt(_I32, G), [0] * 8 + [1] * 8))
            prod = builder.fmul(builder.sitofp(isum, _vt(_F32, G)), scale, flags=("contract",))
            return builder.fadd(acc, prod, flags=("contract",))
        return F32X16(acc, w, wo, x, xo, s0, s1), codegen
    return step


_q8_step = _step(False)
_q4_step = _step(True)


# -- the activation ------------------------------------------------------------------------

def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (k,) float32 -> (quants as int16 in x's order, float32 scale per 32, int32 quant sum per 32)."""
    x = np.ascontiguousarray(x, np.float32)
    nb = x.shape[0] // 32
    xq, xd, xs = np.empty(nb * 32, np.int16), np.empty(nb, np.float32), np.empty(nb, np.int32)
    _quantize_x(x, xq, xd, xs, 0)  # ggml's Q8_0 rounding, in x's order
    return xq, xd, xs


# -- the products --------------------------------------------------------------------------

@intrinsic
def _vadd(typingctx, a, b):
    return F32X16(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


# Four accumulators, blocks dealt round-robin: one accumulator makes every block wait for the
# previous block's multiply-add (4 cycles on Zen 5), which measured as the loop's bound.

@njit(parallel=True, cache=True)
def _mv_q8_0(xq, xd, q, d, out):
    R, k = q.shape
    nb = k // 32
    for r in prange(R):
        a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
        for b in range(0, nb - 3, 4):
            o = r * k + b * 32
            s0, s1, s2, s3 = d[r, b] * xd[b], d[r, b + 1] * xd[b + 1], d[r, b + 2] * xd[b + 2], d[r, b + 3] * xd[b + 3]
            a0 = _q8_step(a0, q, o, xq, b * 32, s0, s0)
            a1 = _q8_step(a1, q, o + 32, xq, b * 32 + 32, s1, s1)
            a2 = _q8_step(a2, q, o + 64, xq, b * 32 + 64, s2, s2)
            a3 = _q8_step(a3, q, o + 96, xq, b * 32 + 96, s3, s3)
        for b in range(nb - nb % 4, nb):
            s = d[r, b] * xd[b]
            a0 = _q8_step(a0, q, r * k + b * 32, xq, b * 32, s, s)
        out[r] = _hsum(_vadd(_vadd(a0, a1), _vadd(a2, a3)))


@njit(parallel=True, cache=True)
def _mv_q6_k(xq, xd, q, d, out):
    # k is a multiple of 256: no tail
    R, k = q.shape
    for r in prange(R):
        a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
        for b in range(0, k // 32, 4):
            o, g = r * k + b * 32, 2 * b
            a0 = _q8_step(a0, q, o, xq, b * 32, d[r, g] * xd[b], d[r, g + 1] * xd[b])
            a1 = _q8_step(a1, q, o + 32, xq, b * 32 + 32, d[r, g + 2] * xd[b + 1], d[r, g + 3] * xd[b + 1])
            a2 = _q8_step(a2, q, o + 64, xq, b * 32 + 64, d[r, g + 4] * xd[b + 2], d[r, g + 5] * xd[b + 2])
            a3 = _q8_step(a3, q, o + 96, xq, b * 32 + 96, d[r, g + 6] * xd[b + 3], d[r, g + 7] * xd[b + 3])
        out[r] = _hsum(_vadd(_vadd(a0, a1), _vadd(a2, a3)))


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4(xq, xd, xds, q, d, o, factor, out):
    # xds = xd * sum(xq) per block; o = d, factor 8 for Q4_0 (q - 8), the minimums and 1 for Q4_K
    R, kh = q.shape
    nb = kh // 16
    for r in prange(R):
        a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
        for b in range(0, nb - 3, 4):
            w = r * kh + b * 16
            s0, s1, s2, s3 = d[r, b] * xd[b], d[r, b + 1] * xd[b + 1], d[r, b + 2] * xd[b + 2], d[r, b + 3] * xd[b + 3]
            a0 = _q4_step(a0, q, w, xq, b * 32, s0, s0)
            a1 = _q4_step(a1, q, w + 16, xq, b * 32 + 32, s1, s1)
            a2 = _q4_step(a2, q, w + 32, xq, b * 32 + 64, s2, s2)
            a3 = _q4_step(a3, q, w + 48, xq, b * 32 + 96, s3, s3)
        for b in range(nb - nb % 4, nb):
            s = d[r, b] * xd[b]
            a0 = _q4_step(a0, q, r * kh + b * 16, xq, b * 32, s, s)
        c = np.float32(0.0)
        for b in range(nb):
            c += o[r, b] * xds[b]
        out[r] = _hsum(_vadd(_vadd(a0, a1), _vadd(a2, a3))) - factor * c


def matvec(x: np.ndarray, w, out: np.ndarray) -> None:
    """out (rows,) = x (k,) @ W.T for a Packed Q8_0 / Q6_K / Q4_0 / Q4_K matrix, x quantized first."""
    xq, xd, xs = quantize_x(x)
    if w.type == T.Q8_0:
        _mv_q8_0(xq, xd, w.q, w.d, out)
    elif w.type == T.Q6_K:
        _mv_q6_k(xq, xd, w.q, w.d, out)
    else:
        o, factor = (w.o, np.float32(1)) if w.type == T.Q4_K else (w.d, np.float32(8))
        _mv_q4(xq, xd, xd * xs.astype(np.float32), w.q, w.d, o, factor, out)


def matmul(x: np.ndarray, w, out: np.ndarray) -> None:
    """Few rows of x: one product per row (each row quantized once)."""
    for i in range(x.shape[0]):
        matvec(x[i], w, out[i])
