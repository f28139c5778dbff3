"""KV cache rows kept as float32, IEEE half or ggml Q8_0, written and read inside numba kernels.

A cache is an array of rows (..., D) plus, for Q8_0, one scale per 32 values (..., D // 32).
The element type says the format: float32 rows are f32, uint16 rows are f16 (numba has no
float16 on the CPU: the bits are converted here, exactly, for all 65536 values), int8 rows are
Q8_0 quants with float16 scales, ggml's block byte for byte (tests/test_kv_cache.py checks both
against numpy).

`kv_store`, `kv_load`, `kv_dot` and `kv_axpy` are one name per operation whose body numba picks
from the cache's element type, so attention (attention_cpu.py) is written once for every format.
The half-to-float conversion is integer and float arithmetic without a table or branch, so the
dot products over a row still vectorise. Per 128-value row in L1, one core (AVX-512), dot /
axpy: f32 4 / 10 ns, f16 8 / 13 ns, q8_0 15 / 39 ns: q8_0's per-block scales keep LLVM from the
simple loops (unrolled blocks get vectorised across blocks, with gathers). Writes are one row
per token per head and need not be fast.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
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


@njit(cache=True)
def quantize_q8_0(x, q, d):
    """ggml's quantize_row_q8_0_ref: per 32 values d = amax / 127, q = roundf(x / d) (half away
    from zero, through the float32 reciprocal as ggml), d kept as half. A block holding NaN or
    inf gets a NaN scale, so that the damage reaches the logits as it would in f32."""
    for b in range(x.shape[0] // QK):
        amax = np.float32(0.0)
        finite = True
        for j in range(b * QK, (b + 1) * QK):
            a = abs(x[j])
            finite &= a <= np.float32(3.4028234663852886e38)
            amax = max(amax, a)
        if not finite:
            d[b] = np.uint16(0x7E00)
            for j in range(b * QK, (b + 1) * QK):
                q[j] = 0
            continue
        dd = amax / np.float32(127.0)
        inv = np.float32(1.0) / dd if dd != np.float32(0.0) else np.float32(0.0)
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
    if c.dtype == types.int8:
        def q8_0(x, c, s, li, h, t):
            # one loop over the row, the block's scale fetched per value: per-block sums let
            # LLVM unroll the 32 and vectorise across blocks with gathers, 2-4x slower
            a = np.float32(0.0)
            for d in range(x.shape[0]):
                a += x[d] * np.float32(c[li, h, t, d]) * f16_to_f32(s[li, h, t, d >> 5])
            return a
        return q8_0
    return None


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
    if c.dtype == types.int8:
        def q8_0(acc, w, c, s, li, h, t):
            for b in range(acc.shape[0] // QK):
                wb = w * f16_to_f32(s[li, h, t, b])
                for j in range(QK):
                    acc[b * QK + j] += wb * np.float32(c[li, h, t, b * QK + j])
        return q8_0
    return None


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
            for d in range(out.shape[0]):
                out[d] = np.float32(c[li, h, t, d]) * f16_to_f32(s[li, h, t, d >> 5])
        return q8_0
    return None


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
