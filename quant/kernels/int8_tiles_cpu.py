"""The register tiles of the prefill GEMM (int8_gemm_cpu.py, whose docstring explains the
scheme and gives the measurements), built as LLVM IR: a group / super-block of RW weight rows
against nx rows of x, generic (vpmaddubsw, 2 x 4) or AVX512-VNNI (vpdpbusd, 2 x 6, or 2 x 4 for
the grouped MoE kernels; chosen by the `isa` array's dtype, so each path is its own cached
specialization and the VNNI ones are compiled only where `vnni_available`), the K types' per-task lane scales, and the vector unpack of a
weight unit to a byte a weight."""

from __future__ import annotations

import os
from functools import cache

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8_cpu import F32X16, G, _F32, _I8, _I16, _I32, _c_arrays, _load, _pair_sums, _vt
from .int8_k_cpu import _splat

RW, NX = 2, 4  # weight rows (1 or 2) x x rows per register tile
# x rows per tile with vpdpbusd: no i16 sums in flight, so 2 x 6 i32 + 2 x 6 float accumulators
# fit the 32 zmm registers (1 thread, 4 shapes: +5-10% over 4; the generic tiles spill at 6)
NXV = 6
RT = 32  # weight rows per parallel task: their bytes stay in L2 while every x tile passes


# the tiles' `isa` argument: the dtype of an empty array picks the units loop and the tile's x
# rows at compile time: generic 2 x NX, VNNI 2 x NXV, VNNI4 vpdpbusd in 2 x NX tiles (the
# grouped MoE kernels, whose experts' rows are padded to NX)
GENERIC, VNNI, VNNI4 = np.zeros(0, np.uint8), np.zeros(0, np.int8), np.zeros(0, np.int16)


def vnni_available() -> bool:
    """Whether the CPU numba compiles for has AVX512-VNNI's vpdpbusd (and AVX512BW, which the
    512-bit form needs); QWEN3CLI_NO_VNNI=1 says no (to test or time the generic path). The
    target is numba's: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES where set (portable caches), else
    the host's."""
    if os.environ.get("QWEN3CLI_NO_VNNI", "") not in ("", "0"):
        return False
    return {"avx512vnni", "avx512bw"} <= _target_features()


def avx2_available() -> bool:
    """Whether the CPU numba compiles for has AVX2's vpmaddubsw (any x86-64 from 2013 on; not
    arm64), for the decode kernels that call it where VNNI is missing; QWEN3CLI_NO_AVX2=1
    says no (to test or time the generic path). The target as vnni_available's."""
    if os.environ.get("QWEN3CLI_NO_AVX2", "") not in ("", "0"):
        return False
    return "avx2" in _target_features()


def _target_features() -> frozenset[str]:
    # NUMBA_CPU_NAME / NUMBA_CPU_FEATURES where set (portable caches), else the host's
    if numba.config.CPU_NAME:
        return _named_features(numba.config.CPU_FEATURES or "")
    return _host_features()


@cache  # decode asks twice a product (~280 times a 0.6B token): parsed each time it was ~2 ms a token
def _named_features(spec: str) -> frozenset[str]:
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


@cache  # LLVM's query took 0.4 ms, and prefill asks once per product
def _host_features() -> frozenset[str]:
    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


def _c(t, v, n):
    return ir.Constant(_vt(t, n), v if isinstance(v, list) else [v] * n)


def _steps_loop(builder, isum, load_w, load_x, nx):
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
    phis = [[builder.phi(_vt(_I32, G)) for _ in range(nx)] for _ in range(RW)]
    for row in phis:
        for ph in row:
            ph.add_incoming(ir.Constant(ph.type, None), pre)
    c32 = builder.mul(c, ir.Constant(i64, 32))
    offs = (c32, builder.add(c32, ir.Constant(i64, 256)))
    vecs = [[builder.sext(load_w(r, o, 32), _vt(_I32, 32)) for o in offs] for r in range(RW)]
    new = [list(row) for row in phis]
    for h, xoff in enumerate(offs):
        for i in range(nx):
            xv = load_x(i, xoff)
            for r in range(RW):
                new[r][i] = builder.add(new[r][i], _pair_sums(builder, vecs[r][h], xv))
    end = builder.block
    cn = builder.add(c, ir.Constant(i64, 1))
    c.add_incoming(cn, end)
    for r in range(RW):
        for i in range(nx):
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
# (Q4: 8 x 2 x 15 x 127 = 30480; Q5: 4 x 2 x 31 x 127 = 31496, so Q4_K and Q5_K share one
# tile, a pair of super-blocks in two windows; Q6_K: 2 x 2 x 63 x 127 = 32004)
_UNITS = {"q4_0": (8, 8), "q4_k": (8, 4), "q4_k1": (4, 4), "q5_0": (8, 4), "q6_k": (4, 2)}


def _dpbusd(builder, acc, w, x):
    # acc + per i32 lane the sum of its 4 u8 w x s8 x products: vpdpbusd (AVX512-VNNI). The
    # intrinsic's i32-vector form, which LLVM 22 still reads (it upgrades it to the i8 one)
    v16 = _vt(_I32, G)
    fty = ir.FunctionType(v16, [v16, v16, v16])
    fn = cgutils.get_or_insert_function(builder.module, fty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, builder.bitcast(w, v16), builder.bitcast(x, v16)])


def _units_loop(kind, builder, isum, load_w, load_x, vnni, init, nx):
    """Q4_0 / Q4_K / Q5_0 / Q5_K / Q6_K: weights unpacked to a byte each (`_unpack`) against
    int8 x in the same order, an IR loop over the 64-byte units of a group (8) / super-block
    (4), each steps c and c + half woven (byte 4t + 2h + e: lane t, step h, element e).
    Generic: vpmaddubsw into i16 sums, widened by vpdpwssd against ones once a window. vnni:
    one vpdpbusd per unit and tile entry straight into the i32 lane sums (a lane's 4 bytes of
    a unit are its 4 products), so no i16 window and no widening. init: the nx <16 x i32> the
    sums start from (the quants' offset times x's sums, negated), or None (zero): a list where
    i32 sums are the loop's phis (no zeroing, no subtraction); a function (x row -> its
    vector, loaded after the loop) where the loop holds one i16 window, so they do not take 4
    of the registers its i16 sums need."""
    i64 = ir.IntType(64)
    units, window = _UNITS[kind]
    per_iter = 1 if window == units or vnni else window
    pre = builder.block
    body = builder.append_basic_block("units")
    done = builder.append_basic_block("units.done")
    builder.branch(body)
    builder.position_at_end(body)

    def phis(ty, start=None):
        out = [[builder.phi(ty) for _ in range(nx)] for _ in range(RW)]
        for row in out:
            for i, ph in enumerate(row):
                ph.add_incoming(ir.Constant(ty, None) if start is None else start[i], pre)
        return out

    c = builder.phi(i64)
    c.add_incoming(ir.Constant(i64, 0), pre)
    p16 = phis(_vt(_I16, 32)) if per_iter == 1 and not vnni else None  # the window spans the loop
    start = init if isinstance(init, list) else None
    p32 = phis(_vt(_I32, G), start) if per_iter > 1 or vnni else None  # a window per iteration
    s16 = [list(row) for row in p16] if p16 else [[None] * nx for _ in range(RW)]
    s32 = [list(row) for row in p32] if p32 else None
    for u in range(per_iter):
        off = builder.mul(builder.add(c, ir.Constant(i64, u)), ir.Constant(i64, 64))
        wv = [load_w(r, off) for r in range(RW)]
        for i in range(nx):
            xv = load_x(i, off)
            for r in range(RW):
                if vnni:
                    s32[r][i] = _dpbusd(builder, s32[r][i], wv[r], xv)
                    continue
                m = _mubs(builder, wv[r], xv)
                s16[r][i] = m if s16[r][i] is None else builder.add(s16[r][i], m)
    end = builder.block
    cn = builder.add(c, ir.Constant(i64, per_iter))
    c.add_incoming(cn, end)
    for r in range(RW):
        for i in range(nx):
            if p16:
                p16[r][i].add_incoming(s16[r][i], end)
            else:
                isum[r][i] = s32[r][i] if vnni else builder.add(p32[r][i], _words(builder, s16[r][i]))
                p32[r][i].add_incoming(isum[r][i], end)
    builder.cbranch(builder.icmp_unsigned("<", cn, ir.Constant(i64, units)), body, done)
    builder.position_at_end(done)
    if p16:
        for r in range(RW):
            for i in range(nx):
                isum[r][i] = _words(builder, s16[r][i])
                if callable(init):
                    isum[r][i] = builder.add(init(i), isum[r][i])


def _tile(kind):
    """One group (Q8_0 / Q4_0 / Q5_0: 16 blocks of 32), super-block (Q6_K; Q4_K / Q5_K's odd
    last one, q4_k1: `_tail_units`' order) or pair of super-blocks (Q4_K / Q5_K: `_unit_pair`'s
    order, a lane per sub-block) of RW weight rows against nx rows of x (NX, NXV with VNNI):
    the RW * nx accumulators, each + its 16 lanes' scaled integer sums. sc / mn at so + r * ss:
    Q8_0 / Q4_0 / Q5_0 the blocks' float16 d (mn unused); K types the task's lane scales d * sc
    and minimums dmin * m as float32 (`lane_scales`); x's scale per lane for Q4_K / Q5_K (a
    pair's two super-blocks' in one vector), else one splat.
    isa: an empty array whose dtype picks the units loop (int8 / int16: vpdpbusd, else generic IR),
    so the two paths are two cached specializations of one kernel."""
    @intrinsic
    def tile(typingctx, acc, w, wo, ws, sc, mn, so, ss, x, xo, xst, xs, xso, xss, xd, xdo, xds, isa):
        if not _c_arrays(w, sc, mn, x, xs, xd):
            return None
        vnni = _is_vnni(isa)
        nx = tile_rows(isa)

        def codegen(context, builder, sig, args):
            (acc, w, wo, ws, sc, mn, so, ss, x, xo, xst, xs, xso, xss, xd, xdo, xds, _) = args
            ta = dict(zip(("w", "sc", "mn", "x", "xs", "xd"), (sig.args[i] for i in (1, 4, 5, 8, 11, 14))))

            def ld(name, ary, base, stride, j, off, vty):
                o = builder.add(base, builder.mul(stride, ir.Constant(base.type, j)))
                off = ir.Constant(base.type, off) if isinstance(off, int) else off
                return _load(context, builder, ta[name], ary, builder.add(o, off), vty)

            isum = [[None] * nx for _ in range(RW)]

            if kind == "q8_0":  # int16 x, the weights widened in the loop
                _steps_loop(builder, isum, lambda r, o, m: ld("w", w, wo, ws, r, o, _vt(_I8, m)),
                            lambda i, o: ld("x", x, xo, xst, i, o, _vt(_I16, 32)), nx)
            else:  # int8 x, the weights unpacked per task
                init = None  # the quants' offset: its prepared (negated) x sums start the sums
                if kind in ("q4_0", "q5_0", "q6_k"):
                    def init(i):
                        return ld("xs", xs, xso, xss, i, 0, _vt(_I32, G))
                    if vnni or _UNITS[kind][0] != _UNITS[kind][1]:  # they start the phis
                        init = [init(i) for i in range(nx)]
                _units_loop(kind, builder, isum, lambda r, o: ld("w", w, wo, ws, r, o, _vt(_I8, 64)),
                            lambda i, o: ld("x", x, xo, xst, i, o, _vt(_I8, 64)), vnni, init, nx)

            # per weight row its 16 lane scales as float (K: precomputed per task, so a tile
            # entry's scaling is 4 vector instructions with no per-row work); the x side's sums
            # prepared by quantize_rows (Q4_0 / Q5_0 / Q6_K: 8 / 16 / 32 times the quant sums;
            # Q4_K / Q5_K: as float)
            fl = _vt(_F32, G)
            out = []
            for r in range(RW):
                if kind in ("q8_0", "q4_0", "q5_0"):
                    dh = ld("sc", sc, so, ss, r, 0, _vt(_I16, G))
                    dv = builder.fpext(builder.bitcast(dh, _vt(ir.HalfType(), G)), fl)
                else:
                    dv = ld("sc", sc, so, ss, r, 0, fl)
                    mv = ld("mn", mn, so, ss, r, 0, fl)
                for i in range(nx):
                    a = builder.extract_value(acc, r * nx + i)
                    v = isum[r][i]
                    if kind in ("q8_0", "q4_0", "q5_0"):  # the decode kernels' order: bit for bit theirs
                        f, scale = builder.sitofp(v, fl), builder.fmul(dv, ld("xd", xd, xdo, xds, i, 0, fl))
                    else:
                        f = builder.fmul(builder.sitofp(v, fl), dv)
                        if kind in ("q4_k", "q4_k1"):
                            # one vfnmadd: the min term need not round apart; x's scale per lane
                            # (a pair's two super-blocks')
                            f = builder.fsub(f, builder.fmul(ld("xs", xs, xso, xss, i, 0, fl), mv, flags=("contract",)),
                                             flags=("contract",))
                            scale = ld("xd", xd, xdo, xds, i, 0, fl)
                        else:
                            scale = _splat(builder, ld("xd", xd, xdo, xds, i, 0, _F32))
                    out.append(builder.fadd(a, builder.fmul(f, scale, flags=("contract",)), flags=("contract",)))
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(F32X16, RW * nx)(acc, w, wo, ws, sc, mn, so, ss, x, xo, xst, xs, xso, xss,
                                               xd, xdo, xds, isa), codegen
    return tile


_t_q8_0, _t_q4_0, _t_q4_k, _t_q4_k1, _t_q5_0, _t_q6_k = (_tile(k) for k in ("q8_0", "q4_0", "q4_k", "q4_k1", "q5_0",
                                                                               "q6_k"))


def _lanes(q6):
    """A row's lane scales of one super-block as the K tiles multiply them, stored at o of sv
    (float32) and its minimums at o of mv: d * sc (Q6_K: 16, a signed scale per lane; Q4_K /
    Q5_K: 8, a sub-block's, 8 bytes at so, half of a pair's vector) and dmin * m (the 8 bytes
    after). Vectors (a few instructions a row and super-block); as scalars the per-task pass
    cost 0.15 ms for 6144 rows x 1024, 3% of the product at n = 128."""
    @intrinsic
    def lanes(typingctx, s, so, d, dmin, do, sv, mv, o):
        if not _c_arrays(s, d, dmin, sv, mv):
            return None

        def codegen(context, builder, sig, args):
            s, so, d, dmin, do, sv, mv, o = args
            ta = sig.args
            fl = _vt(_F32, G)

            def f16(aryty, ary):
                h = _load(context, builder, aryty, ary, do, _I16)
                return _splat(builder, builder.fpext(builder.bitcast(h, ir.HalfType()), _F32))

            def store(aryty, ary, v):
                data = context.make_array(aryty)(context, builder, ary).data
                builder.store(v, builder.bitcast(builder.gep(data, [o]), v.type.as_pointer()), align=4)

            if q6:
                scv = builder.sitofp(_load(context, builder, ta[0], s, so, _vt(_I8, G)), fl)
                dv = f16(ta[2], d)
            else:
                f8, half = _vt(_F32, 8), _c(_I32, list(range(8)), 8)
                s8, m8 = (_load(context, builder, ta[0], s, builder.add(so, ir.Constant(so.type, k)), _vt(_I8, 8))
                          for k in (0, 8))
                dv, dm = f16(ta[2], d), f16(ta[3], dmin)
                scv = builder.uitofp(s8, f8)
                dv, dm = builder.shuffle_vector(dv, dv, half), builder.shuffle_vector(dm, dm, half)
                store(ta[6], mv, builder.fmul(builder.uitofp(m8, f8), dm))
            store(ta[5], sv, builder.fmul(scv, dv))
            return context.get_dummy_value()
        return types.none(s, so, d, dmin, do, sv, mv, o), codegen
    return lanes


_lanes_q4_k, _lanes_q6_k = _lanes(False), _lanes(True)


@intrinsic
def _tail_units(typingctx, a, o):
    """An odd count's last super-block (4 units at byte o of a, _units_loop's order) rewoven in
    place for the Q4_K / Q5_K tail tile (q4_k1): lane j (j < 8) takes sub-block j's first 16
    values (old lane 2j), lane 8 + j its last 16 (old lane 2j + 1), so the tile's scale vectors
    are the pairs' 8 lanes twice; 4 vpermd. Pairing it with a zero super-block instead doubled
    its work (the MoE down projection's k = 768: 4 super-blocks' work for 3)."""
    if not _c_arrays(a):
        return None

    def codegen(context, builder, sig, args):
        ary, off = args
        v16 = _vt(_I32, G)
        data = context.make_array(sig.args[0])(context, builder, ary).data
        idx = _c(_I32, [2 * j for j in range(8)] + [2 * j + 1 for j in range(8)], G)
        for u in range(4):
            at = builder.add(off, ir.Constant(off.type, 64 * u))
            ptr = builder.bitcast(builder.gep(data, [at]), v16.as_pointer())
            v = builder.load(ptr, align=1)
            builder.store(builder.shuffle_vector(v, v, idx), ptr, align=1)
        return context.get_dummy_value()
    return types.none(a, o), codegen


# -- the weights of a task, a byte each (for vpmaddubsw) ---------------------------------------

def _unit_vector(context, builder, bits, qty, q, qo, hty, h, h0, h1, s0, s1):
    # _unit's 64 bytes as a <32 x i16> value (see _unit)
    v16 = _vt(_I16, G)

    def splat(s):
        s = builder.trunc(s, _I16)
        v = builder.insert_element(ir.Constant(v16, None), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, _c(_I32, 0, G))

    v = _load(context, builder, qty, q, qo, v16)
    m4 = _c(_I16, 0x0F0F, G)
    lo, hi = builder.and_(v, m4), builder.and_(builder.lshr(v, _c(_I16, 4, G)), m4)
    if bits:
        mask = _c(_I16, 0x0101 * ((1 << bits) - 1), G)
        top = [builder.lshr(_load(context, builder, hty, h, o, v16), splat(sh)) for o, sh in ((h0, s0), (h1, s1))]
        top = [builder.shl(builder.and_(v, mask), _c(_I16, 4, G)) for v in top]
        lo, hi = builder.or_(lo, top[0]), builder.or_(hi, top[1])
    return builder.shuffle_vector(lo, hi, _c(_I32, [j // 2 + G * (j % 2) for j in range(2 * G)], 2 * G))


def _store_at(context, builder, aryty, ary, off, v):
    data = context.make_array(aryty)(context, builder, ary).data
    builder.store(v, builder.bitcast(builder.gep(data, [off]), v.type.as_pointer()), align=1)


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
            out = _unit_vector(context, builder, bits, sig.args[0], q, qo, sig.args[2], h, h0, h1, s0, s1)
            _store_at(context, builder, sig.args[7], ws, wo, out)
            return context.get_dummy_value()
        return types.none(q, qo, h, h0, h1, s0, s1, ws, wo), codegen
    return unit


def _unit_pair(bits):
    """Units c and c + 4 of a Q4_K (bits 0) / Q5_K (1) pair of super-blocks in the tiles' pair
    order, straight from the packed bytes: _unit's unit c of each super-block (nibbles at qa /
    qb, fifth bits at ha / hb: bit c for the low nibbles, c + 4 for the high ones), then the
    even lanes of both to unit c, the odd ones to c + 4 (2 vpermt2d). A lane of _unit's order
    holds 16 of a super-block's values (lanes 2j, 2j + 1: its sub-block j); in the pair order
    lane j (j < 8) holds sub-block j of the first super-block and lane 8 + j sub-block j of the
    second, 4 bytes a unit. A lane's sum is then a whole sub-block's, under one scale and one
    minimum, and the tile scales two super-blocks with one vector where it took one per
    super-block. x is quantized into the same order (a permutation of both sides: the same
    integer sums). Rewoven here rather than in a second pass over the unpacked rows, which the
    MoE kernel (unpacking each item's rows) paid ~2.5 ms a 30B-A3B gate|up call for."""
    @intrinsic
    def unit_pair(typingctx, q, qa, qb, h, ha, hb, c, ws, wo):
        if not _c_arrays(q, h, ws):
            return None

        def codegen(context, builder, sig, args):
            q, qa, qb, h, ha, hb, c, ws, wo = args
            c4 = builder.add(c, ir.Constant(c.type, 4))
            v16 = _vt(_I32, G)
            a, b = (builder.bitcast(_unit_vector(context, builder, bits, sig.args[0], q, qo, sig.args[3], h, ho, ho,
                                                 c, c4), v16) for qo, ho in ((qa, ha), (qb, hb)))
            for e, u in ((0, c), (1, c4)):
                idx = _c(_I32, [2 * j + e for j in range(8)] + [G + 2 * j + e for j in range(8)], G)
                off = builder.add(wo, builder.mul(u, ir.Constant(u.type, 64)))
                _store_at(context, builder, sig.args[7], ws, off, builder.shuffle_vector(a, b, idx))
            return context.get_dummy_value()
        return types.none(q, qa, qb, h, ha, hb, c, ws, wo), codegen
    return unit_pair


_unit4, _unit5, _unit6 = (_unit(b) for b in (0, 1, 2))
_unit_pair4, _unit_pair5 = _unit_pair(0), _unit_pair(1)


def tile_rows(isa) -> int:
    """x rows per tile for an `isa` array (or its numba type): NXV for VNNI, else NX."""
    return NXV if isa.dtype in (np.int8, types.int8) else NX


def _is_vnni(isa) -> bool:
    return isa.dtype in (np.int8, types.int8, np.int16, types.int16)


@intrinsic
def _zeros(typingctx, isa):
    """The RW * nx accumulators of a tile, zero."""
    ty = types.UniTuple(F32X16, RW * tile_rows(isa))
    return ty(isa), lambda context, builder, sig, args: context.make_tuple(
        builder, ty, [ir.Constant(_vt(_F32, G), [0.0] * G)] * (RW * tile_rows(isa)))


@intrinsic
def _hsums(typingctx, acc, sums):
    """sums[j] = the horizontal sum of accumulator j, for every j (RW * nx <= 16 of them; sums
    holds 16): all at once, as a tree of halvings. Each step pairs vectors and adds the low
    half of every entry's lanes to its high half (two shuffles, one add), so 16 entries take 15
    steps and one vector store, where one reduction each took ~8 instructions and a scalar
    store (~100 a 2 x 6 tile: 9% of a tile over k = 2048). An entry's adds are the same
    halving tree whatever its neighbours (lanes l + 8, then + 4, + 2, + 1: the order in which
    LLVM expands int8_cpu._hsum's reassociating reduction), so tiles of any shape agree."""
    if not _c_arrays(sums):
        return None

    def codegen(context, builder, sig, args):
        n = sig.args[0].count
        zero = ir.Constant(_vt(_F32, G), [0.0] * G)
        vs = [builder.extract_value(args[0], j) for j in range(n)] + [zero] * (G - n)
        width = G  # lanes per entry in each vector of vs
        while width > 1:
            half, per = width // 2, G // width  # per: entries a vector holds
            nxt = []
            for a, b in zip(vs[0::2], vs[1::2]):
                if a is zero and b is zero:
                    nxt.append(zero)
                    continue
                lo = [e * width + j for e in range(per) for j in range(half)]
                lo = lo + [G + i for i in lo]
                pick = [builder.shuffle_vector(a, b, _c(_I32, [i + h for i in lo], G)) for h in (0, half)]
                nxt.append(builder.fadd(pick[0], pick[1]))
            vs, width = nxt, half
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        builder.store(vs[0], builder.bitcast(data, vs[0].type.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(acc, sums), codegen


@intrinsic
def _nx(typingctx, isa):
    """tile_rows(isa) as a constant of the compiled kernel."""
    return types.intp(isa), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), tile_rows(isa))

