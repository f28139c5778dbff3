"""KV cache rows kept as float32, IEEE half or ggml Q8_0, written and read inside numba kernels.

A cache is an array of rows (..., D) plus, for Q8_0, one scale per 32 values (..., D // 32).
The element type says the format: float32 rows are f32, uint16 rows are f16 (numba has no
float16 on the CPU: the bits are converted here, exactly, for all 65536 values), int8 rows are
Q8_0 quants with float16 scales, ggml's block byte for byte (tests/test_kv_cache.py checks both
against numpy).

`kv_store`, `kv_load`, `kv_dot`, `kv_axpy`, `kv_scores` and `kv_values` are one name per
operation whose body numba picks from the cache's element type, so attention (attention_cpu.py)
is written once for every format. Half to float is LLVM's fpext (vcvtph2ps), so the f16 dot
products over a row still vectorise. Per 128-value row in L1, one core (AVX-512), dot / axpy:
f32 4 / 10 ns, f16 8 / 13 ns. Writes are one row per token per head and need not be fast.

Q8_0 in decode (kv_scores, kv_values) does what llama.cpp does for a Q8_0 K cache: q is
quantized to Q8_0 once per head and job (quantize_q), and a score is the sum over blocks of
both scales times the block's integer dot. Its loops are LLVM vector IR (intrinsics in generic
vector types, no x86 intrinsics: any CPU LLVM targets, AVX2 and arm64 included), because
numba's own loop multiplied every value by its block's scale looked up per value (int8 * int8
is int64 to numba; a 32-trip block loop gets unrolled and then vectorised across blocks with
gathers, or not at all): dot / axpy were 15 / 39 ns a row, 2-3x f16's. On this Zen 5
(znver5, numba's inspect_asm of attend_rows) the inner loops are, per block of a key:
scores, vpmovsxbw (the key's 32 int8, from memory) + vpmaddwd (q's int16) + vcvtdq2ps +
vfmadd231ps, the scale vpinsrw + vcvtph2ps + vmulss + vbroadcastss, then per four keys one
shuffle tree (vshuff64x2 / vaddps / vhaddps) for their four sums; values, per block of four
keys, 4 x (vpmovsxbd + vcvtdq2ps) x 2 then per head 8 vfmadd231ps on a once-loaded
accumulator. A loop over one layer's chunks (8 KV heads, 16K keys, G = 2, one thread):
scores 8.0 ns a key row (f16's kv_dot loop 9.4), values 4.7 ns; the one-key-at-a-time
versions of both were 8.8 and 11.3 (scripts/bench_kv_cache.py --attention times whole layers). Prefill reads Q8_0 rows into float32 tiles by kv_load, a block
converted and multiplied by its broadcast scale (vpmovsxbd + vcvtdq2ps + vmulps), the same
products as the scalar loop it replaced.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .quantize_cpu import _roundf

QK = 32  # values per Q8_0 block (ggml's QK8_0)
FAST = {"reassoc", "contract", "arcp"}  # as layer_cpu: vectorised sums, NaN kept


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 whose bits are the uint32 u."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of the float32 x, as a uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """IEEE half bits -> float32 as LLVM's own fpext of a half: exact, and one instruction
    per vector where the CPU has one (F16C's vcvtph2ps on x86-64, fcvtl on arm64)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def f16_to_f32(h):
    """IEEE half bits -> float32, exact. LLVM's conversion: the integer recipe it replaced
    (shift, rescale by 2**112, fix inf / NaN) cost ~6 vector operations a vector, and decode
    at depth spends most of its time converting the cache's rows."""
    return _half_bits_to_f32(np.uint16(h))


@njit(cache=True)
def f32_to_f16(x):
    """float32 -> IEEE half bits, rounding to nearest even as numpy's astype(float16) does:
    overflow gives inf, NaN stays NaN, subnormals are rounded by a float add (whose rounding is
    the hardware's round-to-nearest-even) and normals by adding half an ulp plus the odd bit."""
    b = _f32_bits(x)
    sign = b & np.uint32(0x80000000)
    b ^= sign
    if b >= np.uint32(0x47800000):  # 65536 and up: inf, or NaN (quiet)
        o = np.uint32(0x7E00) if b > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif b < np.uint32(0x38800000):  # below 2**-14: a half subnormal or zero
        o = _f32_bits(_bits_f32(b) + np.float32(0.5)) - np.uint32(0x3F000000)
    else:
        odd = (b >> np.uint32(13)) & np.uint32(1)
        o = (b - np.uint32(0x37FFF001) + odd) >> np.uint32(13)  # rebias by -112 << 23, add 0xfff
    return np.uint16(o | (sign >> np.uint32(16)))


@njit(cache=True, inline="always")
def _block_scale(x, b):
    """ggml's Q8_0 scale of x's block b: (d, 1 / d) with d = amax / 127 (1 / d taken as 0 for an
    all-zero block), or (NaN, 0) where the block holds NaN or inf. Shared by the cache's rows
    and decode's quantized q, so that both round as ggml does."""
    amax = np.float32(0.0)
    finite = True
    for j in range(b * QK, (b + 1) * QK):
        a = abs(x[j])
        finite &= a <= np.float32(3.4028234663852886e38)
        amax = max(amax, a)
    if not finite:
        return np.float32(np.nan), np.float32(0.0)
    dd = amax / np.float32(127.0)
    return dd, np.float32(1.0) / dd if dd != np.float32(0.0) else np.float32(0.0)


@njit(cache=True)
def quantize_q8_0(x, q, d):
    """ggml's quantize_row_q8_0_ref: per 32 values d = amax / 127, q = roundf(x / d) (half away
    from zero, through the float32 reciprocal as ggml), d kept as half. A block holding NaN or
    inf gets a NaN scale, so that the damage reaches the logits as it would in f32."""
    for b in range(x.shape[0] // QK):
        dd, inv = _block_scale(x, b)
        if np.isnan(dd):
            d[b] = np.uint16(0x7E00)
            for j in range(b * QK, (b + 1) * QK):
                q[j] = 0
            continue
        d[b] = f32_to_f16(dd)
        for j in range(b * QK, (b + 1) * QK):
            q[j] = np.int8(_roundf(x[j] * inv))


# -- one operation, three formats: numba picks the body from the cache's element type -----------

def kv_store(x, c, s, li, h, t):
    """Row x (D,) float32 into c[li, h, t] (and its scales s[li, h, t])."""


def kv_dot(x, c, s, li, h, t):
    """x (D,) . c[li, h, t], in float32."""


def kv_axpy(acc, w, c, s, li, h, t):
    """acc (D,) += w * c[li, h, t]."""


def kv_load(out, c, s, li, h, t):
    """out (D,) = c[li, h, t] as float32."""


@overload(kv_store)
def _kv_store(x, c, s, li, h, t):
    if c.dtype == types.float32:
        def f32(x, c, s, li, h, t):
            for d in range(x.shape[0]):
                c[li, h, t, d] = x[d]
        return f32
    if c.dtype == types.uint16:
        def f16(x, c, s, li, h, t):
            for d in range(x.shape[0]):
                c[li, h, t, d] = f32_to_f16(x[d])
        return f16
    if c.dtype == types.int8:
        def q8_0(x, c, s, li, h, t):
            quantize_q8_0(x, c[li, h, t], s[li, h, t])
        return q8_0
    return None


@overload(kv_dot, jit_options={"fastmath": FAST})
def _kv_dot(x, c, s, li, h, t):
    if c.dtype == types.float32:
        def f32(x, c, s, li, h, t):
            a = np.float32(0.0)
            for d in range(x.shape[0]):
                a += x[d] * c[li, h, t, d]
            return a
        return f32
    if c.dtype == types.uint16:
        def f16(x, c, s, li, h, t):
            a = np.float32(0.0)
            for d in range(x.shape[0]):
                a += x[d] * f16_to_f32(c[li, h, t, d])
            return a
        return f16
    return None  # q8_0: kv_scores' integer dots


@overload(kv_axpy, jit_options={"fastmath": FAST})
def _kv_axpy(acc, w, c, s, li, h, t):
    if c.dtype == types.float32:
        def f32(acc, w, c, s, li, h, t):
            for d in range(acc.shape[0]):
                acc[d] += w * c[li, h, t, d]
        return f32
    if c.dtype == types.uint16:
        def f16(acc, w, c, s, li, h, t):
            for d in range(acc.shape[0]):
                acc[d] += w * f16_to_f32(c[li, h, t, d])
        return f16
    return None  # q8_0: kv_values


@overload(kv_load)
def _kv_load(out, c, s, li, h, t):
    if c.dtype == types.float32:
        def f32(out, c, s, li, h, t):
            out[:] = c[li, h, t]
        return f32
    if c.dtype == types.uint16:
        def f16(out, c, s, li, h, t):
            for d in range(out.shape[0]):
                out[d] = f16_to_f32(c[li, h, t, d])
        return f16
    if c.dtype == types.int8:
        def q8_0(out, c, s, li, h, t):
            _q8_load(out, c[li, h], s[li, h], t)
        return q8_0
    return None


# -- decode over a Q8_0 cache: q quantized once, integer dots per block --------------------------

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vt(t, n):
    return ir.VectorType(t, n)


def _ptr(context, builder, aryty, ary, off, ty):
    # where a ty (a scalar or vector) starts at flat element offset off of a C-contiguous array
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [off]), ty.as_pointer())


def _splat(builder, x, n):
    v = builder.insert_element(ir.Constant(_vt(x.type, n), None), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(_vt(_I32, n), [0] * n))


def _half_at(context, builder, aryty, ary, off):
    return builder.fpext(builder.bitcast(builder.load(_ptr(context, builder, aryty, ary, off, _I16), align=2),
                                         ir.HalfType()), _F32)


def _c(*tys):
    return all(isinstance(t, types.Array) and t.layout == "C" for t in tys)


def _tree4(builder, a):
    # four <16 x float> -> <4 x float> of their sums: halves of two vectors added lane-wise into
    # one, twice, then within the vector; 9 shuffles and 4 adds where four separate horizontal
    # sums take ~16 and 16
    def pair(x, y, lo, hi):
        c = lambda idx: ir.Constant(_vt(_I32, len(idx)), idx)
        return builder.fadd(builder.shuffle_vector(x, y, c(lo)), builder.shuffle_vector(x, y, c(hi)))
    ab = pair(a[0], a[1], [*range(8), *range(16, 24)], [*range(8, 16), *range(24, 32)])
    cd = pair(a[2], a[3], [*range(8), *range(16, 24)], [*range(8, 16), *range(24, 32)])
    x = pair(ab, cd, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27],
             [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31])
    x = pair(x, x, [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])
    return pair(x, x, [0, 2, 4, 6], [1, 3, 5, 7])


@intrinsic
def _q8_scores(typingctx, qi, qd, k, ks, nb, t0, t1, sc):
    """sc[g, t - t0] = sum over blocks b < nb of qd[g, b] * half(ks[t, b]) * (qi[g] . k[t]
    over block b) for keys t0 <= t < t1 and heads g: qi (G, D) the query heads' quants widened
    to int16, qd (G, nb) their scales, k (ctx, D) int8, ks (ctx, nb) half bits, all C arrays.

    LLVM vector IR, because numba's loops do not vectorise this (int8 * int8 is int64 to
    numba; a 32-trip loop is unrolled, then not vectorised: the module's docstring). A block of a
    key: the products summed in neighbouring pairs as int32 (exact: |sum| <= 2 * 127 * 128),
    the form LLVM maps to vpmaddwd (elsewhere its own widening multiplies and adds); the 16
    pair sums to float32 (exact), times the two scales, into a 16-lane float32 accumulator per
    key, as ggml's AVX2 vec_dot_q8_0_q8_0 does with its 8 lanes. Four keys at a time per head,
    so that a block of q, loaded once, meets four keys and the four accumulators are summed
    by one shuffle tree (_tree4); the keys past the last four one at a time."""
    if not _c(qi, qd, k, ks, sc):
        return None

    def codegen(context, builder, sig, args):
        qi, qd, k, ks, nb, t0, t1, sc = args
        tqi, tqd, tk, tks, _, _, _, tsc = sig.args
        shape = context.make_array(tqi)(context, builder, qi).shape
        G, D = builder.extract_value(shape, 0), builder.extract_value(shape, 1)
        m = builder.extract_value(context.make_array(tsc)(context, builder, sc).shape, 1)  # sc's row length
        n = builder.sub(t1, t0)
        K = lambda x: ir.Constant(n.type, x)
        zero = ir.Constant(_vt(_F32, 16), [0.0] * 16)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]

        def keys(t, r):
            # keys t0 + t .. t0 + t + r (r = 4 or 1) against every head
            with cgutils.for_range(builder, G) as gl:
                g = gl.index
                for a in accs[:r]:
                    builder.store(zero, a)
                with cgutils.for_range(builder, nb) as bl:
                    b = bl.index
                    o = builder.mul(b, K(QK))
                    qv = builder.load(_ptr(context, builder, tqi, qi, builder.add(builder.mul(g, D), o), _vt(_I16, QK)),
                                      align=2)
                    qv = builder.sext(qv, _vt(_I32, QK))
                    dq = builder.load(_ptr(context, builder, tqd, qd, builder.add(builder.mul(g, nb), b), _F32), align=4)
                    for u in range(r):
                        tu = builder.add(builder.add(t0, t), K(u))
                        kv = builder.load(_ptr(context, builder, tk, k, builder.add(builder.mul(tu, D), o), _vt(_I8, QK)),
                                          align=1)
                        p = builder.mul(builder.sext(kv, _vt(_I32, QK)), qv)
                        even = builder.shuffle_vector(p, ir.Constant(p.type, None), ir.Constant(_vt(_I32, 16), list(range(0, QK, 2))))
                        odd = builder.shuffle_vector(p, ir.Constant(p.type, None), ir.Constant(_vt(_I32, 16), list(range(1, QK, 2))))
                        w = builder.fmul(dq, _half_at(context, builder, tks, ks, builder.add(builder.mul(tu, nb), b)))
                        y = builder.fmul(builder.sitofp(builder.add(even, odd), _vt(_F32, 16)), _splat(builder, w, 16),
                                         flags=("contract",))
                        builder.store(builder.fadd(builder.load(accs[u]), y, flags=("contract",)), accs[u])
                at = builder.add(builder.mul(g, m), t)
                if r == 4:
                    s4 = _tree4(builder, [builder.load(a) for a in accs])
                    builder.store(s4, _ptr(context, builder, tsc, sc, at, _vt(_F32, 4)), align=4)
                else:
                    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _vt(_F32, 16)]),
                                                        "llvm.vector.reduce.fadd.v16f32")
                    # -0.0 + x is x exactly: the start adds nothing
                    s1 = builder.call(fn, [ir.Constant(_F32, -0.0), builder.load(accs[0])], fastmath=("reassoc",))
                    builder.store(s1, _ptr(context, builder, tsc, sc, at, _F32), align=4)

        n4 = builder.udiv(n, K(4))
        with cgutils.for_range(builder, n4) as l4:
            keys(builder.mul(l4.index, K(4)), 4)
        with cgutils.for_range(builder, n, start=builder.mul(n4, K(4))) as l1:
            keys(l1.index, 1)
        return context.get_dummy_value()
    return types.none(qi, qd, k, ks, nb, t0, t1, sc), codegen


@intrinsic
def _q8_values(typingctx, acc, sc, v, vs, nb, t0, t1):
    """acc[g] += sum over keys t0 <= t < t1 of sc[g, t - t0] * half(vs[t, b]) * v[t, block b]
    for every head g < G and block b < nb; acc (G, D), sc (G, n), v (ctx, D) int8, vs (ctx,
    nb) half bits, all C arrays.

    LLVM vector IR, as _q8_scores. Four keys at a time: per block, the four value blocks are
    converted int8 -> float32 once (vpmovsxbd + vcvtdq2ps, 32 lanes each) and serve every
    head, whose accumulator block is loaded, given the four weighted blocks and stored once
    (not once per key); a key's weight times its block scale is one scalar, broadcast. The
    keys past the last four go one at a time. numba's own loop multiplied each value by a
    scale looked up per value and kept the accumulator in memory per key."""
    if not _c(acc, sc, v, vs):
        return None

    def codegen(context, builder, sig, args):
        a, sc, v, vs, nb, t0, t1 = args
        ta, tsc, tv, tvs = sig.args[:4]
        shape = context.make_array(ta)(context, builder, a).shape
        G, D = builder.extract_value(shape, 0), builder.extract_value(shape, 1)
        m = builder.extract_value(context.make_array(tsc)(context, builder, sc).shape, 1)  # sc's row length
        n = builder.sub(t1, t0)
        qk = ir.Constant(n.type, QK)

        def keys(t, r):
            # keys t0 + t .. t0 + t + r (r = 4 or 1), every block and head
            with cgutils.for_range(builder, nb) as bl:
                b = bl.index
                xs, ds = [], []
                for u in range(r):
                    tu = builder.add(builder.add(t0, t), ir.Constant(n.type, u))
                    row = builder.add(builder.mul(tu, D), builder.mul(b, qk))
                    xs.append(builder.sitofp(builder.load(_ptr(context, builder, tv, v, row, _vt(_I8, QK)), align=1),
                                             _vt(_F32, QK)))
                    ds.append(_half_at(context, builder, tvs, vs, builder.add(builder.mul(tu, nb), b)))
                with cgutils.for_range(builder, G) as gl:
                    g = gl.index
                    pa = _ptr(context, builder, ta, a, builder.add(builder.mul(g, D), builder.mul(b, qk)), _vt(_F32, QK))
                    y = builder.load(pa, align=4)
                    for u in range(r):
                        w = builder.load(_ptr(context, builder, tsc, sc,
                                              builder.add(builder.mul(g, m), builder.add(t, ir.Constant(n.type, u))),
                                              _F32), align=4)
                        p = builder.fmul(xs[u], _splat(builder, builder.fmul(w, ds[u]), QK), flags=("contract",))
                        y = builder.fadd(y, p, flags=("contract",))
                    builder.store(y, pa, align=4)

        n4 = builder.udiv(n, ir.Constant(n.type, 4))
        with cgutils.for_range(builder, n4) as l4:
            keys(builder.mul(l4.index, ir.Constant(n.type, 4)), 4)
        with cgutils.for_range(builder, n, start=builder.mul(n4, ir.Constant(n.type, 4))) as l1:
            keys(l1.index, 1)
        return context.get_dummy_value()
    return types.none(acc, sc, v, vs, nb, t0, t1), codegen


@intrinsic
def _q8_load(typingctx, out, q, d, t):
    """out (D,) = row t of q (ctx, D) int8 times its block scales d (ctx, D / 32) half bits: a
    block's 32 values converted at once and multiplied by the broadcast scale, the products
    the scalar loop's (each one float32 rounding of q * d), without its scale looked up per value."""
    if not _c(out, q, d):
        return None

    def codegen(context, builder, sig, args):
        out, q, d, t = args
        to, tq, td, _ = sig.args
        D = builder.extract_value(context.make_array(to)(context, builder, out).shape, 0)
        nb = builder.udiv(D, ir.Constant(D.type, QK))
        with cgutils.for_range(builder, nb) as bl:
            b = bl.index
            o = builder.mul(b, ir.Constant(b.type, QK))
            x = builder.sitofp(builder.load(_ptr(context, builder, tq, q, builder.add(builder.mul(t, D), o),
                                                 _vt(_I8, QK)), align=1), _vt(_F32, QK))
            s = _half_at(context, builder, td, d, builder.add(builder.mul(t, nb), b))
            builder.store(builder.fmul(x, _splat(builder, s, QK)), _ptr(context, builder, to, out, o, _vt(_F32, QK)),
                          align=4)
        return context.get_dummy_value()
    return types.none(out, q, d, t), codegen


@njit(cache=True)
def quantize_q(x, scale, q, d):
    """The query row x (D,) as Q8_0 for the integer dots: per 32 values d = amax / 127, q =
    roundf(x / d) through the float32 reciprocal, as quantize_q8_0 (ggml's rule), but d kept
    in float32 (not rounded to half: free here, and a little closer to x) and times scale
    (the softmax's 1 / sqrt(D), applied once here instead of once per score); q as int16, the
    width the dot multiplies in. A block with NaN or inf: d NaN, so the scores are NaN as in
    f32. No fastmath: the rounding is exactly this (tests reproduce it in numpy)."""
    for b in range(x.shape[0] // QK):
        dd, inv = _block_scale(x, b)
        if np.isnan(dd):
            d[b] = dd
            for j in range(b * QK, (b + 1) * QK):
                q[j] = 0
            continue
        d[b] = dd * scale
        for j in range(b * QK, (b + 1) * QK):
            q[j] = np.int16(_roundf(x[j] * inv))


def kv_scores(qh, c, s, li, h, t0, t1, scale, sc, mx):
    """sc[g, t - t0] = scale * qh[g] . c[li, h, t] for keys t0..t1, and mx[g] their max."""


def kv_values(sc, c, s, li, h, t0, t1, acc):
    """acc[g] += sum over keys t0..t1 of sc[g, t - t0] * c[li, h, t]."""


@overload(kv_scores, jit_options={"fastmath": FAST})
def _kv_scores(qh, c, s, li, h, t0, t1, scale, sc, mx):
    if c.dtype == types.int8:
        def q8_0(qh, c, s, li, h, t0, t1, scale, sc, mx):
            # llama.cpp's arithmetic for a Q8_0 K cache: q quantized once per head (Q8_0),
            # then per key integer block dots, each scaled by both blocks' scales
            G, D = qh.shape
            nb = D // QK
            qi = np.empty((G, D), np.int16)
            qd = np.empty((G, nb), np.float32)
            for g in range(G):
                quantize_q(qh[g], scale, qi[g], qd[g])
            _q8_scores(qi, qd, c[li, h], s[li, h], nb, t0, t1, sc)
            for g in range(G):
                for t in range(t1 - t0):
                    mx[g] = max(mx[g], sc[g, t])
        return q8_0

    def fmt(qh, c, s, li, h, t0, t1, scale, sc, mx):
        for t in range(t0, t1):  # a key row serves the G heads from L1
            for g in range(qh.shape[0]):
                sc[g, t - t0] = kv_dot(qh[g], c, s, li, h, t) * scale
                mx[g] = max(mx[g], sc[g, t - t0])
    return fmt


@overload(kv_values, jit_options={"fastmath": FAST})
def _kv_values(sc, c, s, li, h, t0, t1, acc):
    if c.dtype == types.int8:
        def q8_0(sc, c, s, li, h, t0, t1, acc):
            _q8_values(acc, sc, c[li, h], s[li, h], acc.shape[1] // QK, t0, t1)
        return q8_0

    def fmt(sc, c, s, li, h, t0, t1, acc):
        for t in range(t0, t1):  # a value row likewise
            for g in range(acc.shape[0]):
                kv_axpy(acc[g], sc[g, t - t0], c, s, li, h, t)
    return fmt


# -- prefill: whole blocks of rows in and out -------------------------------------------------

@njit(cache=True, nogil=True)
def write_rows(x, c, s, li, p):
    """x (Hkv, n, D) float32 into c[li, :, p:p + n]."""
    for h in range(x.shape[0]):
        for i in range(x.shape[1]):
            kv_store(x[h, i], c, s, li, h, p + i)


@njit(cache=True, nogil=True)
def read_rows(c, s, li, h, out):
    """c[li, h, :T] as float32 into out (T, D): the keys or values one prefill head reads."""
    for t in range(out.shape[0]):
        kv_load(out[t], c, s, li, h, t)


@njit(parallel=True, cache=True)
def quantize_rows_q8_0(x, q, d):
    """x (n, D) -> q (n, D) int8, d (n, D // 32) half bits: the cache's Q8_0, for tests."""
    for i in prange(x.shape[0]):
        quantize_q8_0(x[i], q[i], d[i])
