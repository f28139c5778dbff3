"""Prefill over int8_cpu's / int8_k_cpu's layouts (Q8_0, Q4_0, Q4_K, Q6_K): exact
dequantization (embedding rows, fallbacks) and the many-rows product, which also takes
int8_q5_cpu's Q5_K / Q5_0 (their dequantization is that module's).

`dequant` / `take` undo the layouts element for element and compute gguf-py's float32
arithmetic in its order (Q8_0 / Q4_0: d * q; Q4_K: (d * sc) * q - dmin * m; Q6_K: (d * sc) * q),
so they equal `gguf.quants.dequantize` of the file's bytes bit for bit.

`matmul` quantizes all n rows of x once, each exactly as the decode kernels quantize their one
(the decode modules' own quantizers: ggml's Q8_0 per 32 for Q8_0 / Q4_0 / Q5_0, Q8_K per 256
for Q4_K / Q5_K / Q6_K), then multiplies integers in register tiles of RW = 2 weight rows x
NX = 4 rows of x. Tasks (prange) are RT = 32 weight rows, which stay in L2 while every x tile
passes; at the end of a group / super-block the exact int32 lane sums are scaled into 8
<16 x float> accumulators (Q4_0 / Q5_0 / Q6_K first subtract 8 / 16 / 32 times x's quant sums,
Q4_K / Q5_K the float minimums: 4 vector instructions per tile entry), and each output is one
horizontal sum. Entries do not depend on the thread count; Q8_0 / Q4_0 / Q5_0 equal the decode
kernels bit for bit when k is a multiple of 512.

- Q8_0: x int16 in the decode lane order; each weight pair step (16 lanes = 16 blocks, two
  elements each) is widened once (vpmovsxbw) for 4 rows of x, each x step loaded once for 2
  weight rows: 8 vpdpwssd a step.
- Q4_0 / Q4_K / Q6_K / Q5_K / Q5_0: each task first unpacks its weight rows to a byte a weight
  (0..15 / 0..63 / 0..31, the Q5 nibbles or'ed with their fifth bits; L2-resident, reused by all
  n / 4 x tiles) and x is quantized to int8 in the same order: 64-byte units holding two pair
  steps woven (byte 4t + 2h + e: lane t, step h, element e). Then vpmaddubsw (u8 x s8, 64 MACs)
  into i16 sums, exact below 2^15 over a window (Q4_0: a group's 8 units, 8 x 2 x 15 x 127 =
  30480; Q4_K: a super-block's 4; Q5: 4 units, 4 x 2 x 31 x 127 = 31496, so Q5_K is Q4_K's
  tile once unpacked and Q5_0 is Q4_0's in two windows; Q6_K: 2 units, 2 x 2 x 63 x 127 =
  32004), widened by one vpdpwssd against ones. vpmaddubsw comes from generic IR
  (even / odd products, clamp to i16) only if both operands reach the backend as loads:
  computed in the loop (nibble split), InstCombine knows the weights are < 16, drops the clamp
  and multiplies in i16 (vpmullw, 2.5x the instructions), and folds any shuffle into the even /
  odd split.

Both loops run a group / super-block as a small IR loop (2 pair steps an iteration): unrolled,
LLVM's scheduler hoisted every x load of the group and spilled (1.5-1.7x slower). No x86
intrinsics are used, so any CPU LLVM targets compiles these kernels.

Innermost loop on Zen 5 (znver5; `python scripts/bench_int8_gemm.py --asm`), per iteration of a
2 x 4 tile: Q8_0 31 instructions (16 vpdpwssd, 4 vpmovsxbw, 8 loads: 512 MACs); Q4_0 / Q4_K /
Q5_K 25 (8 vpmaddubsw, 8 vpaddw, 6 loads: 512 MACs); Q6_K 49 (16 vpmaddubsw, 8 vpaddw, 8
vpdpwssd, 12 loads: 1024 MACs); Q5_0 93 (32 vpmaddubsw, 24 vpaddw, 8 vpdpwssd, 24 loads:
2048 MACs).

Measured (`python scripts/bench_int8_gemm.py --threads 1 --rounds 5`: one core, its CPU time,
Qwen3-0.6B's four fused shapes, n = 128 and 512, random weights), int8 GEMM against the float
path (dequantized tiles into BLAS, 100-125 GOPS): Q8_0 260-320 GOPS (2.2-2.8x), Q4_0 300-385
(2.5-3.6x), Q4_K 260-285 (2.2-2.7x), Q6_K 290-320 (2.6-2.9x), Q5_K 270-300 (2.2-2.8x), Q5_0
310-345 (2.6-3.1x). The unpack (`_unit`, vectors) takes 0.1 ms for 6144 x 1024 on one core
(scalar it took 1.7 ms for Q4, 3.1 for Q6_K, 3.3 for Q5: a third of Q6_K's product at
n = 128, 9 ms then, 5.5 now). Against one core's peak, at an assumed 3.5 GHz: vpdpwssd 32 MACs
and vpmaddubsw 64 MACs an instruction, 1 or 2 a cycle, 225 or 450 / 450 or 900 GOPS. Q8_0's
275 is above the 1-a-cycle figure, so this core issues 2: Q8_0 runs at ~60% of 450, Q4_0 / Q4_K
at 30-40% of 900 (a vpaddw per vpmaddubsw, the scaling per group or super-block and the
horizontal sum per output are the rest). Two threads split the row tiles (timed by wall
clock, which on this shared machine swung 0.3-12x between calls: not quoted).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import int8_cpu, int8_k_cpu
from .int8_cpu import F32X16, G, _F32, _I8, _I16, _I32, Int8Packed, _c_arrays, _f16, _hsum, _load, _pair_sums, _vt
from .int8_k_cpu import KPacked, _splat
from .int8_q5_cpu import Q5Packed, _q5_0_tail

# -- dequantization -------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _deq_q8_0(q, d, ids, out):
    # q (R, k) int8; element j of block b at int8_cpu._at(b, j, ng)
    k = q.shape[1]
    nb = k // 32
    ng = nb // G
    for i in prange(ids.shape[0]):
        r = ids[i]
        for g in range(ng):
            o = g * 32 * G
            for c in range(16):
                for t in range(G):
                    dd = _f16(d, r * nb + g * G + t)
                    for e in range(2):
                        out[i, (g * G + t) * 32 + 2 * c + e] = dd * np.float32(q[r, o + c * 2 * G + 2 * t + e])
        for b in range(ng * G, nb):
            dd = _f16(d, r * nb + b)
            for j in range(32):
                out[i, b * 32 + j] = dd * np.float32(q[r, b * 32 + j])


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_0(q, d, ids, out):
    # q (R, k / 2): chunk c of a group, byte 2t + e = the file's byte 2c + e of block t
    # (elements 2c + e low, 2c + e + 16 high); tail blocks as in the file
    nb = q.shape[1] // 16
    ng = nb // G
    for i in prange(ids.shape[0]):
        r = ids[i]
        for g in range(ng):
            for c in range(8):
                for t in range(G):
                    dd = _f16(d, r * nb + g * G + t)
                    for e in range(2):
                        v = np.int32(q[r, g * 16 * G + c * 2 * G + 2 * t + e])
                        o = (g * G + t) * 32 + 2 * c + e
                        out[i, o] = dd * np.float32((v & 15) - 8)
                        out[i, o + 16] = dd * np.float32((v >> 4) - 8)
        for b in range(ng * G, nb):
            dd = _f16(d, r * nb + b)
            for j in range(16):
                v = np.int32(q[r, b * 16 + j])
                out[i, b * 32 + j] = dd * np.float32((v & 15) - 8)
                out[i, b * 32 + j + 16] = dd * np.float32((v >> 4) - 8)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_k(q, s, d, dmin, ids, out):
    # super-block b: byte 32c + 2t + e holds element 16t + 2c + e (low) and 16t + 2c + 8 + e
    # (high); s: 8 scales then 8 minimums per super-block, one per 32 elements
    nsb = d.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        for b in range(nsb):
            dd, dm = _f16(d, r * nsb + b), _f16(dmin, r * nsb + b)
            for t in range(16):
                sub = t >> 1
                a = dd * np.float32(s[r, b * 16 + sub])
                m = dm * np.float32(s[r, b * 16 + 8 + sub])
                for c in range(4):
                    for e in range(2):
                        v = np.int32(q[r, b * 128 + 32 * c + 2 * t + e])
                        o = b * 256 + 16 * t + 2 * c + e
                        out[i, o] = a * np.float32(v & 15) - m
                        out[i, o + 8] = a * np.float32(v >> 4) - m


@njit(parallel=True, cache=True, nogil=True)
def _deq_q6_k(q, s, d, ids, out):
    # super-block b: low nibbles as Q4_K's (192 bytes: 128 of nibbles, then byte
    # 128 + 32u + 2t + e holds the high bit pairs of steps 4u..4u + 3 at bits 2s)
    nsb = d.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        for b in range(nsb):
            dd = _f16(d, r * nsb + b)
            for t in range(16):
                a = dd * np.float32(s[r, b * 16 + t])
                for e in range(2):
                    for c in range(8):
                        lo = (np.int32(q[r, b * 192 + 32 * (c & 3) + 2 * t + e]) >> (4 * (c >> 2))) & 15
                        hi = (np.int32(q[r, b * 192 + 128 + 32 * (c >> 2) + 2 * t + e]) >> (2 * (c & 3))) & 3
                        out[i, b * 256 + 16 * t + 2 * c + e] = a * np.float32((lo | (hi << 4)) - 32)


def _deq_rows(w: Int8Packed | KPacked, ids: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        out = np.empty((len(ids), w.k), np.float32)
    elif out.shape != (len(ids), w.k) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(len(ids), w.k)}, not {out.dtype} {out.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= w.rows):
        raise IndexError(f"row ids must lie in [0, {w.rows}), got {ids.min()}..{ids.max()}")
    if w.type == T.Q8_0:
        _deq_q8_0(w.q, w.d, ids, out)
    elif w.type == T.Q4_0:
        _deq_q4_0(w.q, w.d, ids, out)
    elif w.type == T.Q4_K:
        _deq_q4_k(w.q, w.s, w.d, w.dmin, ids, out)
    elif w.type == T.Q6_K:
        _deq_q6_k(w.q, w.s, w.d, ids, out)
    else:
        raise ValueError(f"no int8 layout for {w.type.name}")
    return out


def dequant(w: Int8Packed | KPacked, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows lo..hi of w as float32 (hi - lo, k), exactly gguf's dequantization of the file."""
    hi = w.rows if hi is None else hi
    if not 0 <= lo <= hi <= w.rows:
        raise IndexError(f"rows {lo}..{hi} of a {w.rows}-row matrix")
    return _deq_rows(w, np.arange(lo, hi, dtype=np.int64), out)


def take(w: Int8Packed | KPacked, ids) -> np.ndarray:
    """Rows ids of w as float32 (len(ids), k) (embedding lookup), exactly as `dequant`."""
    return _deq_rows(w, np.ascontiguousarray(ids, np.int64).reshape(-1), None)


# -- the product: tiles of RW weight rows x NX rows of x -------------------------------------

RW, NX = 2, 4  # weight rows (1 or 2) x x rows per register tile
RT = 32  # weight rows per parallel task: their bytes stay in L2 while every x tile passes


def _c(t, v, n):
    return ir.Constant(_vt(t, n), v if isinstance(v, list) else [v] * n)


def _steps_loop(builder, isum, load_w, load_x):
    """Q8_0: a group's 16 pair steps as an IR loop over 8 iterations, steps c and c + 8, isum[r][i]
    (RW x NX <16 x i32>) summed in phis. Unrolled, LLVM's scheduler hoists every x load of the
    group ahead and spills them (1.5-1.7x slower). Each weight step is widened once for NX rows
    of x (vpmovsxbw), each x step (int16: element offsets) loaded once for RW weight rows."""
    i64 = ir.IntType(64)
    pre = builder.block
    body = builder.append_basic_block("steps")
    done = builder.append_basic_block("steps.done")
    builder.branch(body)
    builder.position_at_end(body)
    c = builder.phi(i64)
    c.add_incoming(ir.Constant(i64, 0), pre)
    phis = [[builder.phi(_vt(_I32, G)) for _ in range(NX)] for _ in range(RW)]
    for row in phis:
        for ph in row:
            ph.add_incoming(ir.Constant(ph.type, None), pre)
    c32 = builder.mul(c, ir.Constant(i64, 32))
    offs = (c32, builder.add(c32, ir.Constant(i64, 256)))
    vecs = [[builder.sext(load_w(r, o, 32), _vt(_I32, 32)) for o in offs] for r in range(RW)]
    new = [list(row) for row in phis]
    for h, xoff in enumerate(offs):
        for i in range(NX):
            xv = load_x(i, xoff)
            for r in range(RW):
                new[r][i] = builder.add(new[r][i], _pair_sums(builder, vecs[r][h], xv))
    end = builder.block
    cn = builder.add(c, ir.Constant(i64, 1))
    c.add_incoming(cn, end)
    for r in range(RW):
        for i in range(NX):
            phis[r][i].add_incoming(new[r][i], end)
            isum[r][i] = new[r][i]
    builder.cbranch(builder.icmp_unsigned("<", cn, ir.Constant(i64, 8)), body, done)
    builder.position_at_end(done)


def _mubs(builder, w, x):
    # u8 w . s8 x, neighbouring products summed, saturated to i16: the generic IR that LLVM
    # selects as vpmaddubsw, as long as w and x come straight from memory (see the module
    # docstring). Never saturates here: 2 x 63 x 127 at most
    def half(v, ext, e):
        h = builder.shuffle_vector(v, ir.Constant(v.type, None), _c(_I32, [2 * i + e for i in range(32)], 32))
        return ext(h, _vt(_I32, 32))
    s = builder.add(builder.mul(half(w, builder.zext, 0), half(x, builder.sext, 0)),
                    builder.mul(half(w, builder.zext, 1), half(x, builder.sext, 1)))
    fty = ir.FunctionType(s.type, [s.type, s.type])
    smax, smin = (cgutils.get_or_insert_function(builder.module, fty, f"llvm.{f}.v32i32") for f in ("smax", "smin"))
    hi = builder.call(smin, [builder.call(smax, [s, _c(_I32, -32768, 32)]), _c(_I32, 32767, 32)])
    return builder.trunc(hi, _vt(_I16, 32))


def _words(builder, v):
    # <32 x i16> -> <16 x i32>, neighbouring lanes summed: vpmaddwd / vpdpwssd by ones (woven
    # units put a lane's i16 sums side by side)
    s = builder.sext(v, _vt(_I32, 32))
    und = ir.Constant(s.type, None)
    return builder.add(builder.shuffle_vector(s, und, _c(_I32, list(range(0, 32, 2)), G)),
                       builder.shuffle_vector(s, und, _c(_I32, list(range(1, 32, 2)), G)))


# units and i16 window: vpmaddubsw sums stay exact in i16 over `window` units
# (Q4: 8 x 2 x 15 x 127 = 30480; Q5: 4 x 2 x 31 x 127 = 31496, so Q5_K's super-block is one
# window, as Q4_K's, and it shares Q4_K's tile; Q6_K: 2 x 2 x 63 x 127 = 32004)
_UNITS = {"q4_0": (8, 8), "q4_k": (4, 4), "q5_0": (8, 4), "q6_k": (4, 2)}


def _units_loop(kind, builder, isum, load_w, load_x):
    """Q4_0 / Q4_K / Q5_0 / Q5_K / Q6_K: weights unpacked to a byte each (`_unpack`) against
    int8 x in the same order, an IR loop over the 64-byte units of a group (8) / super-block
    (4), each steps c and c + half woven (byte 4t + 2h + e: lane t, step h, element e):
    vpmaddubsw into i16 sums, widened by vpdpwssd against ones once a window."""
    i64 = ir.IntType(64)
    units, window = _UNITS[kind]
    per_iter = 1 if window == units else window
    pre = builder.block
    body = builder.append_basic_block("units")
    done = builder.append_basic_block("units.done")
    builder.branch(body)
    builder.position_at_end(body)

    def phis(ty):
        out = [[builder.phi(ty) for _ in range(NX)] for _ in range(RW)]
        for row in out:
            for ph in row:
                ph.add_incoming(ir.Constant(ty, None), pre)
        return out

    c = builder.phi(i64)
    c.add_incoming(ir.Constant(i64, 0), pre)
    p16 = phis(_vt(_I16, 32)) if per_iter == 1 else None  # the window spans the loop
    p32 = phis(_vt(_I32, G)) if per_iter > 1 else None  # a window per iteration
    s16 = [list(row) for row in p16] if p16 else [[None] * NX for _ in range(RW)]
    for u in range(per_iter):
        off = builder.mul(builder.add(c, ir.Constant(i64, u)), ir.Constant(i64, 64))
        wv = [load_w(r, off) for r in range(RW)]
        for i in range(NX):
            xv = load_x(i, off)
            for r in range(RW):
                m = _mubs(builder, wv[r], xv)
                s16[r][i] = m if s16[r][i] is None else builder.add(s16[r][i], m)
    end = builder.block
    cn = builder.add(c, ir.Constant(i64, per_iter))
    c.add_incoming(cn, end)
    for r in range(RW):
        for i in range(NX):
            if p16:
                p16[r][i].add_incoming(s16[r][i], end)
            else:
                isum[r][i] = builder.add(p32[r][i], _words(builder, s16[r][i]))
                p32[r][i].add_incoming(isum[r][i], end)
    builder.cbranch(builder.icmp_unsigned("<", cn, ir.Constant(i64, units)), body, done)
    builder.position_at_end(done)
    if p16:
        for r in range(RW):
            for i in range(NX):
                isum[r][i] = _words(builder, s16[r][i])


def _scalar_f16(context, builder, aryty, ary, off):
    h = _load(context, builder, aryty, ary, off, _I16)
    return builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)


def _tile(kind):
    """One group (Q8_0 / Q4_0 / Q5_0: 16 blocks of 32) or super-block (Q4_K / Q5_K / Q6_K) of RW
    weight rows against NX rows of x: the RW * NX accumulators, each + its 16 lanes' scaled integer sums."""
    @intrinsic
    def tile(typingctx, acc, w, wo, ws, s, so, ss, d, dmin, do, ds, x, xo, xst, xs, xso, xss, xd, xdo, xds):
        if not _c_arrays(w, s, d, dmin, x, xs, xd):
            return None

        def codegen(context, builder, sig, args):
            (acc, w, wo, ws, s, so, ss, d, dmin, do, ds, x, xo, xst, xs, xso, xss, xd, xdo, xds) = args
            ta = dict(zip(("w", "s", "d", "dmin", "x", "xs", "xd"), (sig.args[i] for i in (1, 4, 7, 8, 11, 14, 17))))

            def ld(name, ary, base, stride, j, off, vty):
                o = builder.add(base, builder.mul(stride, ir.Constant(base.type, j)))
                off = ir.Constant(base.type, off) if isinstance(off, int) else off
                return _load(context, builder, ta[name], ary, builder.add(o, off), vty)

            isum = [[None] * NX for _ in range(RW)]

            if kind == "q8_0":  # int16 x, the weights widened in the loop
                _steps_loop(builder, isum, lambda r, o, m: ld("w", w, wo, ws, r, o, _vt(_I8, m)),
                            lambda i, o: ld("x", x, xo, xst, i, o, _vt(_I16, 32)))
            else:  # int8 x, the weights unpacked per task
                _units_loop(kind, builder, isum, lambda r, o: ld("w", w, wo, ws, r, o, _vt(_I8, 64)),
                            lambda i, o: ld("x", x, xo, xst, i, o, _vt(_I8, 64)))

            # per weight row: its 16 lane scales as float (K: d * the sub-block scale, exact);
            # per (row, x row): 4 vector instructions, the x side's sums prepared by
            # quantize_rows (Q4_0 / Q5_0 / Q6_K: 8 / 16 / 32 times the quant sums; Q4_K / Q5_K:
            # as float)
            fl = _vt(_F32, G)
            out = []
            for r in range(RW):
                if kind in ("q8_0", "q4_0", "q5_0"):
                    dh = ld("d", d, do, ds, r, 0, _vt(_I16, G))
                    dv = builder.fpext(builder.bitcast(dh, _vt(ir.HalfType(), G)), fl)
                else:
                    dro = builder.add(do, builder.mul(ds, ir.Constant(do.type, r)))
                    if kind == "q6_k":
                        scv = builder.sitofp(ld("s", s, so, ss, r, 0, _vt(_I8, G)), fl)
                    else:  # a sub-block's scale and minimum serve its two lanes
                        pairs = _c(_I32, [j // 2 for j in range(G)], G)
                        s8, m8 = (ld("s", s, so, ss, r, o, _vt(_I8, 8)) for o in (0, 8))
                        scv = builder.uitofp(builder.shuffle_vector(s8, s8, pairs), fl)
                        mv = builder.fmul(builder.uitofp(builder.shuffle_vector(m8, m8, pairs), fl),
                                          _splat(builder, _scalar_f16(context, builder, ta["dmin"], dmin, dro)))
                    dv = builder.fmul(scv, _splat(builder, _scalar_f16(context, builder, ta["d"], d, dro)))
                for i in range(NX):
                    a = builder.extract_value(acc, r * NX + i)
                    v = isum[r][i]
                    if kind in ("q4_0", "q5_0", "q6_k"):  # the quants' offset
                        v = builder.sub(v, ld("xs", xs, xso, xss, i, 0, _vt(_I32, G)))
                    if kind in ("q8_0", "q4_0", "q5_0"):  # the decode kernels' order: bit for bit theirs
                        f, scale = builder.sitofp(v, fl), builder.fmul(dv, ld("xd", xd, xdo, xds, i, 0, fl))
                    else:
                        f = builder.fmul(builder.sitofp(v, fl), dv)
                        if kind == "q4_k":
                            f = builder.fsub(f, builder.fmul(ld("xs", xs, xso, xss, i, 0, fl), mv), flags=("contract",))
                        scale = _splat(builder, ld("xd", xd, xdo, xds, i, 0, _F32))
                    out.append(builder.fadd(a, builder.fmul(f, scale, flags=("contract",)), flags=("contract",)))
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(F32X16, RW * NX)(acc, w, wo, ws, s, so, ss, d, dmin, do, ds, x, xo, xst, xs, xso, xss,
                                               xd, xdo, xds), codegen
    return tile


_t_q8_0, _t_q4_0, _t_q4_k, _t_q5_0, _t_q6_k = (_tile(k) for k in ("q8_0", "q4_0", "q4_k", "q5_0", "q6_k"))


# -- the activation: all rows quantized once, as the decode kernels quantize one -------------

@njit(cache=True, inline="always")
def _to_units(src, dst, full, span, half):
    # decode order (pair step s at 32 s, byte 2t + e) -> _units_loop's: unit c of a span holds
    # steps c and c + half woven, step h's pair of lane t at 4t + 2h; elements from `full` on
    # (Q4_0's tail blocks) stay in place
    s16, d16 = src.view(np.int16), dst.view(np.int16)  # an element pair at a time
    for o in range(0, full // 2, span // 2):
        for c in range(half):
            for t in range(G):
                d16[o + 32 * c + 2 * t] = s16[o + 16 * c + t]
                d16[o + 32 * c + 2 * t + 1] = s16[o + 16 * (c + half) + t]
    dst[full:] = src[full:]


@njit(parallel=True, cache=True)
def _quantize_q8_0_rows(x, xq, xd, xs, ng, units):
    k = x.shape[1]
    for i in prange(x.shape[0]):
        if not units:
            int8_cpu._quantize_x(x[i], xq[i], xd[i], xs[i], ng)
        else:
            tmp = np.empty(k, np.int8)
            int8_cpu._quantize_x(x[i], tmp, xd[i], xs[i], ng)
            _to_units(tmp, xq[i], ng * 32 * G, 32 * G, 8)


@njit(parallel=True, cache=True)
def _quantize_q8_k_rows(x, xq, xd, xs, units):
    k = x.shape[1]
    for i in prange(x.shape[0]):
        if not units:
            int8_k_cpu._quantize_x(x[i], xq[i], xd[i], xs[i])
        else:
            tmp = np.empty(k, np.int8)
            int8_k_cpu._quantize_x(x[i], tmp, xd[i], xs[i])
            _to_units(tmp, xq[i], k, 256, 4)


def quantize_rows(x: np.ndarray, w: Int8Packed | KPacked | Q5Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, k) -> (quants (npad, k), scales, quant sums), npad = n rounded up to NX with zero
    rows, each row exactly as the decode modules' quantize_x rounds it: for Q8_0 / Q4_0 weights
    ggml's Q8_0 (scale and sum per 32), for Q4_K / Q5_K / Q6_K ggml's Q8_K (scale per 256, sums
    per 16); Q5_0 as Q4_0. Q8_0: int16 in the decode kernels' order; the others int8 in
    _units_loop's."""
    n, k = x.shape
    npad = -(-n // NX) * NX
    units = w.type != T.Q8_0
    xq = np.zeros((npad, k), np.int8 if units else np.int16)
    if w.type in (T.Q8_0, T.Q4_0, T.Q5_0):
        xd, xs = np.zeros((npad, k // 32), np.float32), np.zeros((npad, k // 32), np.int32)
        _quantize_q8_0_rows(x, xq, xd, xs, k // 32 // G, units)
    else:
        xd, xs = np.zeros((npad, k // 256), np.float32), np.zeros((npad, k // 16), np.int32)
        _quantize_q8_k_rows(x, xq, xd, xs, units)
    return xq, xd, xs


def _prepared_sums(xs: np.ndarray, t: T) -> np.ndarray:
    """x's quant sums as the tiles subtract them: the unsigned quants' offset (Q4_0: 8, Q5_0: 16,
    Q6_K: 32) times them, or (Q4_K / Q5_K, against float minimums) as float32 (exact: |sum| < 2^24)."""
    if t in (T.Q4_K, T.Q5_K):
        return xs.astype(np.float32)
    offset = {T.Q4_0: 8, T.Q5_0: 16, T.Q6_K: 32}.get(t)
    return xs if offset is None else xs * np.int32(offset)


# -- the weights of a task, a byte each (for vpmaddubsw) ---------------------------------------

def _unit(bits):
    """One 64-byte unit of unpacked weights: 32 bytes of nibbles at qo (lane t's element pair at
    2t; low nibbles step c, high ones step c + half) to ws at wo, woven as _units_loop reads them
    (lane t's low pair at 4t, its high pair at 4t + 2), or'ed with `bits` high bits per quant
    (Q5: 1, Q6_K: 2) that the pairs of h at h0 / h1 hold at bit s0 / s1 of each byte, moved to
    bit 4. Vectors of 16 element pairs (i16): 2-4 loads, a few shifts and masks, a word
    interleave and one store; the scalar loop that did this ran 4-5x longer."""
    @intrinsic
    def unit(typingctx, q, qo, h, h0, h1, s0, s1, ws, wo):
        if not _c_arrays(q, h, ws):
            return None

        def codegen(context, builder, sig, args):
            q, qo, h, h0, h1, s0, s1, ws, wo = args
            v16 = _vt(_I16, G)

            def splat(s):
                s = builder.trunc(s, _I16)
                v = builder.insert_element(ir.Constant(v16, None), s, ir.Constant(_I32, 0))
                return builder.shuffle_vector(v, v, _c(_I32, 0, G))

            v = _load(context, builder, sig.args[0], q, qo, v16)
            m4 = _c(_I16, 0x0F0F, G)
            lo, hi = builder.and_(v, m4), builder.and_(builder.lshr(v, _c(_I16, 4, G)), m4)
            if bits:
                mask = _c(_I16, 0x0101 * ((1 << bits) - 1), G)
                top = [builder.lshr(_load(context, builder, sig.args[2], h, o, v16), splat(sh))
                       for o, sh in ((h0, s0), (h1, s1))]
                top = [builder.shl(builder.and_(v, mask), _c(_I16, 4, G)) for v in top]
                lo, hi = builder.or_(lo, top[0]), builder.or_(hi, top[1])
            out = builder.shuffle_vector(lo, hi, _c(_I32, [j // 2 + G * (j % 2) for j in range(2 * G)], 2 * G))
            data = context.make_array(sig.args[7])(context, builder, ws).data
            builder.store(out, builder.bitcast(builder.gep(data, [wo]), out.type.as_pointer()), align=1)
            return context.get_dummy_value()
        return types.none(q, qo, h, h0, h1, s0, s1, ws, wo), codegen
    return unit


_unit4, _unit5, _unit6 = (_unit(b) for b in (0, 1, 2))


@njit(cache=True, inline="always")
def _unpack(q, r0, r1, ws, k, span, q6):
    # rows r0..r1 (their full groups / super-blocks) to a byte a weight in _units_loop's order:
    # chunk c's low nibbles are step c, its high ones step c + half (Q6_K: with the high bit
    # pairs, bits 2c of chunk 0 / 1 at byte 128 / 160 of the super-block). 0.07 ms for a Q4
    # 6144 x 1024 on one core, 0.12 for Q6_K / Q5 (`_unit`; element pairs as uint16 in a
    # numba loop: 1.7 and 3.1-3.3 ms)
    nbytes = 192 if q6 else span // 2  # packed bytes of a group / super-block
    for r in range(r0, r1):
        for g in range(k // span):
            src, dst = r * q.shape[1] + g * nbytes, (r - r0) * k + g * span
            for c in range(span // 64):
                if q6:
                    _unit6(q, src + 32 * c, q, src + 128, src + 160, 2 * c, 2 * c, ws, dst + 64 * c)
                else:
                    _unit4(q, src + 32 * c, q, 0, 0, 0, 0, ws, dst + 64 * c)


@njit(cache=True, inline="always")
def _unpack_q5(q, h, r0, r1, ws, k, span, hi_off, hi_bit):
    # Q5Packed (int8_q5_cpu) as _unpack, each nibble or'ed with its fifth bit (bit 4: 0..31).
    # Bit p of a lane's pair of fifth-bit bytes: step p. Step c (the low nibbles) is at bit c of
    # the group's first 32 bytes; step c + half (the high ones) at bit c + 4 of the same bytes
    # for Q5_K (hi_off, hi_bit = 0, 4), at bit c of the next 32 for Q5_0 (32, 0)
    for r in range(r0, r1):
        for g in range(k // span):
            src, hsrc, dst = r * q.shape[1] + g * span // 2, r * h.shape[1] + g * span // 8, (r - r0) * k + g * span
            for c in range(span // 64):
                _unit5(q, src + 32 * c, h, hsrc, hsrc + hi_off, c, c + hi_bit, ws, dst + 64 * c)


# -- the products ------------------------------------------------------------------------------

@intrinsic
def _zeros(typingctx):
    """The RW * NX accumulators of a tile, zero."""
    ty = types.UniTuple(F32X16, RW * NX)
    return ty(), lambda context, builder, sig, args: context.make_tuple(
        builder, ty, [ir.Constant(_vt(_F32, G), [0.0] * G)] * (RW * NX))


@njit(cache=True, inline="always")
def _store(acc, extra, out, r, r1, i, n):
    # the tile's sums; extra (RW * NX) holds each pair's tail blocks
    for a in range(RW):
        rr = r if a == 0 else r1
        if a == 0 or r1 != r:
            for b in range(NX):
                if i + b < n:
                    out[i + b, rr] = _hsum(acc[a * NX + b]) + extra[a * NX + b]


@njit(parallel=True, cache=True, nogil=True)
def _mm_q8_0(xq, xd, xs, q, d, out):
    n, (R, k) = out.shape[0], q.shape
    nb = k // 32
    ng = nb // G
    extra = np.zeros(RW * NX, np.float32)
    for tile in prange(-(-R // RT)):
        ex = extra.copy()
        for i in range(0, xq.shape[0], NX):
            for r in range(tile * RT, min(R, tile * RT + RT), RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros()
                for g in range(ng):
                    acc = _t_q8_0(acc, q, r * k + g * 32 * G, (r1 - r) * k, d, 0, 0, d, d, r * nb + g * G,
                                  (r1 - r) * nb, xq, i * k + g * 32 * G, k, xs, 0, 0, xd, i * nb + g * G, nb)
                for a in range(RW * NX):
                    rr, ii = r + (r1 - r) * (a // NX), i + a % NX
                    s = np.float32(0)
                    for b in range(ng * G, nb):
                        s += (_f16(d, rr * nb + b) * xd[ii, b]) * np.float32(
                            int8_cpu._q8_block(q, rr * k + b * 32, xq, ii * k + b * 32))
                    ex[a] = s
                _store(acc, ex, out, r, r1, i, n)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q4_0(xq, xd, xs, q, d, out):
    # xq: int8 in _units_loop's order (tail blocks in the file's), xs: 8 x the quant sums
    n, (R, kh) = out.shape[0], q.shape
    k, nb = 2 * kh, kh // 16
    ng = nb // G
    extra = np.zeros(RW * NX, np.float32)
    for tile in prange(-(-R // RT)):
        ex = extra.copy()
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack(q, r0, rt, ws, k, 32 * G, False)
        for i in range(0, xq.shape[0], NX):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros()
                for g in range(ng):
                    acc = _t_q4_0(acc, ws, (r - r0) * k + g * 32 * G, (r1 - r) * k, d, 0, 0, d, d, r * nb + g * G,
                                  (r1 - r) * nb, xq, i * k + g * 32 * G, k, xs, i * nb + g * G, nb, xd,
                                  i * nb + g * G, nb)
                for a in range(RW * NX):
                    rr, ii = r + (r1 - r) * (a // NX), i + a % NX
                    s = np.float32(0)
                    for b in range(ng * G, nb):  # tail blocks, in the file's order
                        isum = -xs[ii, b]
                        for j in range(16):
                            v = np.int32(q[rr, b * 16 + j])
                            isum += ((v & 15) * np.int32(xq[ii, b * 32 + j])
                                     + (v >> 4) * np.int32(xq[ii, b * 32 + 16 + j]))
                        s += (_f16(d, rr * nb + b) * xd[ii, b]) * np.float32(isum)
                    ex[a] = s
                _store(acc, ex, out, r, r1, i, n)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q4_k(xq, xd, xs, q, h, s, d, dmin, out):
    # Q4_K (h None) or Q5_K (h: the fifth bits): the same tile once unpacked, quants 0..15 or
    # 0..31. xq: int8 in _units_loop's order, xs: the quant sums per 16 as float
    n, (R, nsb) = out.shape[0], d.shape
    k = nsb * 256
    ex = np.zeros(RW * NX, np.float32)
    for tile in prange(-(-R // RT)):
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        if h is None:
            _unpack(q, r0, rt, ws, k, 256, False)
        else:
            _unpack_q5(q, h, r0, rt, ws, k, 256, 0, 4)
        for i in range(0, xq.shape[0], NX):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros()
                for b in range(nsb):
                    acc = _t_q4_k(acc, ws, (r - r0) * k + b * 256, (r1 - r) * k, s, r * nsb * 16 + b * 16,
                                  (r1 - r) * nsb * 16, d, dmin, r * nsb + b, (r1 - r) * nsb, xq, i * k + b * 256,
                                  k, xs, i * nsb * 16 + b * 16, nsb * 16, xd, i * nsb + b, nsb)
                _store(acc, ex, out, r, r1, i, n)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q5_0(xq, xd, xs, q, h, d, out):
    # as _mm_q4_0 (a window of 4 units: _UNITS); xs: 16 x the quant sums
    n, (R, kh) = out.shape[0], q.shape
    k, nb = 2 * kh, kh // 16
    ng = nb // G
    extra = np.zeros(RW * NX, np.float32)
    for tile in prange(-(-R // RT)):
        ex = extra.copy()
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack_q5(q, h, r0, rt, ws, k, 32 * G, 32, 0)
        for i in range(0, xq.shape[0], NX):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros()
                for g in range(ng):
                    acc = _t_q5_0(acc, ws, (r - r0) * k + g * 32 * G, (r1 - r) * k, d, 0, 0, d, d, r * nb + g * G,
                                  (r1 - r) * nb, xq, i * k + g * 32 * G, k, xs, i * nb + g * G, nb, xd,
                                  i * nb + g * G, nb)
                for a in range(RW * NX):
                    rr, ii = r + (r1 - r) * (a // NX), i + a % NX
                    s = np.float32(0)
                    for b in range(ng * G, nb):  # tail blocks, in the file's order
                        isum = _q5_0_tail(q[rr], b * 16, h[rr], b * 4, xq[ii], b * 32) - xs[ii, b]
                        s += (_f16(d, rr * nb + b) * xd[ii, b]) * np.float32(isum)
                    ex[a] = s
                _store(acc, ex, out, r, r1, i, n)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q6_k(xq, xd, xs, q, s, d, out):
    # xq: int8 in _units_loop's order, xs: 32 x the quant sums per 16
    n, (R, nsb) = out.shape[0], d.shape
    k = nsb * 256
    ex = np.zeros(RW * NX, np.float32)
    for tile in prange(-(-R // RT)):
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack(q, r0, rt, ws, k, 256, True)
        for i in range(0, xq.shape[0], NX):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros()
                for b in range(nsb):
                    acc = _t_q6_k(acc, ws, (r - r0) * k + b * 256, (r1 - r) * k, s, r * nsb * 16 + b * 16,
                                  (r1 - r) * nsb * 16, d, d, r * nsb + b, (r1 - r) * nsb, xq, i * k + b * 256, k,
                                  xs, i * nsb * 16 + b * 16, nsb * 16, xd, i * nsb + b, nsb)
                _store(acc, ex, out, r, r1, i, n)


def matmul(x: np.ndarray, w: Int8Packed | KPacked | Q5Packed, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x (n, k) float32 @ W.T, x quantized to 8 bits once (as the decode
    kernels quantize it) and multiplied as integers."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"input of shape {x.shape}, weight expects (n, {w.k})")
    if out.shape != (x.shape[0], w.rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(x.shape[0], w.rows)}, "
                         f"not {out.dtype} {out.shape}")
    if w.type not in (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q5_0):
        raise ValueError(f"no int8 layout for {w.type.name}")
    xq, xd, xs = quantize_rows(x, w)
    xs = _prepared_sums(xs, w.type)
    if w.type == T.Q8_0:
        _mm_q8_0(xq, xd, xs, w.q, w.d, out)
    elif w.type == T.Q4_0:
        _mm_q4_0(xq, xd, xs, w.q, w.d, out)
    elif w.type in (T.Q4_K, T.Q5_K):
        _mm_q4_k(xq, xd, xs, w.q, w.h if w.type == T.Q5_K else None, w.s, w.d, w.dmin, out)
    elif w.type == T.Q5_0:
        _mm_q5_0(xq, xd, xs, w.q, w.h, w.d, out)
    else:
        _mm_q6_k(xq, xd, xs, w.q, w.s, w.d, out)
    return out
