"""MoE decode over the int8 layouts: the selected experts' products in one launch per stack.

experts_cpu.py does this for the float kernels: output slot s is x[xi[s]] @ expert ids[s] of
the stack, and all slots' rows share one parallel loop, since a launch per expert (8 of 128 in
Qwen3-30B-A3B, two stacks a layer) costs about what its small product does. Here the stacks
are int8_cpu.pack / int8_k_cpu.pack of an expert stack, and the inner steps are those modules'
intrinsics. Each distinct row of x is quantized once (the slots that share a row share its
quants), as Q8_0 per 32 for Q8_0 / Q4_0 and as Q8_K per 256 for Q4_K / Q6_K, in the modules'
lane order.

Q5_K / Q5_0 stacks (int8_q5_cpu.pack) run that module's steps the same way, x as Q8_K / Q8_0;
their Q5Packed counts the whole stack's rows, so the caller passes an expert's (`rows`).

Where the CPU has AVX512-VNNI, Q4_0 and Q4_K rows take the modules' vpdpbusd steps against x
quantized as int8 in their quad order (the tail blocks of Q4_0 in the file's order, read as int8);
where it has AVX2 but not VNNI, Q4_0, Q4_K and Q6_K rows take their vpmaddubsw steps against x
as int8 in the generic order.

Q8_0 / Q4_0 rows whose block count is not a multiple of 16 (the down projection, k = 768: one
group and 8 blocks) keep those blocks in the file's order; they go through the block step
(`_step`), which adds a block's pair sums times its scale into the group accumulator, so the
row still ends with one horizontal add instead of one per block. Q4_0's - 8 on those blocks is
taken from x's exact quant sums, once per row.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import int8_cpu, int8_k_cpu
from .int8_cpu import (F32X16, G, _F32, _I8, _I32, Int8Packed, _c_arrays, _f16, _hsum, _load, _pair_sums,
                       _q4_group, _q8_group, _vt, _vzero)
from .int8_k_cpu import _I16, KPacked, _q4_k_sb, _q6_k_sb
from .int8_q5_cpu import Q5Packed, _q5_0_group, _q5_0_tail, _q5_k_sb
from .variants import variant

# -- one block of 32 in the file's order (the blocks after the last group of 16) -------------


def _step(four_bit, x8=False):
    @intrinsic
    def step(typingctx, acc, w, wo, x, xo, s0, s1):
        """acc + (pair sums of block w[wo:] . x[xo:]) * scales, s0 on lanes 0-7, s1 on 8-15;
        x int16, or int8 (x8: the VNNI kernels' x, whose tail blocks are in the file's order)."""
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
            xv = _load(context, builder, ta[3], x, xo, _vt(_I8 if x8 else _I16, 32))
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
_q4_step8 = _step(True, x8=True)


# -- the activation: each row of x once ------------------------------------------------------


@njit(cache=True)
def _quantize_rows_q8_0(x, xq, xd, xs, quad):
    for i in range(x.shape[0]):
        int8_cpu._quantize_x(x[i], xq[i], xd[i], xs[i], x.shape[1] // 32 // G, quad)


@njit(cache=True)
def _quantize_rows_q8_k(x, xq, xd, xs, quad):
    for i in range(x.shape[0]):
        int8_k_cpu._quantize_x(x[i], xq[i], xd[i], xs[i], quad)


def quantize_rows(x: np.ndarray, k_quants: bool, quad: bool = False,
                  pairs8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (m, k) float32 -> per row what int8_cpu.quantize_x (k_quants: int8_k_cpu's) returns,
    stacked: quants int16 (m, k) (quad: int8 in the VNNI kernels' order; pairs8: int8 in the
    int16 order, the AVX2 kernels'), scales float32 (m, k / 32 | k / 256), sums int32 (m, k / 32 | k / 16)."""
    m, k = x.shape
    xq = np.empty((m, k), np.int8 if quad or pairs8 else np.int16)
    if k_quants:
        xd, xs = np.empty((m, k // 256), np.float32), np.empty((m, k // 16), np.int32)
        _quantize_rows_q8_k(x, xq, xd, xs, quad)
    else:
        xd, xs = np.empty((m, k // 32), np.float32), np.empty((m, k // 32), np.int32)
        _quantize_rows_q8_0(x, xq, xd, xs, quad)
    return xq, xd, xs


# -- the products: CHUNK rows of one slot per iteration -------------------------------------
# Offsets into the intrinsics' arrays are flat element offsets (they load from the data pointer):
# row `row` of the stack, row `xr` of x. A row of the down projection is ~100 cycles of work, so
# the iteration's divisions and index loads are paid once per CHUNK rows, not per row. One body
# (`_ids`) runs every type's slots; each type's kernel is it with that type's row product
# (variants.py).
CHUNK = 16


def _ids(xq, xd, xs, ids, xi, rows, w, out):
    # w: the stack's arrays as the variant's `_row` (one row's product, inlined) takes them
    n = (rows + CHUNK - 1) // CHUNK
    for t in prange(ids.shape[0] * n):
        s, c = t // n, t % n
        xr, e0 = xi[s], ids[s] * rows
        for r in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
            out[s, r] = _row(xq, xd, xs, xr, e0 + r, w)


@njit(cache=True, inline="always")
def _row_q8_0(xq, xd, xs, xr, row, w):
    q, d = w
    k = q.shape[1]
    nb = k // 32
    ng = nb // G
    acc = _vzero()
    for g in range(ng):
        acc = _q8_group(acc, q, row * k + g * 32 * G, xq, xr * k + g * 32 * G, xs, xr * nb + g * G,
                        d, row * nb + g * G, xd, xr * nb + g * G)
    for b in range(ng * G, nb):
        sc = _f16(d, row * nb + b) * xd[xr, b]
        acc = _q8_step(acc, q, row * k + b * 32, xq, xr * k + b * 32, sc, sc)
    return _hsum(acc)


@njit(cache=True, inline="always")
def _row_q4_0(xq, xd, xs, xr, row, w):
    q, d = w
    kh = q.shape[1]
    k, nb = 2 * kh, kh // 16
    ng = nb // G
    acc = _vzero()
    for g in range(ng):
        acc = _q4_group(acc, q, row * kh + g * 16 * G, xq, xr * k + g * 32 * G, xs, xr * nb + g * G,
                        d, row * nb + g * G, xd, xr * nb + g * G)
    tail = np.float32(0.0)  # the tail's sum of scale * x's quant sum: its nibbles are q + 8
    for b in range(ng * G, nb):
        sc = _f16(d, row * nb + b) * xd[xr, b]
        acc = _q4_step(acc, q, row * kh + b * 16, xq, xr * k + b * 32, sc, sc)
        tail += sc * np.float32(xs[xr, b])
    return _hsum(acc) - np.float32(8.0) * tail


@njit(cache=True, inline="always")
def _row_q4_k(xq, xd, xs, xr, row, w):
    q, sm, d, dmin = w
    nsb = d.shape[1]
    k = nsb * 256
    acc = _vzero()
    for b in range(nsb):
        i = row * nsb + b
        acc = _q4_k_sb(acc, q, i * 128, sm, i * 16, xq, xr * k + b * 256, xs, xr * nsb * 16 + b * 16,
                       _f16(d, i) * xd[xr, b], _f16(dmin, i) * xd[xr, b])
    return _hsum(acc)


@njit(cache=True, inline="always")
def _row_q6_k(xq, xd, xs, xr, row, w):
    q, sc, d = w
    nsb = d.shape[1]
    k = nsb * 256
    acc = _vzero()
    for b in range(nsb):
        i = row * nsb + b
        acc = _q6_k_sb(acc, q, i * 192, sc, i * 16, xq, xr * k + b * 256, xs, xr * nsb * 16 + b * 16,
                       _f16(d, i) * xd[xr, b], np.float32(0))
    return _hsum(acc)


@njit(cache=True, inline="always")
def _row_q5_k(xq, xd, xs, xr, row, w):
    # int8_q5_cpu._mv_q5_k's row
    q, h, sm, d, dmin = w
    nsb = d.shape[1]
    k = nsb * 256
    acc = _vzero()
    for b in range(nsb):
        i = row * nsb + b
        acc = _q5_k_sb(acc, q, i * 128, h, i * 32, sm, i * 16, xq, xr * k + b * 256, xs, xr * nsb * 16 + b * 16,
                       _f16(d, i) * xd[xr, b], _f16(dmin, i) * xd[xr, b])
    return _hsum(acc)


@njit(cache=True, inline="always")
def _row_q5_0(xq, xd, xs, xr, row, w):
    # int8_q5_cpu._mv_q5_0's row
    q, h, d = w
    nb = d.shape[1]
    k, ng = nb * 32, nb // G
    acc = _vzero()
    for g in range(ng):
        acc = _q5_0_group(acc, q, row * nb * 16 + g * 16 * G, h, row * nb * 4 + g * 4 * G, xq,
                          xr * k + g * 32 * G, xs, xr * nb + g * G, d, row * nb + g * G, xd, xr * nb + g * G)
    v = _hsum(acc)
    for b in range(ng * G, nb):
        isum = _q5_0_tail(q[row], b * 16, h[row], b * 4, xq[xr], b * 32) - 16 * xs[xr, b]
        v += (_f16(d, row * nb + b) * xd[xr, b]) * np.float32(isum)
    return v


_row = None  # only a variant's own globals bind it

# With AVX512-VNNI, Q4_0 / Q4_K rows take the vpdpbusd steps against x as int8 in quad steps
# (int8_cpu / int8_k_cpu), the same integer sums: the same result bit for bit.
_INLINE = {"cache": True, "inline": "always"}
_row_q4_0_vnni = variant(_row_q4_0.py_func, "_row_q4_0_vnni",
                         {"_q4_group": int8_cpu._q4_group_vnni, "_q4_step": _q4_step8}, **_INLINE)
_row_q4_k_vnni = variant(_row_q4_k.py_func, "_row_q4_k_vnni", {"_q4_k_sb": int8_k_cpu._q4_k_sb_vnni}, **_INLINE)


# Without VNNI but with AVX2, Q4_0 / Q4_K / Q6_K rows take the vpmaddubsw steps against x as
# int8 in the generic order (Q4_0's tail blocks in the file's order), bit for bit the same.
_row_q4_0_ub = variant(_row_q4_0.py_func, "_row_q4_0_ub",
                       {"_q4_group": int8_cpu._q4_group_ub, "_q4_step": _q4_step8}, **_INLINE)
_row_q4_k_ub = variant(_row_q4_k.py_func, "_row_q4_k_ub", {"_q4_k_sb": int8_k_cpu._q4_k_sb_ub}, **_INLINE)
_row_q6_k_ub = variant(_row_q6_k.py_func, "_row_q6_k_ub", {"_q6_k_sb": int8_k_cpu._q6_k_sb_ub}, **_INLINE)

_KERNEL = {"parallel": True, "cache": True}
_ids_q8_0 = variant(_ids, "_ids_q8_0", {"_row": _row_q8_0}, **_KERNEL)
_ids_q4_0 = variant(_ids, "_ids_q4_0", {"_row": _row_q4_0}, **_KERNEL)
_ids_q4_k = variant(_ids, "_ids_q4_k", {"_row": _row_q4_k}, **_KERNEL)
_ids_q6_k = variant(_ids, "_ids_q6_k", {"_row": _row_q6_k}, **_KERNEL)
_ids_q5_k = variant(_ids, "_ids_q5_k", {"_row": _row_q5_k}, **_KERNEL)
_ids_q5_0 = variant(_ids, "_ids_q5_0", {"_row": _row_q5_0}, **_KERNEL)
_ids_q4_0_vnni = variant(_ids, "_ids_q4_0_vnni", {"_row": _row_q4_0_vnni}, **_KERNEL)
_ids_q4_k_vnni = variant(_ids, "_ids_q4_k_vnni", {"_row": _row_q4_k_vnni}, **_KERNEL)
_VNNI = {T.Q4_0: _ids_q4_0_vnni, T.Q4_K: _ids_q4_k_vnni}
_ids_q4_0_ub = variant(_ids, "_ids_q4_0_ub", {"_row": _row_q4_0_ub}, **_KERNEL)
_ids_q4_k_ub = variant(_ids, "_ids_q4_k_ub", {"_row": _row_q4_k_ub}, **_KERNEL)
_ids_q6_k_ub = variant(_ids, "_ids_q6_k_ub", {"_row": _row_q6_k_ub}, **_KERNEL)
_AVX2 = {T.Q4_0: _ids_q4_0_ub, T.Q4_K: _ids_q4_k_ub, T.Q6_K: _ids_q6_k_ub}

# per type: its kernel, whether x is quantized per 256 (Q8_K) rather than per 32 (Q8_0), and
# the stack's arrays in its row product's order
_KERNELS = {
    T.Q8_0: (_ids_q8_0, False, lambda w: (w.q, w.d)),
    T.Q4_0: (_ids_q4_0, False, lambda w: (w.q, w.d)),
    T.Q4_K: (_ids_q4_k, True, lambda w: (w.q, w.s, w.d, w.dmin)),
    T.Q6_K: (_ids_q6_k, True, lambda w: (w.q, w.s, w.d)),
    T.Q5_K: (_ids_q5_k, True, lambda w: (w.q, w.h, w.s, w.d, w.dmin)),
    T.Q5_0: (_ids_q5_0, False, lambda w: (w.q, w.h, w.d)),
}


def matmul_ids(x: np.ndarray, w: Int8Packed | KPacked | Q5Packed, ids: np.ndarray, xi: np.ndarray,
               out: np.ndarray | None = None, rows: int | None = None, vnni: bool | None = None,
               avx2: bool | None = None) -> np.ndarray:
    """out[s] = x[xi[s]] @ (expert ids[s] of the stack w).T: x (m, k) float32, out (len(ids), rows).
    Q5Packed counts the stack's rows, not an expert's: `rows` (an expert's) is then required.
    Q4_0 / Q4_K take vpdpbusd where the CPU has AVX512-VNNI (vnni: None asks the CPU); Q4_0 /
    Q4_K / Q6_K take vpmaddubsw where it has AVX2 but not VNNI (avx2: None asks)."""
    n_mats = getattr(w, "n_mats", None)
    if n_mats is None:
        if not rows or w.rows % rows:
            raise ValueError(f"a stack of {w.rows} rows needs an expert's row count, got {rows}")
        n_mats = w.rows // rows
    else:
        rows = w.rows
    x = np.ascontiguousarray(x, np.float32)
    ids, xi = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(xi, np.int64)
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"input of shape {x.shape}, weight expects (m, {w.k})")
    if ids.ndim != 1 or ids.shape != xi.shape:
        raise ValueError(f"ids {ids.shape} and xi {xi.shape}: one expert and one row of x per slot")
    # the kernels load through raw pointers: an index out of range would read outside the arrays
    if len(ids) and (ids.min() < 0 or ids.max() >= n_mats or xi.min() < 0 or xi.max() >= x.shape[0]):
        raise ValueError(f"expert ids must lie in [0, {n_mats}) and rows of x in [0, {x.shape[0]})")
    if out is None:
        out = np.empty((len(ids), rows), np.float32)
    elif out.shape != (len(ids), rows) or out.dtype != np.float32:
        raise ValueError(f"out {out.shape} {out.dtype}, expected ({len(ids)}, {rows}) float32")
    if w.type not in _KERNELS:
        raise ValueError(f"no int8 expert kernel for {w.type.name}")
    kernel, k_quants, arrays = _KERNELS[w.type]
    isa = int8_cpu.decode_isa(vnni, avx2) if w.type in _AVX2 else None
    quad, pairs8 = isa == "vnni" and w.type in _VNNI, isa == "avx2"
    if quad or pairs8:
        kernel = (_VNNI if quad else _AVX2)[w.type]
    xq, xd, xs = quantize_rows(x, k_quants, quad, pairs8)
    kernel(xq, xd, xs, ids, xi, rows, arrays(w), out)
    return out
