"""Prefill: the many-rows product over int8_cpu's / int8_k_cpu's / int8_q5_cpu's layouts (Q8_0,
Q4_0, Q4_K, Q6_K, Q5_K, Q5_0). The register tiles are int8_tiles_cpu's; exact dequantization
(embedding rows, fallbacks) is int8_dequant_cpu's (Q5: int8_q5_cpu's).

`matmul` quantizes all n rows of x once, each exactly as the decode kernels quantize their one
(the decode modules' own quantizers: ggml's Q8_0 per 32 for Q8_0 / Q4_0 / Q5_0, Q8_K per 256
for Q4_K / Q5_K / Q6_K), then multiplies integers in register tiles of RW = 2 weight rows x
nx rows of x (NX = 4; NXV = 6 for the VNNI tiles). Tasks (prange) are RT = 32 weight rows,
which stay in L2 while every x tile passes; at the end of a group / super-block the exact
int32 lane sums are scaled into RW x nx <16 x float> accumulators (Q4_0 / Q5_0 / Q6_K start
the integer sums at -8 / -16 / -32 times x's quant sums; Q4_K / Q5_K take off the float
minimums; K types' lane scales d * sc and dmin * m are computed once per task: 3-4 vector
instructions per tile entry), and each output is one horizontal sum. Entries do not depend
on the thread count or the path; Q8_0 / Q4_0 / Q5_0 equal the decode kernels bit for bit
when k is a multiple of 512.

Q8_0 / Q4_0 / Q5_0 blocks after a row's last full group of 16 (k / 32 not a multiple of 16:
8 of the 24 blocks of the MoE down projection's k = 768) stay in the file's order in the
packs (their size is the file's). Each task moves its rows' into one more group of its own
(`_tail_*`: zero past the last block, scales too) and x is quantized into whole groups (zero
blocks after k), so the tiles run them as any group and each padding lane adds exactly 0. A
scalar loop per tile entry summed them before: at k = 768 it took ~8x the vector groups'
time (the grouped Q4_0 down projection of a 30B-A3B layer: 311 -> 37 ms CPU at 128 tokens,
1056 -> 88 at 512). The decode kernels keep their per-block tail (vpmaddwd and a horizontal
sum each), so with tails the two round apart.

- Q8_0: x int16 in the decode lane order; each weight pair step (16 lanes = 16 blocks, two
  elements each) is widened once (vpmovsxbw) for 4 rows of x, each x step loaded once for 2
  weight rows: 8 vpdpwssd a step.
- Q4_0 / Q4_K / Q6_K / Q5_K / Q5_0: each task first unpacks its weight rows to a byte a weight
  (0..15 / 0..63 / 0..31, the Q5 nibbles or'ed with their fifth bits; L2-resident, reused by all
  x tiles) and x is quantized to int8 in the same order: 64-byte units holding two pair
  steps woven (byte 4t + 2h + e: lane t, step h, element e), so a lane's 4 bytes of a unit are
  4 products of that lane. Q4_K / Q5_K rows and x are then rewoven in pairs of super-blocks
  (int8_tiles_cpu._unit_pair), a lane per sub-block of 32: a lane's sum has one scale and one
  minimum, so a tile scales two super-blocks with one set of float instructions (4 per tile
  entry and pair, where each super-block took 4); an odd count's last super-block runs alone in
  a 4-unit tile (q4_k1, lanes rewoven by int8_tiles_cpu._tail_units). Two paths
  (int8_tiles_cpu._units_loop):
  - VNNI (where numba's target CPU has AVX512-VNNI: int8_tiles_cpu.vnni_available, off with
    QWEN3CLI_NO_VNNI=1 or matmul(vnni=False)): one vpdpbusd (u8 x s8, 64 MACs, 4 products
    summed into each i32 lane) per unit and tile entry, in 2 x 6 tiles (12 i32 + 12 float
    accumulators).
  - generic IR, any CPU: vpmaddubsw (u8 x s8, 64 MACs) into i16 sums, exact below 2^15 over a
    window (Q4_0: a group's 8 units, 8 x 2 x 15 x 127 = 30480; Q5: 4 units, 4 x 2 x 31 x 127
    = 31496, so Q4_K / Q5_K share a tile, a pair's 8 units in two windows, and Q5_0 is Q4_0's
    in two windows; Q6_K: 2 units, 2 x 2 x 63 x 127 = 32004), widened by one vpdpwssd against
    ones, in 2 x 4 tiles (at 2 x 6 they spill). vpmaddubsw comes from generic IR (even / odd
    products, clamp to i16) only if both operands reach the backend as loads: computed in the
    loop (nibble split), InstCombine knows the weights are < 16, drops the clamp and multiplies
    in i16 (vpmullw, 2.5x the instructions), and folds any shuffle into the even / odd split.

Both loops run a group / super-block as a small IR loop: unrolled by hand, LLVM's scheduler
hoisted every x load of the group and spilled (1.5-1.7x slower); LLVM itself unrolls the
VNNI one. The VNNI tiles call llvm.x86.avx512.vpdpbusd.512 and are compiled only where the
check passes; everything else is generic IR that any CPU LLVM targets compiles.

Hot loops on Zen 5 (znver5; `python scripts/bench_int8_gemm.py --asm [--vnni]`). Generic, per
iteration of a 2 x 4 tile: Q8_0 31 instructions (16 vpdpwssd, 4 vpmovsxbw, 8 loads: 512 MACs);
Q4_0 25 (8 vpmaddubsw, 8 vpaddw, 6 loads: 512 MACs); Q6_K 49 (16 vpmaddubsw, 8 vpaddw, 8
vpdpwssd, 12 loads); Q5_0 / Q4_K / Q5_K 93 (32 vpmaddubsw, 24 vpaddw, 8 vpdpwssd, 24 loads).
VNNI, a whole 2 x 6 group / super-block (pair) with its scaling: Q4_K / Q5_K 264 a pair (96
vpdpbusd, 64 + 16 loads, 12 each of vcvtdq2ps, vmulps, vfnmadd, vfmadd, 20 movq: 6144
MACs; 184 a single super-block before the pairs, with the same 48 float instructions); Q6_K
163 (48 vpdpbusd, 38 loads, 12 each of vcvtdq2ps, vmulps, vfmadd: 3072 MACs); Q4_0 / Q5_0 238
(96 vpdpbusd, 70 loads, 12 each of vcvtdq2ps, vmulps, vfmadd: 6144 MACs).

Measured, one core, thread CPU time, alternating main and this code in one minute on a shared
host (load 12; /tmp scripts, summed time over 6144 x 1024 and 1024 x 3072 at n = 128 and 512):
Q4_0 ~370 -> ~445 GOPS, Q5_0 ~340 -> ~415, Q4_K ~300 -> ~340-380, Q5_K ~300 -> ~340-350,
Q6_K ~315 -> ~370-395, Q8_0 even (~270); `bench_int8_gemm.py --vnni` (generic against VNNI)
gave 1.05-1.19x before the 2 x 6 tiles. vpdpbusd alone runs at 8.6 G/s on this core (12
independent chains: 2 a cycle, 1100 GOPS), so the K tiles are at ~35% of it: the float
scaling, 48 of 163-184 instructions per super-block tile, is the larger cost (taken out, Q4_K
ran 1.4x faster). The pairs of super-blocks halved it for Q4_K / Q5_K: 1.15x / 1.15x over
the single super-block tiles (`bench_int8_gemm.py --formats q4_k q5_k --threads 1 --n 128
512`, both commits alternating 3 times, fastest of each, summed over the 4 shapes: 52.6 ->
45.6 ms, 55.0 -> 48.0 ms; per shape 1.03-1.36x). The unpack (`_unit`, vectors) takes 0.1 ms
for 6144 x 1024 on one core.
Two threads split the row tiles (timed by wall clock, which on this shared machine swung
0.3-12x between calls: not quoted).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from . import int8_cpu
from .int8_cpu import G, Int8Packed
from .int8_k_cpu import KPacked
from .int8_q5_cpu import Q5Packed, _even_bits
from .int8_tiles_cpu import (GENERIC, RT, RW, VNNI, _hsums, _lanes_q4_k, _lanes_q6_k, _nx, _t_q4_0,
                             _t_q4_k, _t_q4_k1, _t_q5_0, _t_q6_k, _t_q8_0, _tail_units, _unit4, _unit5, _unit6,
                             _unit_pair4, _unit_pair5, _zeros, tile_rows, vnni_available)
from .variants import variant

# -- the activation: all rows quantized once, as the decode kernels quantize one -------------

@njit(cache=True, inline="always")
def _to_units(src, dst, span, half):
    # decode order (pair step s at 32 s, byte 2t + e) -> _units_loop's: unit c of a span holds
    # steps c and c + half woven, step h's pair of lane t at 4t + 2h
    s16, d16 = src.view(np.int16), dst.view(np.int16)  # an element pair at a time
    for o in range(0, src.shape[0] // 2, span // 2):
        for c in range(half):
            for t in range(G):
                d16[o + 32 * c + 2 * t] = s16[o + 16 * c + t]
                d16[o + 32 * c + 2 * t + 1] = s16[o + 16 * (c + half) + t]


@njit(parallel=True, cache=True)
def _quantize_q8_0_rows(x, xq, xd, xs, units):
    # xq's rows are whole groups (kp = xq.shape[1]): the blocks after the last full group fill
    # a last group whose missing blocks stay zero (xq, xd, xs come zeroed), so the tiles run it
    # as any other group
    kp = xq.shape[1]
    for i in prange(x.shape[0]):
        if not units:
            int8_cpu._quantize_x(x[i], xq[i], xd[i], xs[i], kp // (32 * G))
        else:
            tmp = np.zeros(kp, np.int8)
            int8_cpu._quantize_x(x[i], tmp, xd[i], xs[i], kp // (32 * G))
            _to_units(tmp, xq[i], 32 * G, 8)


_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: v + it - it is v rounded half to even, |v| < 2^22


@njit(cache=True, inline="always")
def _q8_k_natural(x, qn, d, s):
    # x (k,) -> ggml's Q8_K in k's own order: quants qn (int8), scale per 256 (d), sums per 16
    # (s); bit for bit int8_k_cpu._quantize_x's (decode's), in passes LLVM vectorizes: the
    # largest magnitude as an integer maximum over the bits without sign (a NaN or inf is
    # above the largest finite float's bits, so one maximum also finds them), then the first
    # value of that magnitude (ggml's signed maximum), then the rounding as ggml's nearest_int
    # (the magic-number add, where np.rint is a libm call per value). Decode's one loop, which
    # tracks the maximum by branches and scatters each quant to its order, ran 2.5x longer
    xb = x.view(np.int32)
    for b in range(x.shape[0] // 256):
        o = b * 256
        m = 0
        for j in range(o, o + 256):
            m = max(m, xb[j] & 0x7FFFFFFF)
        finite = m <= 0x7F7FFFFF
        mx = np.float32(0.0)
        if finite and m != 0:
            for j in range(o, o + 256):
                if xb[j] & 0x7FFFFFFF == m:
                    mx = x[j]
                    break
        iscale = np.float32(np.float32(-127.0) / mx) if mx != 0 else np.float32(0.0)
        for j in range(o, o + 256):  # the clamp only bites where iscale overflowed (subnormal mx)
            v = min(max(np.float32(iscale * x[j]), np.float32(-127.0)), np.float32(127.0))
            qn[j] = np.int32(np.float32(v + _MAGIC) - _MAGIC) if finite else 0
        for t in range(16):
            acc = 0
            for j in range(o + 16 * t, o + 16 * t + 16):
                acc += qn[j]
            s[16 * b + t] = acc
        d[b] = np.float32(np.float32(1.0) / iscale) if mx != 0 else np.float32(0.0)
        if not finite:  # quants 0, scale NaN: a broken activation stays visible downstream
            d[b] = np.float32(np.nan)


@njit(parallel=True, cache=True)
def _quantize_q8_k_rows(x, xq, xd, xs):
    # Q6_K: x's Q8_K rows in _units_loop's order (unit c of a super-block: lane t's element
    # pairs c and c + 4, i.e. values 16t + 2c.. and 16t + 2c + 8..)
    k = x.shape[1]
    for i in prange(x.shape[0]):
        qn = np.empty(k, np.int8)
        _q8_k_natural(x[i], qn, xd[i], xs[i])
        n16, u16 = qn.view(np.int16), xq[i].view(np.int16)
        for o in range(0, k // 2, 128):
            for c in range(4):
                for t in range(G):
                    u16[o + 32 * c + 2 * t] = n16[o + 8 * t + c]
                    u16[o + 32 * c + 2 * t + 1] = n16[o + 8 * t + c + 4]


@njit(parallel=True, cache=True)
def _quantize_q8_k_pairs(x, xq, xd, xs):
    # Q4_K / Q5_K: x's Q8_K rows in the tiles' pair order (int8_tiles_cpu._unit_pair: unit u,
    # lane L of a pair holds, of super-block L // 8, lane 2 (L % 8) + u // 4's pairs c and c + 4,
    # c = u % 4), an odd count's last super-block in the tail order (_tail_units: unit c, lane
    # L holds lane 2 (L % 8) + L // 8's), its scale per lane (each super-block's 8 times; the
    # tail's 16) and its quant sums per lane (a pair's per sub-block of 32: two of Q8_K's sums
    # per 16; the tail's per 16)
    k = x.shape[1]
    nsb = k // 256
    full = nsb - nsb % 2
    for i in prange(x.shape[0]):
        qn, d, s16 = np.empty(k, np.int8), np.empty(nsb, np.float32), np.empty(k // 16, np.int32)
        _q8_k_natural(x[i], qn, d, s16)
        n16, p16 = qn.view(np.int16), xq[i].view(np.int16)
        for b in range(full):
            for j in range(8):
                lane = j + 8 * (b % 2)
                for u in range(8):
                    src = b * 128 + 8 * (2 * j + u // 4) + u % 4
                    dst = (b // 2) * 256 + 32 * u + 2 * lane
                    p16[dst] = n16[src]
                    p16[dst + 1] = n16[src + 4]
                xd[i, 8 * b + j] = d[b]
                xs[i, 8 * b + j] = s16[16 * b + 2 * j] + s16[16 * b + 2 * j + 1]
        if full < nsb:
            b = full
            for lane in range(16):
                t = 2 * (lane % 8) + lane // 8
                for c in range(4):
                    p16[b * 128 + 32 * c + 2 * lane] = n16[b * 128 + 8 * t + c]
                    p16[b * 128 + 32 * c + 2 * lane + 1] = n16[b * 128 + 8 * t + c + 4]
                xd[i, 8 * b + lane] = d[b]
                xs[i, 8 * b + lane] = s16[16 * b + t]


def quantize_rows(x: np.ndarray, w: Int8Packed | KPacked | Q5Packed,
                  nx: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, k) -> (quants (npad, kp), scales, quant sums), npad = n rounded up to nx (a tile's x
    rows) with zero rows, each row exactly as the decode modules' quantize_x rounds it: for Q8_0 /
    Q4_0 / Q5_0 weights ggml's Q8_0 (scale and sum per 32), k padded to whole groups of 16
    blocks (kp; the padding blocks' quants, scales and sums zero), for Q4_K / Q5_K / Q6_K
    ggml's Q8_K (scale per 256, kp = k; Q6_K: sums per 16; Q4_K / Q5_K: scales and sums per
    lane, 8 a super-block: per 32 in pairs of super-blocks, an odd count's last per 16 over 16
    lanes). Q8_0: int16 in the decode kernels' order; the others int8 in _units_loop's (Q4_K /
    Q5_K: rewoven in pairs and the tail, int8_tiles_cpu._unit_pair / _tail_units)."""
    n, k = x.shape
    npad = -(-n // nx) * nx
    units = w.type != T.Q8_0
    if w.type in (T.Q8_0, T.Q4_0, T.Q5_0):
        nbp = -(-k // (32 * G)) * G
        xq = np.zeros((npad, 32 * nbp), np.int8 if units else np.int16)
        xd, xs = np.zeros((npad, nbp), np.float32), np.zeros((npad, nbp), np.int32)
        _quantize_q8_0_rows(x, xq, xd, xs, units)
    elif w.type in (T.Q4_K, T.Q5_K):
        nl = -(-k // 512) * 16  # lanes: 8 a super-block, 16 for an odd count's last
        xq = np.zeros((npad, k), np.int8)
        xd, xs = np.zeros((npad, nl), np.float32), np.zeros((npad, nl), np.int32)
        _quantize_q8_k_pairs(x, xq, xd, xs)
    else:
        xq = np.zeros((npad, k), np.int8)
        xd, xs = np.zeros((npad, k // 256), np.float32), np.zeros((npad, k // 16), np.int32)
        _quantize_q8_k_rows(x, xq, xd, xs)
    return xq, xd, xs


def _prepared_sums(xs: np.ndarray, t: T) -> np.ndarray:
    """x's quant sums as the tiles take them: minus the unsigned quants' offset (Q4_0: 8, Q5_0:
    16, Q6_K: 32) times them (where the integer sums start), or (Q4_K / Q5_K, against float
    minimums) as float32 (exact: |sum| < 2^24)."""
    if t in (T.Q4_K, T.Q5_K):
        return xs.astype(np.float32)
    offset = {T.Q4_0: 8, T.Q5_0: 16, T.Q6_K: 32}.get(t)
    return xs if offset is None else xs * np.int32(-offset)


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
def _unpack_k_pairs(q, h, r0, r1, ws, nsb):
    # Q4_K (h None) / Q5_K rows r0..r1 in the tiles' order: each pair of super-blocks rewoven
    # as it is unpacked (_unit_pair4 / _unit_pair5), an odd count's last super-block as
    # _unpack / _unpack_q5 write one, then rewoven (_tail_units)
    k = nsb * 256
    for r in range(r0, r1):
        dst, src = (r - r0) * k, r * q.shape[1]
        for b in range(0, nsb - nsb % 2, 2):
            for c in range(4):
                if h is None:
                    _unit_pair4(q, src + b * 128 + 32 * c, src + b * 128 + 128 + 32 * c, q, 0, 0, c, ws,
                                dst + b * 256)
                else:
                    hs = r * h.shape[1] + b * 32
                    _unit_pair5(q, src + b * 128 + 32 * c, src + b * 128 + 128 + 32 * c, h, hs, hs + 32, c, ws,
                                dst + b * 256)
        if nsb % 2:
            b = nsb - 1
            for c in range(4):
                if h is None:
                    _unit4(q, src + b * 128 + 32 * c, q, 0, 0, 0, 0, ws, dst + b * 256 + 64 * c)
                else:
                    hs = r * h.shape[1] + b * 32
                    _unit5(q, src + b * 128 + 32 * c, h, hs, hs, c, c + 4, ws, dst + b * 256 + 64 * c)
            _tail_units(ws, dst + b * 256)


@njit(cache=True, inline="always")
def _unpack_q5(q, h, r0, r1, ws, k, span, hi_off, hi_bit):
    # Q5Packed (int8_q5_cpu) as _unpack, each nibble or'ed with its fifth bit (bit 4: 0..31).
    # Bit p of a lane's pair of fifth-bit bytes: step p. Step c (the low nibbles) is at bit c of
    # the group's first 32 bytes; step c + half (the high ones) at bit c + 4 of the same bytes
    # for Q5_K (hi_off, hi_bit = 0, 4: as _unpack_k_pairs calls _unit5), at bit c of the next
    # 32 for Q5_0 (32, 0)
    for r in range(r0, r1):
        for g in range(k // span):
            src, hsrc, dst = r * q.shape[1] + g * span // 2, r * h.shape[1] + g * span // 8, (r - r0) * k + g * span
            for c in range(span // 64):
                _unit5(q, src + 32 * c, h, hsrc, hsrc + hi_off, c, c + hi_bit, ws, dst + 64 * c)


# The blocks after a row's last full group (nb % 16 of them: 8 in the MoE down projection's
# k = 768) are stored in the file's order (int8_cpu's, int8_q5_cpu's pack). Each task moves
# them into one more group of its own, in the full groups' order and zero past the last
# block, with its scales (zero there too: x's padding blocks are zero, so the missing lanes
# add 0), and the tiles run it as any group: the scalar loop that summed them took 6x the
# time of the vector groups at k = 768. Per task and row: 16 bytes a Q4_0 block moved as
# bytes, then 8 vector units (_unit4 / _unit5).

@njit(cache=True, inline="always")
def _tail_q8_0(q, d, r0, r1, wt, dt):
    # wt: a group (512 bytes) per row, pair step p of block t at 32 p + 2 t (int8_cpu's order)
    nb = d.shape[1]
    ng = nb // G
    for r in range(r0, r1):
        o = (r - r0) * 32 * G
        for t in range(nb - ng * G):
            b = ng * G + t
            dt[(r - r0) * G + t] = d[r, b]
            for p in range(16):
                wt[o + 32 * p + 2 * t] = q[r, 32 * b + 2 * p]
                wt[o + 32 * p + 2 * t + 1] = q[r, 32 * b + 2 * p + 1]


@njit(cache=True, inline="always")
def _tail_block(q, d, r, r0, b, t, dt, tmp):
    # tail block b of row r as the t-th block of the padded group: its scale, and its 16
    # bytes of 4-bit quants in the pack's order (chunk c: file bytes 2c, 2c + 1 at 32 c + 2 t);
    # Q4_0 and Q5_0 hold their low four bits alike
    dt[(r - r0) * G + t] = d[r, b]
    for c in range(8):
        tmp[32 * c + 2 * t] = q[r, 16 * b + 2 * c]
        tmp[32 * c + 2 * t + 1] = q[r, 16 * b + 2 * c + 1]


@njit(cache=True, inline="always")
def _tail_q4_0(q, h, d, r0, r1, wt, dt, tmp, tmph):
    # tmp (256 bytes): the group in the pack's order (chunk c: file bytes 2c, 2c + 1 of block t
    # at 32 c + 2 t), then wt: its 8 units as _unpack writes them, 512 bytes a row; h and tmph
    # (_tail_q5_0's fifth bits) unused
    nb = d.shape[1]
    ng = nb // G
    for r in range(r0, r1):
        for t in range(nb - ng * G):
            _tail_block(q, d, r, r0, ng * G + t, t, dt, tmp)
        for c in range(8):
            _unit4(tmp, 32 * c, tmp, 0, 0, 0, 0, wt, (r - r0) * 32 * G + 64 * c)


@njit(cache=True, inline="always")
def _tail_q5_0(q, h, d, r0, r1, wt, dt, tmp, tmph):
    # as _tail_q4_0, with the fifth bits: the file's qh pair u of block t (bit j: element
    # 16u + j) as the pack stores it (tmph, int8_q5_cpu._pack_q5_0: step 8u + s at bit s of
    # bytes 32u + 2t + e)
    nb = d.shape[1]
    ng = nb // G
    for r in range(r0, r1):
        for t in range(nb - ng * G):
            b = ng * G + t
            _tail_block(q, d, r, r0, b, t, dt, tmp)
            for u in range(2):
                v = np.int32(h[r, 4 * b + 2 * u]) | (np.int32(h[r, 4 * b + 2 * u + 1]) << 8)
                tmph[32 * u + 2 * t] = _even_bits(v)
                tmph[32 * u + 2 * t + 1] = _even_bits(v >> 1)
        for c in range(8):
            _unit5(tmp, 32 * c, tmph, 0, 32, c, c, wt, (r - r0) * 32 * G + 64 * c)


@njit(cache=True, inline="always")
def _unpack_q4_0(q, h, r0, r1, ws, k):
    _unpack(q, r0, r1, ws, k, 32 * G, False)


@njit(cache=True, inline="always")
def _unpack_q5_0(q, h, r0, r1, ws, k):
    _unpack_q5(q, h, r0, r1, ws, k, 32 * G, 32, 0)


# what the Q4_0 and Q5_0 kernels (here and int8_moe_gemm_cpu's) call by these names: their
# bodies are one (variants.py)
Q4_0_CALLEES = {"_tile": _t_q4_0, "_unpack_rows": _unpack_q4_0, "_tail_rows": _tail_q4_0}
Q5_0_CALLEES = {"_tile": _t_q5_0, "_unpack_rows": _unpack_q5_0, "_tail_rows": _tail_q5_0}
_tile = _unpack_rows = _tail_rows = None  # only a variant's own globals bind them


@njit(cache=True, inline="always")
def _lane_scales(s, d, dmin, r0, r1, sv, mv, q6):
    # rows r0..r1's lane scales per super-block as the K tiles multiply them (int8_tiles_cpu's
    # _lanes), once per task rather than per tile (a tile row's scale vector took ~12
    # instructions per super-block): the same float32 products, so bit for bit the same.
    # Q6_K: 16 a super-block; Q4_K / Q5_K: 8, in pairs (an odd count's last: 16, the 8 twice)
    nsb = d.shape[1]
    nsbp = nsb + nsb % 2
    for r in range(r0, r1):
        for b in range(nsb):
            if q6:
                _lanes_q6_k(s, (r * nsb + b) * 16, d, dmin, r * nsb + b, sv, mv, ((r - r0) * nsb + b) * 16)
            else:
                _lanes_q4_k(s, (r * nsb + b) * 16, d, dmin, r * nsb + b, sv, mv, ((r - r0) * nsbp + b) * 8)
        if not q6 and nsb % 2:  # the tail's 16 lanes: its sub-blocks' scales twice (_tail_units)
            b = nsb - 1
            _lanes_q4_k(s, (r * nsb + b) * 16, d, dmin, r * nsb + b, sv, mv, ((r - r0) * nsbp + b) * 8 + 8)


# -- the products ------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _store(acc, sums, out, r, r1, i, n, nx):
    # the tile's RW x nx sums (through `sums`, 16 floats) into out's rows i.., columns r, r1
    _hsums(acc, sums)
    for a in range(RW):
        rr = r if a == 0 else r1
        if a == 0 or r1 != r:
            for b in range(nx):
                if i + b < n:
                    out[i + b, rr] = sums[a * nx + b]


@njit(parallel=True, cache=True, nogil=True)
def _mm_q8_0(xq, xd, xs, q, d, out):
    # xq: int16 in the decode order, whole groups (kp); the tail group from the task's wt / dt
    isa = GENERIC  # int16 x: vpdpwssd either way
    n, (R, k) = out.shape[0], q.shape
    nb, kp = k // 32, xq.shape[1]
    ng, nbp = nb // G, kp // 32
    for tile in prange(-(-R // RT)):
        nx = _nx(isa)  # here, not above: a constant inside the parallel body, not its argument
        sums = np.empty(G, np.float32)  # _hsums stores 16
        r0, rt = tile * RT, min(R, tile * RT + RT)
        wt, dt = np.zeros(RT * 32 * G, np.int8), np.zeros(RT * G, np.uint16)
        if ng < nbp // G:
            _tail_q8_0(q, d, r0, rt, wt, dt)
        for i in range(0, xq.shape[0], nx):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros(isa)
                for g in range(ng):
                    acc = _t_q8_0(acc, q, r * k + g * 32 * G, (r1 - r) * k, d, d, r * nb + g * G, (r1 - r) * nb,
                                  xq, i * kp + g * 32 * G, kp, xs, 0, 0, xd, i * nbp + g * G, nbp, isa)
                if ng < nbp // G:
                    acc = _t_q8_0(acc, wt, (r - r0) * 32 * G, (r1 - r) * 32 * G, dt, dt, (r - r0) * G, (r1 - r) * G,
                                  xq, i * kp + ng * 32 * G, kp, xs, 0, 0, xd, i * nbp + ng * G, nbp, isa)
                _store(acc, sums, out, r, r1, i, n, nx)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q4_k(xq, xd, xs, q, h, s, d, dmin, out, isa):
    # Q4_K (h None) or Q5_K (h: the fifth bits): the same tile once unpacked, quants 0..15 or
    # 0..31. xq: int8 in _units_loop's order, xs: the quant sums per 16 as float
    n, (R, nsb) = out.shape[0], d.shape
    k, nl = nsb * 256, xs.shape[1]  # nl: lanes a row, 8 a super-block (16 for an odd count's last)
    for tile in prange(-(-R // RT)):
        nx = _nx(isa)  # here, not above: a constant inside the parallel body, not its argument
        sums = np.empty(G, np.float32)  # _hsums stores 16
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack_k_pairs(q, h, r0, rt, ws, nsb)
        sv, mv = np.empty(RT * nl, np.float32), np.empty(RT * nl, np.float32)
        _lane_scales(s, d, dmin, r0, rt, sv, mv, False)
        for i in range(0, xq.shape[0], nx):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros(isa)
                for p in range(nsb // 2):
                    acc = _t_q4_k(acc, ws, (r - r0) * k + p * 512, (r1 - r) * k, sv, mv, (r - r0) * nl + p * 16,
                                  (r1 - r) * nl, xq, i * k + p * 512, k, xs, i * nl + p * 16, nl, xd,
                                  i * nl + p * 16, nl, isa)
                if nsb % 2:
                    o = (nsb - 1) * 256
                    acc = _t_q4_k1(acc, ws, (r - r0) * k + o, (r1 - r) * k, sv, mv, (r - r0) * nl + o // 32,
                                   (r1 - r) * nl, xq, i * k + o, k, xs, i * nl + o // 32, nl, xd, i * nl + o // 32,
                                   nl, isa)
                _store(acc, sums, out, r, r1, i, n, nx)


def _mm_nibbles(xq, xd, xs, q, h, d, out, isa):
    # Q4_0 (h None) and Q5_0 (h: the fifth bits): _mm_q4_0 / _mm_q5_0 are this body with their
    # own _tile / _unpack_rows / _tail_rows (variants.py). xq: int8 in _units_loop's order, whole
    # groups (kp); xs: -8 / -16 x the quant sums
    n, (R, kh) = out.shape[0], q.shape
    k, nb, kp = 2 * kh, kh // 16, xq.shape[1]
    ng, nbp = nb // G, kp // 32
    for tile in prange(-(-R // RT)):
        nx = _nx(isa)  # here, not above: a constant inside the parallel body, not its argument
        sums = np.empty(G, np.float32)  # _hsums stores 16
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack_rows(q, h, r0, rt, ws, k)
        wt, dt = np.zeros(RT * 32 * G, np.uint8), np.zeros(RT * G, np.uint16)
        if ng < nbp // G:
            _tail_rows(q, h, d, r0, rt, wt, dt, np.zeros(16 * G, np.uint8), np.zeros(4 * G, np.uint8))
        for i in range(0, xq.shape[0], nx):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros(isa)
                for g in range(ng):
                    acc = _tile(acc, ws, (r - r0) * k + g * 32 * G, (r1 - r) * k, d, d, r * nb + g * G,
                                (r1 - r) * nb, xq, i * kp + g * 32 * G, kp, xs, i * nbp + g * G, nbp, xd,
                                i * nbp + g * G, nbp, isa)
                if ng < nbp // G:
                    acc = _tile(acc, wt, (r - r0) * 32 * G, (r1 - r) * 32 * G, dt, dt, (r - r0) * G, (r1 - r) * G,
                                xq, i * kp + ng * 32 * G, kp, xs, i * nbp + ng * G, nbp, xd, i * nbp + ng * G, nbp,
                                isa)
                _store(acc, sums, out, r, r1, i, n, nx)


_KERNEL = {"parallel": True, "cache": True, "nogil": True}
_mm_q4_0 = variant(_mm_nibbles, "_mm_q4_0", Q4_0_CALLEES, **_KERNEL)
_mm_q5_0 = variant(_mm_nibbles, "_mm_q5_0", Q5_0_CALLEES, **_KERNEL)


@njit(parallel=True, cache=True, nogil=True)
def _mm_q6_k(xq, xd, xs, q, s, d, out, isa):
    # xq: int8 in _units_loop's order, xs: -32 x the quant sums per 16
    n, (R, nsb) = out.shape[0], d.shape
    k = nsb * 256
    for tile in prange(-(-R // RT)):
        nx = _nx(isa)  # here, not above: a constant inside the parallel body, not its argument
        sums = np.empty(G, np.float32)  # _hsums stores 16
        r0, rt = tile * RT, min(R, tile * RT + RT)
        ws = np.empty(RT * k, np.uint8)
        _unpack(q, r0, rt, ws, k, 256, True)
        sv = np.empty(RT * nsb * 16, np.float32)
        _lane_scales(s, d, d, r0, rt, sv, sv, True)
        for i in range(0, xq.shape[0], nx):
            for r in range(r0, rt, RW):
                r1 = min(r + RW - 1, R - 1)
                acc = _zeros(isa)
                for b in range(nsb):
                    acc = _t_q6_k(acc, ws, (r - r0) * k + b * 256, (r1 - r) * k, sv, sv, ((r - r0) * nsb + b) * 16,
                                  (r1 - r) * nsb * 16, xq, i * k + b * 256, k, xs, i * nsb * 16 + b * 16,
                                  nsb * 16, xd, i * nsb + b, nsb, isa)
                _store(acc, sums, out, r, r1, i, n, nx)


def matmul(x: np.ndarray, w: Int8Packed | KPacked | Q5Packed, out: np.ndarray, vnni: bool | None = None) -> np.ndarray:
    """out (n, rows) = x (n, k) float32 @ W.T, x quantized to 8 bits once (as the decode
    kernels quantize it) and multiplied as integers. vnni: the 4- to 6-bit types' tiles use
    vpdpbusd (None: where `vnni_available`; False: the generic path; True only on such a CPU,
    else LLVM cannot compile it). Both give the same result bit for bit: the integer sums
    are exact either way."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"input of shape {x.shape}, weight expects (n, {w.k})")
    if out.shape != (x.shape[0], w.rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(x.shape[0], w.rows)}, "
                         f"not {out.dtype} {out.shape}")
    if w.type not in (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q5_0):
        raise ValueError(f"no int8 layout for {w.type.name}")
    # Q8_0 (int16 x) has no vpmaddubsw to replace
    isa = VNNI if (vnni_available() if vnni is None else vnni) and w.type != T.Q8_0 else GENERIC
    xq, xd, xs = quantize_rows(x, w, tile_rows(isa))
    xs = _prepared_sums(xs, w.type)
    if w.type == T.Q8_0:
        _mm_q8_0(xq, xd, xs, w.q, w.d, out)
    elif w.type == T.Q4_0:
        _mm_q4_0(xq, xd, xs, w.q, None, w.d, out, isa)
    elif w.type in (T.Q4_K, T.Q5_K):
        _mm_q4_k(xq, xd, xs, w.q, w.h if w.type == T.Q5_K else None, w.s, w.d, w.dmin, out, isa)
    elif w.type == T.Q5_0:
        _mm_q5_0(xq, xd, xs, w.q, w.h, w.d, out, isa)
    else:
        _mm_q6_k(xq, xd, xs, w.q, w.s, w.d, out, isa)
    return out
