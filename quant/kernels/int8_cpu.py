"""Decode products with the activation quantized to 8 bits, as llama.cpp does on the CPU.

x is quantized once per product (`quantize_x`, ggml's Q8_0 rounding: d = max|x| / 127, q =
round(x / d) half away from zero, per 32 values); then each block of 32 weights meets its
block of x as integers, summed exactly in int32, and only the block sum is scaled in float.

numba cannot write that loop itself: it types int8 * int8 as int64, fully unrolls a 32-trip
block loop, and with its SLP vectoriser off it then vectorises across blocks with strided
loads, or not at all (measured 2-11x slower than the float kernel). A flat int16 -> int32
loop over a whole row does give vpmaddwd, but a row has a scale per 32. So the inner step is
a small intrinsic in generic LLVM vector IR (no x86 intrinsics, so any CPU LLVM targets):
widen, multiply, add neighbouring lanes, which LLVM turns into vpmaddwd, and into vpdpwssd
(multiply-add into the accumulator) where AVX-512-VNNI or AVX-VNNI exists. On this Zen 5
(znver5; `python scripts/bench_int8.py --asm`) a group of 16 blocks is: Q8_0, 16 vpmovsxbw
(weights, from memory) + 1 vpmaddwd + 15 vpdpwssd (x from memory); Q4_0, the nibbles split
by vpand and vgf2p8affineqb (GFNI, the shift), 16 vpmovzxbw + 1 vpmaddwd + 15 vpdpwssd; then
vcvtph2ps (16 scales), vcvtdq2ps and one vfmadd231ps. The tail blocks: vpmovsxbw/vpmovzxbw +
vpmaddwd and a horizontal add. Not vpdpbusd / vpmaddubsw: LLVM only forms vpdpbusd from
generic IR for a full horizontal sum, and vpmaddubsw saturates.

Layout (`pack`): vector lanes are blocks, not elements. A row's blocks go in groups of 16;
a group's weights are stored as 16 "pair steps" of 32 bytes, step p holding
elements 2p and 2p + 1 of each of the 16 blocks (position 2t + e: block t, element 2p + e).
One step is then one vpmaddwd (16 lanes, one per block) and a group's block sums come out in
one register, scaled by 16 block scales at once, with no horizontal sum per block. x is laid
out the same way, already widened to int16 (it is read by every row; L1-resident). Blocks
after the last full group (nb % 16) are stored as in the file and summed one block at a time.
Scales stay float16 (converted in the kernel, vcvtph2ps), so Q8_0 costs 1.0625 bytes a weight
and Q4_0 0.5625, both exactly the file's size. Q4_0's bytes are only reordered: byte j of a
file block holds elements j and j + 16; chunk c of a group holds in byte 2t + e the file's
byte 2c + e of block t, so its low nibbles are pair step c and its high nibbles step c + 8.
Where the CPU has AVX512-VNNI, Q4_0 decode takes vpdpbusd instead (_q4_group_vnni: the same
bytes woven in registers, x as int8 in quad steps), the same integer sums bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from ..qtensor import QTensor, stack_parts, u16
from .variants import variant

G = 16  # blocks per group = int32 lanes of one 512-bit register


class _Vec(types.Type):
    """<16 x float> in a register: a group's 16 block results, kept apart until the row ends."""

    def __init__(self):
        super().__init__(name="f32x16")


F32X16 = _Vec()
register_model(_Vec)(lambda dmm, fe: models.PrimitiveModel(dmm, fe, ir.VectorType(ir.FloatType(), G)))

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vt(t, n):
    return ir.VectorType(t, n)


def _load(context, builder, aryty, ary, off, vty):
    # vty's worth of elements at flat element offset off of a C-contiguous array
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.load(builder.bitcast(builder.gep(data, [off]), vty.as_pointer()), align=1)


def _lanes(builder, v, n, start, step):
    return builder.shuffle_vector(v, ir.Constant(v.type, None),
                                  ir.Constant(_vt(_I32, n), [start + step * i for i in range(n)]))


def _pair_sums(builder, w, x):
    # w (<32 x i8|i16>, widened per its signedness by the caller) . x: sums of neighbouring
    # products, 16 lanes; the shape LLVM maps to vpmaddwd / vpdpwssd
    m = builder.mul(w, builder.sext(x, _vt(_I32, 32)))
    return builder.add(_lanes(builder, m, G, 0, 2), _lanes(builder, m, G, 1, 2))


def maddubs(builder, w, x):
    # u8 w . s8 x (<32 x i8> each), neighbouring products summed into <16 x i16>: AVX2's
    # vpmaddubsw, called by name because LLVM only forms it from generic IR for two loads (a
    # nibble split in registers becomes vpmullw, int8_gemm_cpu's docstring). Saturates above
    # 2^15: callers keep 2 x w x 127 below it. x86 with AVX2 only (int8_tiles_cpu.avx2_available)
    fty = ir.FunctionType(_vt(_I16, G), [_vt(_I8, 32), _vt(_I8, 32)])
    fn = cgutils.get_or_insert_function(builder.module, fty, "llvm.x86.avx2.pmadd.ub.sw")
    return builder.call(fn, [w, x])


def _c_arrays(*tys):
    return all(isinstance(t, types.Array) and t.layout == "C" for t in tys)


@intrinsic
def _vzero(typingctx):
    return F32X16(), lambda context, builder, sig, args: ir.Constant(_vt(_F32, G), [0.0] * G)


@intrinsic
def _hsum(typingctx, v):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _vt(_F32, G)]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=("reassoc",))
    return types.float32(v), codegen


@intrinsic
def _f16(typingctx, a, i):
    """Element i of a uint16 array of float16 bits, as float32."""
    def codegen(context, builder, sig, args):
        h = _load(context, builder, sig.args[0], args[0], args[1], _I16)
        return builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)
    return types.float32(a, i), codegen


def _scale_groups(context, builder, ta, acc, isum, xs, xso, d, do, xd, xdo, four_bit):
    # acc + the 16 block sums (Q4_0: less 8 x x's block sums) under d * xd
    if four_bit:
        xsv = _load(context, builder, ta[5], xs, xso, _vt(_I32, G))
        isum = builder.sub(isum, builder.shl(xsv, ir.Constant(xsv.type, [3] * G)))
    dh = _load(context, builder, ta[7], d, do, _vt(_I16, G))
    scale = builder.fmul(builder.fpext(builder.bitcast(dh, _vt(ir.HalfType(), G)), _vt(_F32, G)),
                         _load(context, builder, ta[9], xd, xdo, _vt(_F32, G)))
    prod = builder.fmul(builder.sitofp(isum, _vt(_F32, G)), scale, flags=("contract",))
    return builder.fadd(acc, prod, flags=("contract",))


def _group(four_bit):
    @intrinsic
    def group(typingctx, acc, w, wo, x, xo, xs, xso, d, do, xd, xdo):
        """acc + (16 block sums of group) * (d * xd): w at wo (512 int8, or 256 bytes of
        nibbles), x at xo (512 int16 in the same order); Q4_0 subtracts 8 * xs (x's block sums)."""
        if not _c_arrays(w, x, xs, d, xd):
            return None

        def codegen(context, builder, sig, args):
            acc, w, wo, x, xo, xs, xso, d, do, xd, xdo = args
            ta = sig.args
            isum = None

            def step(p, wv):
                nonlocal isum
                xv = _load(context, builder, ta[3], x, builder.add(xo, ir.Constant(xo.type, 32 * p)), _vt(_I16, 32))
                s = _pair_sums(builder, wv, xv)
                isum = s if isum is None else builder.add(isum, s)

            for c in range(8 if four_bit else 16):
                wv = _load(context, builder, ta[1], w, builder.add(wo, ir.Constant(wo.type, 32 * c)), _vt(_I8, 32))
                if four_bit:
                    lo = builder.and_(wv, ir.Constant(wv.type, [15] * 32))
                    hi = builder.lshr(wv, ir.Constant(wv.type, [4] * 32))
                    step(c, builder.zext(lo, _vt(_I32, 32)))
                    step(c + 8, builder.zext(hi, _vt(_I32, 32)))
                else:
                    step(c, builder.sext(wv, _vt(_I32, 32)))
            return _scale_groups(context, builder, ta, acc, isum, xs, xso, d, do, xd, xdo, four_bit)
        return F32X16(acc, w, wo, x, xo, xs, xso, d, do, xd, xdo), codegen
    return group


# Two 32-byte chunks woven so that a lane's 4 bytes sit side by side: byte 4t + j from chunk
# j >> 1, byte 2t + (j & 1). It moves byte pairs, so LLVM emits one vpermw (AVX512BW).
QUAD = [32 * (j >> 1) + 2 * t + (j & 1) for t in range(G) for j in range(4)]


def woven_nibble_sums(context, builder, wty, w, wo, xty, x, xo, units):
    """The 16 lanes' integer sums of `units` 64-byte nibble units at wo against int8 x at xo in
    quad steps: unit h's chunks 2h, 2h + 1 woven (QUAD), its low nibbles quad step h and its high
    ones step units + h, each one vpdpbusd (AVX512-VNNI; u8 nibbles x s8 x, 4 products a lane)."""
    from .int8_tiles_cpu import _dpbusd

    def at(base, n):
        return builder.add(base, ir.Constant(base.type, n))

    isum = ir.Constant(_vt(_I32, G), [0] * G)
    quad = ir.Constant(_vt(_I32, 64), QUAD)
    for h in range(units):
        v = _load(context, builder, wty, w, at(wo, 64 * h), _vt(_I8, 64))
        v = builder.shuffle_vector(v, ir.Constant(v.type, None), quad)
        lo = builder.and_(v, ir.Constant(v.type, [15] * 64))
        hi = builder.lshr(v, ir.Constant(v.type, [4] * 64))
        for s, nib in ((h, lo), (units + h, hi)):
            isum = _dpbusd(builder, isum, nib, _load(context, builder, xty, x, at(xo, 64 * s), _vt(_I8, 64)))
    return isum


@intrinsic
def _q4_group_vnni(typingctx, acc, w, wo, x, xo, xs, xso, d, do, xd, xdo):
    """_q4_group with AVX512-VNNI's vpdpbusd: x int8 in quad steps (quantize_x(quad=True):
    element 4s + j of block t at 64s + 4t + j of its group); chunks 2h, 2h + 1 woven (QUAD)
    hold file bytes 4h + j of block t, so their low nibbles are quad step h and their high ones
    step 4 + h. A group is 4 vpermw + 8 vpdpbusd (u8 nibbles x s8 x) and the nibble split,
    against the generic 16 vpmovzxbw + 16 vpdpwssd; the same integer block sums, so the same
    result bit for bit."""
    if not _c_arrays(w, x, xs, d, xd):
        return None

    def codegen(context, builder, sig, args):
        acc, w, wo, x, xo, xs, xso, d, do, xd, xdo = args
        ta = sig.args
        isum = woven_nibble_sums(context, builder, ta[1], w, wo, ta[3], x, xo, 4)
        return _scale_groups(context, builder, ta, acc, isum, xs, xso, d, do, xd, xdo, True)
    return F32X16(acc, w, wo, x, xo, xs, xso, d, do, xd, xdo), codegen


@intrinsic
def _q4_group_ub(typingctx, acc, w, wo, x, xo, xs, xso, d, do, xd, xdo):
    """_q4_group with AVX2's vpmaddubsw (maddubs), for x86 CPUs without VNNI: x int8 in the
    generic pair steps (quantize_x(pairs8=True)), so a chunk's low nibbles against step c and
    its high ones against step c + 8 are one vpmaddubsw each (lane t: block t's two products),
    no shuffle. i16 sums stay exact over 8 steps (8 x 2 x 15 x 127 = 30480 < 2^15), so a group
    is two windows, each widened once: compiled for Haswell (AVX2), 16 vpmaddubsw + 14 vpaddw
    + 4 vpmovsxwd against the generic 34 vpmovzxbw + 34 vpmaddwd + 34 vpaddd (x int16, twice
    the bytes): 1.6-1.9x per product at Qwen3 shapes. The same integer block sums, so the same
    result bit for bit."""
    if not _c_arrays(w, x, xs, d, xd):
        return None

    def codegen(context, builder, sig, args):
        acc, w, wo, x, xo, xs, xso, d, do, xd, xdo = args
        ta = sig.args

        def at(base, n):
            return builder.add(base, ir.Constant(base.type, n))

        isum = None
        for half in range(2):  # chunks 4h..4h+3: steps c and c + 8, 8 steps a window
            s16 = None
            for c in range(4 * half, 4 * half + 4):
                v = _load(context, builder, ta[1], w, at(wo, 32 * c), _vt(_I8, 32))
                for p, nib in ((c, builder.and_(v, ir.Constant(v.type, [15] * 32))),
                               (c + 8, builder.lshr(v, ir.Constant(v.type, [4] * 32)))):
                    m = maddubs(builder, nib, _load(context, builder, ta[3], x, at(xo, 32 * p), _vt(_I8, 32)))
                    s16 = m if s16 is None else builder.add(s16, m)
            wide = builder.sext(s16, _vt(_I32, G))
            isum = wide if isum is None else builder.add(isum, wide)
        return _scale_groups(context, builder, ta, acc, isum, xs, xso, d, do, xd, xdo, True)
    return F32X16(acc, w, wo, x, xo, xs, xso, d, do, xd, xdo), codegen


_q8_group = _group(False)
_q4_group = _group(True)


def _block(four_bit):
    @intrinsic
    def block(typingctx, w, wo, x, xo):
        """Integer sum of one block in the file's order (the tail after the last full group);
        Q4_0's nibbles unsigned (the caller subtracts 8 * the block sum of x)."""
        if not _c_arrays(w, x):
            return None

        def codegen(context, builder, sig, args):
            w, wo, x, xo = args
            if four_bit:
                b = _load(context, builder, sig.args[0], w, wo, _vt(_I8, 16))
                lo = builder.and_(b, ir.Constant(b.type, [15] * 16))
                hi = builder.lshr(b, ir.Constant(b.type, [4] * 16))
                wv = builder.zext(builder.shuffle_vector(lo, hi, ir.Constant(_vt(_I32, 32), list(range(32)))),
                                  _vt(_I32, 32))
            else:
                wv = builder.sext(_load(context, builder, sig.args[0], w, wo, _vt(_I8, 32)), _vt(_I32, 32))
            xv = _load(context, builder, sig.args[2], x, xo, _vt(_I16, 32))
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_vt(_I32, G)]),
                                                "llvm.vector.reduce.add.v16i32")
            return builder.call(fn, [_pair_sums(builder, wv, xv)])
        return types.int32(w, wo, x, xo), codegen
    return block


_q8_block = _block(False)
_q4_block = _block(True)


# -- the activation ------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _at(b, j, ng):
    # where element j of block b goes: pair step j >> 1 of its group, or in place in the tail
    if b < ng * G:
        return (b // G) * 32 * G + (j >> 1) * 2 * G + 2 * (b % G) + (j & 1)
    return b * 32 + j


_BIG = np.float32(np.finfo(np.float32).max)


@njit(cache=True)
def _quantize_x(x, xq, xd, xs, ng, quad=False):
    # ng: the blocks laid out in the kernels' groups of G (0: every block in x's own order);
    # quad: in _q4_group_vnni's quad steps, else in pair steps.
    # A block's quants first, then placed: the rounding loop vectorises (9x faster per row)
    q = np.empty(32, np.int32)
    for b in range(x.shape[0] // 32):
        o = b * 32
        amax, finite = np.float32(0.0), True
        for j in range(32):
            amax = max(amax, abs(x[o + j]))
            finite &= abs(x[o + j]) <= _BIG
        # max() passes a NaN over: a NaN scale keeps a broken activation visible downstream
        d = np.float32(amax / np.float32(127.0)) if finite else np.float32(np.nan)
        inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            v = np.float64(np.float32(x[o + j] * inv))  # + 0.5 in float64 is exact
            q[j] = np.int32(np.copysign(np.floor(np.abs(v) + 0.5), v))  # C's roundf
            s += q[j]
        if b < ng * G and quad:
            at = (b // G) * 32 * G + 4 * (b % G)
            for j in range(32):
                xq[at + (j >> 2) * 4 * G + (j & 3)] = q[j]
        elif b < ng * G:
            at = (b // G) * 32 * G + 2 * (b % G)  # _at(b, 0, ng)
            for j in range(32):
                xq[at + (j >> 1) * 2 * G + (j & 1)] = q[j]
        else:
            for j in range(32):
                xq[o + j] = q[j]
        xd[b] = d
        xs[b] = s


def quantize_x(x: np.ndarray, quad: bool = False, pairs8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (k,) float32 -> (quants as int16 in the kernels' order, int8 in the same order (pairs8,
    the AVX2 kernel's) or int8 in the VNNI kernel's (quad), float32 scale per 32, int32 sum of
    the quants per 32)."""
    x = np.ascontiguousarray(x, np.float32)
    nb = x.shape[0] // 32
    xq = np.empty(nb * 32, np.int8 if quad or pairs8 else np.int16)
    xd, xs = np.empty(nb, np.float32), np.empty(nb, np.int32)
    _quantize_x(x, xq, xd, xs, x.shape[0] // 32 // G, quad)
    return xq, xd, xs


def _quantize_quad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_x(x, True)


def _quantize_pairs8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_x(x, pairs8=True)


# -- the weights (from the file's bytes, once) ---------------------------------------------

# The repacks move 2-byte pairs (uint16 views, qtensor.u16): a pair step of a group is one
# pair from each of its 16 blocks, so a group is a 16 x 16 transpose of pairs, written in
# order; no per-element index arithmetic (the byte-wise loop measured ~10x slower).

@njit(parallel=True, cache=True)
def _pack_q8_0(raw, q, d):
    # raw (R, 17 nb): block b's scale at 17 b, its 16 quant pairs after it; q (R, 16 nb)
    nb = d.shape[1]
    ng = nb // G
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = raw[r, 17 * b]
        for g in range(ng):
            for p in range(16):
                for t in range(G):
                    q[r, 256 * g + 16 * p + t] = raw[r, 17 * (G * g + t) + 1 + p]
        for b in range(ng * G, nb):
            for p in range(16):
                q[r, 16 * b + p] = raw[r, 17 * b + 1 + p]


@njit(parallel=True, cache=True)
def _pack_q4_0(raw, q, d):
    # raw (R, 9 nb): scale, then 8 pairs of nibble bytes (file bytes 2c, 2c + 1 -> chunk c);
    # q (R, 8 nb)
    nb = d.shape[1]
    ng = nb // G
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = raw[r, 9 * b]
        for g in range(ng):
            for c in range(8):
                for t in range(G):
                    q[r, 128 * g + 16 * c + t] = raw[r, 9 * (G * g + t) + 1 + c]
        for b in range(ng * G, nb):
            for c in range(8):
                q[r, 8 * b + c] = raw[r, 9 * b + 1 + c]


@dataclass(frozen=True)
class Int8Packed:
    """A Q8_0 or Q4_0 matrix (or a stack of n_mats experts, expert e at rows e * rows ..) in
    this module's layout: q int8 (R, k) or nibbles uint8 (R, k / 2); d the float16 bits of the
    block scales, uint16 (R, k / 32); R = n_mats * rows."""
    type: T
    rows: int
    k: int
    q: np.ndarray
    d: np.ndarray
    n_mats: int = 1

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def expert(self, e: int) -> "Int8Packed":
        s = slice(e * self.rows, (e + 1) * self.rows)
        return replace(self, q=self.q[s], d=self.d[s], n_mats=1)


def pack(*ws: QTensor, after=None) -> Int8Packed:
    """A matrix or an expert stack (every row packs alike, so a stack is its experts' packs
    one after another); several matrices are stacked into one (q|k|v, per expert for stacks:
    qtensor.stack_parts), each packed straight into its rows."""
    w = ws[0]
    if w.type not in (T.Q8_0, T.Q4_0):
        raise ValueError(f"{w.name}: int8 kernels take Q8_0 or Q4_0, not {w.type.name}")
    rows, parts = stack_parts(list(ws))
    R, k = w.n_mats * rows, w.k
    d = np.empty((R, k // 32), np.uint16)
    q = np.empty((R, k), np.int8) if w.type == T.Q8_0 else np.empty((R, k // 2), np.uint8)
    kernel, q16 = (_pack_q8_0 if w.type == T.Q8_0 else _pack_q4_0), q.view(np.uint16)
    for raw, at in parts:
        n = raw.shape[0]
        kernel(u16(raw), q16[at:at + n], d[at:at + n])
        if after is not None:  # the caller may let this part's file pages go
            after(at, n)
    return Int8Packed(w.type, rows, k, q, d, w.n_mats)


# -- the products --------------------------------------------------------------------------

# The decode products of a few rows of x (a batched decode step, serve --parallel): each
# weight row is read once for all of them. `rows_body` is the one driver; each format's kernel
# is a variant of it (variants.py) with its own `_steps` (rows, and steps of a row), `_step`
# (step j of weight row r against the x row at offsets o) and `_end` (the row's sum, stored);
# w is a format's arrays padded to five. Four x rows a pass: LLVM loads and unpacks each
# weight vector once for all four (the same loads, CSE'd). A row's arithmetic runs in the
# same order as in the lone-row kernels (_mv1_*), so a sequence's logits do not depend on the
# others in its step (tests/test_batch.py: bit for bit).

def rows_body(xq, xd, xs, kq, kd, ks, w0, w1, w2, w3, w4, out):
    # x's rows flat (xq, xd, xs 1D; row t at t * kq, t * kd, t * ks)
    w = (w0, w1, w2, w3, w4)  # a format's arrays, then repeats of its first (unused)
    x = (xq, xd, xs)
    R, m = _steps(w)
    n = out.shape[0]
    for r in prange(R):
        for t in range(0, n - 3, 4):
            o0, o1 = (t * kq, t * kd, t * ks), ((t + 1) * kq, (t + 1) * kd, (t + 1) * ks)
            o2, o3 = ((t + 2) * kq, (t + 2) * kd, (t + 2) * ks), ((t + 3) * kq, (t + 3) * kd, (t + 3) * ks)
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            for j in range(m):
                a0 = _step(a0, w, x, o0, r, j)
                a1 = _step(a1, w, x, o1, r, j)
                a2 = _step(a2, w, x, o2, r, j)
                a3 = _step(a3, w, x, o3, r, j)
            _end(a0, w, x, o0, r, t, out)
            _end(a1, w, x, o1, r, t + 1, out)
            _end(a2, w, x, o2, r, t + 2, out)
            _end(a3, w, x, o3, r, t + 3, out)
        for t in range(n // 4 * 4, n):
            o = (t * kq, t * kd, t * ks)
            acc = _vzero()
            for j in range(m):
                acc = _step(acc, w, x, o, r, j)
            _end(acc, w, x, o, r, t, out)



@njit(cache=True, inline="always")
def _groups(w):  # Q8_0 / Q4_0: (q, d, ...); a step is a group of G blocks
    return w[1].shape[0], w[1].shape[1] // G


def _group_step(acc, w, x, o, r, g):
    # group g of weight row r (_group: Q8_0's or Q4_0's; a block is 32 or 16 bytes of q)
    q, d = w[0], w[1]
    nb = d.shape[1]
    return _group(acc, q, r * q.shape[1] + g * (q.shape[1] // nb) * G, x[0], o[0] + g * 32 * G, x[2], o[2] + g * G,
                  d, r * nb + g * G, x[1], o[1] + g * G)


def _group_end(acc, w, x, o, r, t, out):
    # the row's sum, with the blocks after the last full group (_tail: a block's integer sum)
    q, d = w[0], w[1]
    nb = d.shape[1]
    s = _hsum(acc)
    for b in range(nb // G * G, nb):
        s += (_f16(d, r * nb + b) * x[1][o[1] + b]) * np.float32(_tail(q, r, b, x, o))
    out[t, r] = s


@njit(cache=True, inline="always")
def _q8_tail(q, r, b, x, o):
    return _q8_block(q, r * q.shape[1] + b * 32, x[0], o[0] + b * 32)




@njit(cache=True, inline="always")
def _q4_tail(q, r, b, x, o):
    return _q4_block(q, r * q.shape[1] + b * 16, x[0], o[0] + b * 32) - 8 * x[2][o[2] + b]


# A lone row (decode of one sequence) takes these kernels, x flat: the batched variants of
# rows_body run ~15% slower on one row (Q4_K, 3072 x 1024: 29 against 26 us; cause not yet
# found), and both run a row's arithmetic in the same order, so a row comes out the same from
# either (tests/test_batch.py checks it bit for bit).

@njit(parallel=True, cache=True)
def _mv1_q8_0(xq, xd, xs, q, d, out):
    R, k = q.shape
    nb = k // 32
    ng = nb // G
    for r in prange(R):
        acc = _vzero()
        for g in range(ng):
            acc = _q8_group(acc, q, r * k + g * 32 * G, xq, g * 32 * G, xs, g * G, d, r * nb + g * G, xd, g * G)
        s = _hsum(acc)
        for b in range(ng * G, nb):
            s += (_f16(d, r * nb + b) * xd[b]) * np.float32(_q8_block(q, r * k + b * 32, xq, b * 32))
        out[r] = s


@njit(parallel=True, cache=True)
def _mv1_q4_0(xq, xd, xs, q, d, out):
    R, kh = q.shape
    nb = kh // 16
    ng = nb // G
    for r in prange(R):
        acc = _vzero()
        for g in range(ng):
            acc = _q4_group(acc, q, r * kh + g * 16 * G, xq, g * 32 * G, xs, g * G, d, r * nb + g * G, xd, g * G)
        s = _hsum(acc)
        for b in range(ng * G, nb):
            isum = _q4_block(q, r * kh + b * 16, xq, b * 32) - 8 * xs[b]
            s += (_f16(d, r * nb + b) * xd[b]) * np.float32(isum)
        out[r] = s


@njit(parallel=True, cache=True)
def _mv1_q4_0_vnni(xq, xd, xs, q, d, out):
    # whole groups only (matvec_rows takes the generic kernel for a row with a tail)
    R, kh = q.shape
    nb = kh // 16
    for r in prange(R):
        acc = _vzero()
        for g in range(nb // G):
            acc = _q4_group_vnni(acc, q, r * kh + g * 16 * G, xq, g * 32 * G, xs, g * G, d, r * nb + g * G, xd, g * G)
        out[r] = _hsum(acc)


@njit(cache=True, inline="always")
def _no_tail(q, r, b, x, o):
    return np.int32(0)  # the VNNI and AVX2 kernels take rows of whole groups only


_INLINE = dict(cache=True, inline="always")
_q8_step = variant(_group_step, "_q8_step", {"_group": _q8_group}, **_INLINE)
_q4_step = variant(_group_step, "_q4_step", {"_group": _q4_group}, **_INLINE)
_q8_end = variant(_group_end, "_q8_end", {"_tail": _q8_tail}, **_INLINE)
_q4_end = variant(_group_end, "_q4_end", {"_tail": _q4_tail}, **_INLINE)
_PAR = dict(parallel=True, cache=True)
_mv_q8_0 = variant(rows_body, "_mv_q8_0", {"_steps": _groups, "_step": _q8_step, "_end": _q8_end}, **_PAR)
_mv_q4_0 = variant(rows_body, "_mv_q4_0", {"_steps": _groups, "_step": _q4_step, "_end": _q4_end}, **_PAR)
_q4_step_vnni = variant(_group_step, "_q4_step_vnni", {"_group": _q4_group_vnni}, **_INLINE)
_q4_end_vnni = variant(_group_end, "_q4_end_vnni", {"_tail": _no_tail}, **_INLINE)
_mv_q4_0_vnni = variant(rows_body, "_mv_q4_0_vnni", {"_steps": _groups, "_step": _q4_step_vnni, "_end": _q4_end_vnni},
                        **_PAR)


_mv1_q4_0_ub = variant(_mv1_q4_0_vnni.py_func, "_mv1_q4_0_ub", {"_q4_group_vnni": _q4_group_ub}, **_PAR)
_q4_step_ub = variant(_group_step, "_q4_step_ub", {"_group": _q4_group_ub}, **_INLINE)
_mv_q4_0_ub = variant(rows_body, "_mv_q4_0_ub", {"_steps": _groups, "_step": _q4_step_ub, "_end": _q4_end_vnni},
                      **_PAR)


def rows_args(xq, xd, xs, *arrays) -> tuple:
    """rows_body's arguments before `out`: x's rows flat with their lengths, then a format's
    arrays padded to five."""
    return (xq.reshape(-1), xd.reshape(-1), xs.reshape(-1), xq.shape[1], xd.shape[1], xs.shape[1],
            *arrays, *(arrays[0],) * (5 - len(arrays)))


def quantize_rows(x: np.ndarray, quantize=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_x (or the given quantizer) of each row of x (n, k), stacked."""
    if x.shape[0] == 1:  # a lone decode step: views, no copies (~15 us a product otherwise)
        return tuple(a[None] for a in (quantize or quantize_x)(x[0]))
    parts = [(quantize or quantize_x)(row) for row in x]
    return tuple(np.stack([p[j] for p in parts]) for j in range(3))


def check_rows(x: np.ndarray, w, out: np.ndarray | None) -> np.ndarray:
    """A decode product's arguments: x (n, k) against one matrix; out (n, rows), made if None."""
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"input of shape {x.shape}, weight expects (n, {w.k})")
    if getattr(w, "n_mats", 1) != 1:  # (a Q5 stack counts its experts' rows as its own)
        raise ValueError(f"a stack of {w.n_mats} experts: multiply one (w.expert(e)) or use int8_experts_cpu")
    return np.empty((x.shape[0], w.rows), np.float32) if out is None else out


_vnni_available = None


def use_vnni() -> bool:
    """Whether the decode kernels take vpdpbusd here (int8_tiles_cpu.vnni_available; asked at
    every product, so its import is bound once: it was half of the ~3 us a call)."""
    global _vnni_available
    if _vnni_available is None:
        from .int8_tiles_cpu import vnni_available  # (it imports this module)

        _vnni_available = vnni_available
    return _vnni_available()


_avx2_available = None


def decode_isa(vnni: bool | None = None, avx2: bool | None = None) -> str | None:
    """Which decode step a product takes: "vnni" (vpdpbusd), "avx2" (vpmaddubsw, x86 without
    VNNI) or None (generic IR); each of vnni / avx2 None asks the CPU (int8_tiles_cpu)."""
    global _avx2_available
    if use_vnni() if vnni is None else vnni:
        return "vnni"
    if avx2 is None:
        if _avx2_available is None:
            from .int8_tiles_cpu import avx2_available

            _avx2_available = avx2_available
        avx2 = _avx2_available()
    return "avx2" if avx2 else None


def matvec_rows(x: np.ndarray, w: Int8Packed, out: np.ndarray | None = None, vnni: bool | None = None,
                avx2: bool | None = None) -> np.ndarray:
    """x (n, k) float32 @ W.T -> (n, rows) float32 for a few rows (decode), each quantized to 8
    bits first and each computed exactly as alone. Q4_0 rows of whole groups take vpdpbusd
    where the CPU has AVX512-VNNI (vnni: None asks the CPU), else vpmaddubsw where it has AVX2
    (avx2: None asks), the same result bit for bit."""
    out = check_rows(x, w, out)
    isa = decode_isa(vnni, avx2) if w.type == T.Q4_0 and w.k % (32 * G) == 0 else None
    if isa is not None:
        quad = isa == "vnni"
        xq, xd, xs = quantize_rows(x, _quantize_quad if quad else _quantize_pairs8)
        if x.shape[0] == 1:
            (_mv1_q4_0_vnni if quad else _mv1_q4_0_ub)(xq[0], xd[0], xs[0], w.q, w.d, out[0])
        else:
            (_mv_q4_0_vnni if quad else _mv_q4_0_ub)(*rows_args(xq, xd, xs, w.q, w.d), out)
        return out
    xq, xd, xs = quantize_rows(x)
    if x.shape[0] == 1:
        (_mv1_q8_0 if w.type == T.Q8_0 else _mv1_q4_0)(xq[0], xd[0], xs[0], w.q, w.d, out[0])
    else:
        (_mv_q8_0 if w.type == T.Q8_0 else _mv_q4_0)(*rows_args(xq, xd, xs, w.q, w.d), out)
    return out


def matvec(x: np.ndarray, w, out: np.ndarray | None = None, rows=None) -> np.ndarray:
    """x (k,) float32 @ W.T -> (rows,) float32: matvec_rows (of this module, or `rows`) of one row."""
    if x.shape != (w.k,):
        raise ValueError(f"input of shape {x.shape}, weight expects ({w.k},)")
    out = np.empty(w.rows, np.float32) if out is None else out
    (rows or matvec_rows)(x[None], w, out[None])
    return out
