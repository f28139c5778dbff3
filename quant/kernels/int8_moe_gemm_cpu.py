"""MoE prefill over the int8 layouts: all active experts' products of one stack in one launch.

A prefill of n tokens routes n * k (token, expert) pairs (k = 8 of 128 experts in
Qwen3-30B-A3B): a few tokens to each expert. One GEMM per expert paid, per expert and stack,
a Python dispatch, a quantization of its rows of x, a parallel launch and a row-tile split that
left threads idle on the small ones; at 128 prefill tokens that cost more than the products.

Here the pairs are sorted by expert once per layer (`plan`): expert e's rows of x sit together
at rows start[e].., padded to a multiple of the tile's NX rows with a zero row, so each tile of
x belongs to one expert. x is quantized once (each token's row once, however many experts it
goes to; int8_gemm_cpu.quantize_rows, the dense GEMM's own rounding) and its quantized rows
gathered into that order; the down projection's input is already in it (gate|up's output rows
are). One kernel then runs work items (expert, tile of RT weight rows) with int8_gemm_cpu's
register tiles (`_t_*`, imported: the same instructions as the dense GEMM), so every output
entry is the dense kernel's arithmetic for that expert, bit for bit (the 4- to 6-bit types
with vpdpbusd where the CPU has AVX512-VNNI, as the dense GEMM, but in tiles of NX = 4 rows:
the plan pads each expert's rows to NX, and NXV = 6 would pad more of them; Q8_0's int16 x
takes vpdpwssd either way; the blocks after the last full group as the dense GEMM runs them,
one zero-padded group more). Items are dealt
round-robin in tile-major order to `parts` threads: each thread gets about the same share of
every expert's rows, whatever the routing; each thread unpacks weight tiles into one buffer.

`scatter_add` weights the rows back into token order (the slots of a token in routing order).

What bounds it, at Qwen3-30B-A3B's gate|up stack (128 experts of 1536 x 2048, 8 a token;
measured on the shared 2-core Zen 5 under load, CPU time, so ratios only): the per-item work
(unpack a tile of 32 weight rows, their lane scales) over the whole stack is 17-20 ms for Q5_K /
Q4_K on one core, which is the stack's 278 MB streamed from memory (~17 GB/s): every active
expert's weights are read once per call whatever the kernel. At 128 tokens (~9 rows an
expert) that is ~35% of the call; the same MACs routed to 16 experts ran 1.7-2.4x faster
(32 / 24 ms against 54 / 59, generic / VNNI), at 512 tokens 1.2x. The rest is the register
tiles, at the dense GEMM's rate per MAC (within noise: ~120 GMAC per CPU second for Q5_K).
VNNI's tiles against the generic ones (gate|up + down, alternating, CPU time): Q4_0 / Q5_K
1.01-1.04x / 0.99-1.01x, Q6_K 1.09x.
Compiled (inspect_asm on znver5, whole functions): _g_q4_0 / _g_q4_k / _g_q6_k with VNNI4
hold 128 / 64 / 32 vpdpbusd (Q4_0: its full groups' and its tail group's loops, each 2 x 4
tile entries x 8 units; K: 2 x 4 x 8, a pair of super-blocks), generic 16 / 32 / 16 vpmaddubsw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .int8_cpu import G
from .int8_gemm_cpu import (Q4_0_CALLEES, Q5_0_CALLEES, _lane_scales, _prepared_sums, _store, _tail_q8_0, _unpack,
                            _unpack_k_pairs, quantize_rows)
from .int8_tiles_cpu import GENERIC, NX, RT, RW, VNNI4, _t_q4_k, _t_q4_k1, _t_q6_k, _t_q8_0, _zeros, vnni_available
from .variants import variant

TYPES = (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q5_0)


@dataclass(frozen=True)
class Plan:
    """The (token, slot) pairs of a routing sorted by expert. Row `row[p]` of the grouped
    order holds pair p = token * k + slot; src[i] is the token of grouped row i (n_tokens for a
    padding row: x's zero row); expert e owns rows lo[e]..hi[e] (hi - lo a multiple of NX)."""
    n_tokens: int
    k: int
    row: np.ndarray
    src: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    experts: np.ndarray  # the experts with tokens

    @property
    def total(self) -> int:
        return len(self.src)


def plan(top: np.ndarray, n_mats: int) -> Plan:
    """top (n, k): each token's experts (ids in [0, n_mats))."""
    top = np.asarray(top)
    if top.ndim != 2:
        raise ValueError(f"routing of shape {top.shape}, expected (tokens, experts per token)")
    n, k = top.shape
    flat = top.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_mats):
        raise ValueError(f"expert ids must lie in [0, {n_mats})")
    counts = np.bincount(flat, minlength=n_mats)
    padded = -(-counts // NX) * NX
    hi = np.cumsum(padded)
    lo = hi - padded
    order = np.argsort(flat, kind="stable")
    # sorted position p of expert e goes to lo[e] + (p - e's first sorted position)
    row = np.empty(flat.size, np.int64)
    row[order] = lo[flat[order]] + (np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts))
    src = np.full(int(hi[-1]) if n_mats else 0, n, np.int64)
    src[row] = np.arange(flat.size) // max(k, 1)
    return Plan(n, k, row, src, lo.astype(np.int64), hi.astype(np.int64), np.nonzero(counts)[0].astype(np.int64))


def _items(p: Plan, rows: int) -> np.ndarray:
    # (expert, row tile) work items, tile-major: dealt round-robin, every thread gets a share
    # of each expert's tiles
    tiles = -(-rows // RT)
    e = np.tile(p.experts, tiles)
    t = np.repeat(np.arange(tiles, dtype=np.int64), len(p.experts))
    return np.ascontiguousarray(np.stack([e, t], axis=1))


# -- the kernels: int8_gemm_cpu's _mm_* over work items --------------------------------------

@njit(parallel=True, cache=True, nogil=True)
def _g_q8_0(xq, xd, xs, q, d, R, items, lo, hi, parts, out, isa):
    k, kp = q.shape[1], xq.shape[1]
    nb, nbp = k // 32, kp // 32
    ng = nb // G
    n = out.shape[0]
    for part in prange(parts):
        sums = np.empty(G, np.float32)  # _hsums stores 16
        wt, dt = np.zeros(RT * 32 * G, np.int8), np.zeros(RT * G, np.uint16)
        for it in range(part, items.shape[0], parts):
            e, t = items[it, 0], items[it, 1]
            r0, rt = e * R + t * RT, e * R + min(R, t * RT + RT)
            if ng < nbp // G:
                _tail_q8_0(q, d, r0, rt, wt, dt)
            for i in range(lo[e], hi[e], NX):
                for r in range(r0, rt, RW):
                    r1 = min(r + RW - 1, rt - 1)
                    acc = _zeros(GENERIC)
                    for g in range(ng):
                        acc = _t_q8_0(acc, q, r * k + g * 32 * G, (r1 - r) * k, d, d, r * nb + g * G,
                                      (r1 - r) * nb, xq, i * kp + g * 32 * G, kp, xs, 0, 0, xd, i * nbp + g * G, nbp,
                                      GENERIC)
                    if ng < nbp // G:
                        acc = _t_q8_0(acc, wt, (r - r0) * 32 * G, (r1 - r) * 32 * G, dt, dt, (r - r0) * G,
                                      (r1 - r) * G, xq, i * kp + ng * 32 * G, kp, xs, 0, 0, xd, i * nbp + ng * G, nbp,
                                      GENERIC)
                    _store(acc, sums, out, r - e * R, r1 - e * R, i, n, NX)


@njit(parallel=True, cache=True, nogil=True)
def _g_q4_k(xq, xd, xs, q, h, s, d, dmin, R, items, lo, hi, parts, out, isa):
    # Q4_K (h None) or Q5_K (h: the fifth bits), as int8_gemm_cpu._mm_q4_k
    nsb = d.shape[1]
    k, nl = nsb * 256, xs.shape[1]  # nl: lanes a row, 8 a super-block (16 for an odd count's last)
    n = out.shape[0]
    for part in prange(parts):
        sums = np.empty(G, np.float32)  # _hsums stores 16
        ws = np.empty(RT * k, np.uint8)
        sv, mv = np.empty(RT * nl, np.float32), np.empty(RT * nl, np.float32)
        for it in range(part, items.shape[0], parts):
            e, t = items[it, 0], items[it, 1]
            r0, rt = e * R + t * RT, e * R + min(R, t * RT + RT)
            _unpack_k_pairs(q, h, r0, rt, ws, nsb)
            _lane_scales(s, d, dmin, r0, rt, sv, mv, False)
            for i in range(lo[e], hi[e], NX):
                for r in range(r0, rt, RW):
                    r1 = min(r + RW - 1, rt - 1)
                    acc = _zeros(isa)
                    for p in range(nsb // 2):
                        acc = _t_q4_k(acc, ws, (r - r0) * k + p * 512, (r1 - r) * k, sv, mv,
                                      (r - r0) * nl + p * 16, (r1 - r) * nl, xq, i * k + p * 512, k, xs,
                                      i * nl + p * 16, nl, xd, i * nl + p * 16, nl, isa)
                    if nsb % 2:
                        o = (nsb - 1) * 256
                        acc = _t_q4_k1(acc, ws, (r - r0) * k + o, (r1 - r) * k, sv, mv, (r - r0) * nl + o // 32,
                                       (r1 - r) * nl, xq, i * k + o, k, xs, i * nl + o // 32, nl, xd,
                                       i * nl + o // 32, nl, isa)
                    _store(acc, sums, out, r - e * R, r1 - e * R, i, n, NX)


def _g_nibbles(xq, xd, xs, q, h, d, R, items, lo, hi, parts, out, isa):
    # Q4_0 (h None) and Q5_0 (h: the fifth bits): _g_q4_0 / _g_q5_0 are this body with
    # int8_gemm_cpu's Q4_0 / Q5_0 callees (variants.py)
    kh, kp = q.shape[1], xq.shape[1]
    k, nb, nbp = 2 * kh, kh // 16, kp // 32
    ng = nb // G
    n = out.shape[0]
    for part in prange(parts):
        sums = np.empty(G, np.float32)  # _hsums stores 16
        ws = np.empty(RT * k, np.uint8)
        wt, dt = np.zeros(RT * 32 * G, np.uint8), np.zeros(RT * G, np.uint16)
        tmp, tmph = np.zeros(16 * G, np.uint8), np.zeros(4 * G, np.uint8)
        for it in range(part, items.shape[0], parts):
            e, t = items[it, 0], items[it, 1]
            r0, rt = e * R + t * RT, e * R + min(R, t * RT + RT)
            _unpack_rows(q, h, r0, rt, ws, k)
            if ng < nbp // G:
                _tail_rows(q, h, d, r0, rt, wt, dt, tmp, tmph)
            for i in range(lo[e], hi[e], NX):
                for r in range(r0, rt, RW):
                    r1 = min(r + RW - 1, rt - 1)
                    acc = _zeros(isa)
                    for g in range(ng):
                        acc = _tile(acc, ws, (r - r0) * k + g * 32 * G, (r1 - r) * k, d, d,
                                    r * nb + g * G, (r1 - r) * nb, xq, i * kp + g * 32 * G, kp, xs, i * nbp + g * G,
                                    nbp, xd, i * nbp + g * G, nbp, isa)
                    if ng < nbp // G:
                        acc = _tile(acc, wt, (r - r0) * 32 * G, (r1 - r) * 32 * G, dt, dt, (r - r0) * G,
                                    (r1 - r) * G, xq, i * kp + ng * 32 * G, kp, xs, i * nbp + ng * G, nbp, xd,
                                    i * nbp + ng * G, nbp, isa)
                    _store(acc, sums, out, r - e * R, r1 - e * R, i, n, NX)


_tile = _unpack_rows = _tail_rows = None  # only a variant's own globals bind them
_KERNEL = {"parallel": True, "cache": True, "nogil": True}
_g_q4_0 = variant(_g_nibbles, "_g_q4_0", Q4_0_CALLEES, **_KERNEL)
_g_q5_0 = variant(_g_nibbles, "_g_q5_0", Q5_0_CALLEES, **_KERNEL)


@njit(parallel=True, cache=True, nogil=True)
def _g_q6_k(xq, xd, xs, q, s, d, R, items, lo, hi, parts, out, isa):
    nsb = d.shape[1]
    k = nsb * 256
    n = out.shape[0]
    for part in prange(parts):
        sums = np.empty(G, np.float32)  # _hsums stores 16
        ws = np.empty(RT * k, np.uint8)
        sv = np.empty(RT * nsb * 16, np.float32)
        for it in range(part, items.shape[0], parts):
            e, t = items[it, 0], items[it, 1]
            r0, rt = e * R + t * RT, e * R + min(R, t * RT + RT)
            _unpack(q, r0, rt, ws, k, 256, True)
            _lane_scales(s, d, d, r0, rt, sv, sv, True)
            for i in range(lo[e], hi[e], NX):
                for r in range(r0, rt, RW):
                    r1 = min(r + RW - 1, rt - 1)
                    acc = _zeros(isa)
                    for b in range(nsb):
                        acc = _t_q6_k(acc, ws, (r - r0) * k + b * 256, (r1 - r) * k, sv, sv, ((r - r0) * nsb + b) * 16,
                                      (r1 - r) * nsb * 16, xq, i * k + b * 256, k, xs, i * nsb * 16 + b * 16,
                                      nsb * 16, xd, i * nsb + b, nsb, isa)
                    _store(acc, sums, out, r - e * R, r1 - e * R, i, n, NX)


def matmul_grouped(x: np.ndarray, w, rows: int, p: Plan, gather: bool, out: np.ndarray | None = None,
                   vnni: bool | None = None) -> np.ndarray:
    """out (p.total, rows): grouped row i = (x[p.src[i]] if gather, else x[i]) @ (its expert of
    the stack w, `rows` rows an expert).T; padding rows come out 0 when gathered (x's zero row).
    vnni: as int8_gemm_cpu.matmul's (the 4- to 6-bit types' tiles; the same bits either way)."""
    x = np.ascontiguousarray(x, np.float32)
    if w.type not in TYPES:
        raise ValueError(f"no grouped int8 kernel for {w.type.name}")
    R_all = w.q.shape[0]
    if rows <= 0 or R_all % rows:
        raise ValueError(f"a stack of {R_all} rows is not experts of {rows}")
    if len(p.lo) != R_all // rows:
        raise ValueError(f"plan for {len(p.lo)} experts, stack of {R_all // rows}")
    if x.ndim != 2 or x.shape[1] != w.k or x.shape[0] != (p.n_tokens if gather else p.total):
        raise ValueError(f"input of shape {x.shape}, expected ({p.n_tokens if gather else p.total}, {w.k})")
    if out is None:
        out = np.empty((p.total, rows), np.float32)
    elif out.shape != (p.total, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(p.total, rows)}")
    if p.total == 0:
        return out
    xq, xd, xs = quantize_rows(x, w)
    if gather:  # each token quantized once, its rows copied to its experts' places
        if xq.shape[0] == x.shape[0]:  # no padding row: add x's zero row
            xq, xd, xs = (np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)]) for a in (xq, xd, xs))
        p_src = np.where(p.src == p.n_tokens, xq.shape[0] - 1, p.src)
        xq, xd, xs = xq[p_src], xd[p_src], xs[p_src]
    xs = _prepared_sums(xs, w.type)
    items, parts = _items(p, rows), numba.get_num_threads()
    # vpdpbusd in tiles of NX rows: the plan pads each expert's rows to NX, not to NXV
    isa = VNNI4 if (vnni_available() if vnni is None else vnni) else GENERIC
    args = (rows, items, p.lo, p.hi, parts, out, isa)
    if w.type == T.Q8_0:
        _g_q8_0(xq, xd, xs, w.q, w.d, *args)
    elif w.type == T.Q4_0:
        _g_q4_0(xq, xd, xs, w.q, None, w.d, *args)
    elif w.type in (T.Q4_K, T.Q5_K):
        _g_q4_k(xq, xd, xs, w.q, w.h if w.type == T.Q5_K else None, w.s, w.d, w.dmin, *args)
    elif w.type == T.Q5_0:
        _g_q5_0(xq, xd, xs, w.q, w.h, w.d, *args)
    else:
        _g_q6_k(xq, xd, xs, w.q, w.s, w.d, *args)
    return out


@njit(parallel=True, cache=True, nogil=True)
def _scatter(y, row, wts, out):
    n, k = wts.shape
    for tok in prange(n):
        for j in range(k):
            r, w = row[tok * k + j], wts[tok, j]
            for c in range(out.shape[1]):
                out[tok, c] += w * y[r, c]


def scatter_add(y: np.ndarray, p: Plan, wts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[token] += sum over its slots j of wts[token, j] * y[its grouped row] (slots in order)."""
    if wts.shape != (p.n_tokens, p.k) or y.shape[0] != p.total or out.shape != (p.n_tokens, y.shape[1]):
        raise ValueError(f"weights {wts.shape}, rows {y.shape}, out {out.shape} do not fit the plan")
    _scatter(y, p.row, np.ascontiguousarray(wts, np.float32), out)
    return out
