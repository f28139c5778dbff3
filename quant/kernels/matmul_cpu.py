"""y = x @ W.T on the CPU, for weights kept quantized.

Q8_0, Q6_K, Q4_0 and Q4_K are repacked once at load (`pack`): float32 scales (and Q4_K's
minimums) apart from the quants, 8-bit quants as int8, 4-bit ones as nibbles in a Q4_0 block's
order. Few rows of x (decode) go through flat loops per row (exact_decode_cpu.py, found per
type in layouts.LAYOUTS); many rows (prefill) dequantize a tile of W at a time and hand it to
BLAS. Q4_1, Q5_0, Q5_1 and Q5_K
become int8 with a scale and an offset per 32; Q2_K and Q3_K keep their 2-bit quants
(lowbit_cpu.py). BF16 / F16 have direct decode kernels. This is the exact path (float
activations); by default the engine keeps Q8_0, Q4_0, Q4_K, Q5_K, Q5_0 and Q6_K in the int8
layouts of layouts.py, whose `Mat` matrices are dispatched to their registry entries here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from ..formats import FORMATS
from ..qtensor import QTensor
from . import lowbit_cpu as lowbit
from . import threads
from .half import half
from .layouts import LAYOUTS, Exact, Mat, int8_layout, pack_int8

SMALL_N = 8  # rows of x up to which the direct kernels beat dequantize + BLAS
TILE_ELEMS = 1 << 20  # float32 elements dequantized at once (4 MiB, stays in L3 for BLAS)


@dataclass(frozen=True)
class Packed:
    """A quantized matrix (or expert stack) in the kernels' layout. Q8_0 / Q4_0 / Q4_K / Q6_K
    and the int8 repacks: value = d[group] * q - o[group] (o only for formats with a minimum or
    offset); Q2_K / Q3_K: see lowbit_cpu (d, o are integer sub-block scales and minimums there,
    sb the float super-block scales, h Q3_K's third bits)."""
    name: str
    type: T
    rows: int
    k: int
    q: np.ndarray  # int8 (R, k) for Q8_0, Q6_K; Q4_0, Q4_K: uint8 (R, k/2), byte 16 g + j = elements
    #               32 g + j (low nibble) and 32 g + j + 16 (high), the order of a GGUF Q4_0 block
    d: np.ndarray  # float32 (R, k / group): one scale per group of elements (32; 16 for Q6_K)
    n_mats: int = 1
    o: np.ndarray | None = None  # float32 (R, k / 32): offsets
    h: np.ndarray | None = None
    sb: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def expert(self, e: int) -> "Packed":
        s = slice(e * self.rows, (e + 1) * self.rows)
        return replace(self, name=f"{self.name}[{e}]", n_mats=1, **{n: a[s] for n, a in self.arrays().items()})

    def _deq(self, rows, out=None) -> np.ndarray:
        q, d = self.q[rows], self.d[rows]
        out = np.empty((q.shape[0], self.k), np.float32) if out is None else out
        if self.type == T.Q2_K:
            lowbit.deq_q2_k(q, d, self.o[rows], self.sb[rows], out)
        elif self.type == T.Q3_K:
            lowbit.deq_q3_k(q, self.h[rows], d, self.sb[rows], out)
        elif self.type not in (T.Q8_0, T.Q6_K, T.Q4_0, T.Q4_K):
            _deq_q8o(q, d, self.o[rows], out)
        elif self.type == T.Q4_K:
            _deq_q4(q, d, self.o[rows], np.float32(1), out)
        elif self.type == T.Q4_0:
            _deq_q4(q, d, d, np.float32(8), out)
        else:
            (_deq_q6_k if self.type == T.Q6_K else _deq_q8_0)(q, d, out)
        return out

    def dequant(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self._deq(slice(lo, hi), out)

    def take(self, ids) -> np.ndarray:
        return self._deq(np.asarray(ids, np.int64))


# -- repacking (once, at load) -------------------------------------------------------------

@njit(parallel=True, cache=True)
def _pack_q8_0(raw, rawi, q, d):
    nb = d.shape[1]
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = half(raw[r, b * 34], raw[r, b * 34 + 1])
            for j in range(32):
                q[r, b * 32 + j] = rawi[r, b * 34 + 2 + j]


@njit(parallel=True, cache=True)
def _pack_q4_0(raw, q, d):
    # the 16 quant bytes of each block are already in the kernels' order
    nb = d.shape[1]
    for r in prange(raw.shape[0]):
        for g in range(nb):
            d[r, g] = half(raw[r, g * 18], raw[r, g * 18 + 1])
            for j in range(16):
                q[r, g * 16 + j] = raw[r, g * 18 + 2 + j]


@njit(parallel=True, cache=True)
def _pack_q6_k(raw, rawi, q, d):
    # ggml's dequantize_row_q6_K, kept as int8 quants and one float scale per 16 elements
    nb = q.shape[1] // 256
    for r in prange(raw.shape[0]):
        for b in range(nb):
            o = b * 210
            db = half(raw[r, o + 208], raw[r, o + 209])
            for g in range(16):
                d[r, b * 16 + g] = db * np.float32(rawi[r, o + 192 + g])
            for h in range(2):
                ql, qh, y = o + 64 * h, o + 128 + 32 * h, b * 256 + 128 * h
                for m in range(32):
                    a, c, hh = np.int32(raw[r, ql + m]), np.int32(raw[r, ql + m + 32]), np.int32(raw[r, qh + m])
                    q[r, y + m] = np.int8(((a & 15) | ((hh & 3) << 4)) - 32)
                    q[r, y + m + 32] = np.int8(((c & 15) | (((hh >> 2) & 3) << 4)) - 32)
                    q[r, y + m + 64] = np.int8(((a >> 4) | (((hh >> 4) & 3) << 4)) - 32)
                    q[r, y + m + 96] = np.int8(((c >> 4) | (((hh >> 6) & 3) << 4)) - 32)


@njit(parallel=True, cache=True)
def _pack_q4_k(raw, q, d, o):
    # ggml's dequantize_row_q4_K: 8 sub-blocks of 32, each with a 6-bit scale and min, so
    # value = (d * sc) * q - (dmin * m). Sub-block j's nibbles sit in 32-byte chunk j // 2 (low
    # nibbles for even j); they are rewritten in Q4_0's order: group g, byte j < 16 holds
    # elements j (low) and j + 16 (high)
    nb = d.shape[1] // 8
    for r in prange(raw.shape[0]):
        for b in range(nb):
            o0 = b * 144
            dd = half(raw[r, o0], raw[r, o0 + 1])
            dmin = half(raw[r, o0 + 2], raw[r, o0 + 3])
            for j in range(8):
                if j < 4:
                    sc = np.int32(raw[r, o0 + 4 + j]) & 63
                    mn = np.int32(raw[r, o0 + 8 + j]) & 63
                else:
                    hi = np.int32(raw[r, o0 + 12 + j - 4])
                    sc = (hi & 15) | ((np.int32(raw[r, o0 + 4 + j - 4]) >> 6) << 4)
                    mn = (hi >> 4) | ((np.int32(raw[r, o0 + 8 + j - 4]) >> 6) << 4)
                g = b * 8 + j
                d[r, g] = dd * np.float32(sc)
                o[r, g] = dmin * np.float32(mn)
                src = o0 + 16 + (j >> 1) * 32
                for t in range(16):
                    lo = np.int32(raw[r, src + t])
                    hi2 = np.int32(raw[r, src + t + 16])
                    if j & 1:
                        lo, hi2 = lo >> 4, hi2 >> 4
                    q[r, g * 16 + t] = np.uint8((lo & 15) | ((hi2 & 15) << 4))


_OWN = (T.Q8_0, T.Q6_K, T.Q4_K, T.Q4_0, T.Q2_K, T.Q3_K)


def _packable(w: QTensor) -> bool:
    return w.type in _OWN or FORMATS[w.type].unpack is not None


def packed_spec(t: T, R: int, k: int) -> dict[str, tuple[tuple[int, int], type]]:
    """The arrays of a packed R x k matrix: name -> (shape, dtype)."""
    if t == T.Q2_K:
        return dict(q=((R, k // 4), np.uint8), d=((R, k // 16), np.uint8), o=((R, k // 16), np.uint8),
                    sb=((R, k // 128), np.float32))
    if t == T.Q3_K:
        return dict(q=((R, k // 4), np.uint8), h=((R, k // 4), np.uint8), d=((R, k // 16), np.int8),
                    sb=((R, k // 256), np.float32))
    if t in (T.Q4_0, T.Q4_K):
        o = dict(o=((R, k // 32), np.float32)) if t == T.Q4_K else {}
        return dict(q=((R, k // 2), np.uint8), d=((R, k // 32), np.float32), **o)
    if t in (T.Q8_0, T.Q6_K):
        return dict(q=((R, k), np.int8), d=((R, k // (16 if t == T.Q6_K else 32)), np.float32))
    return dict(q=((R, k), np.int8), d=((R, k // 32), np.float32), o=((R, k // 32), np.float32))


def packed_nbytes(w: QTensor) -> int:
    """Bytes of w in the kernels' layout (its file size when it has none)."""
    if not _packable(w):
        return w.nbytes
    return sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in packed_spec(w.type, w.raw.shape[0], w.k).values())


def _empty_packed(t: T, R: int, k: int) -> dict[str, np.ndarray]:
    return {n: np.empty(s, dt) for n, (s, dt) in packed_spec(t, R, k).items()}


def _pack_into(t: T, raw: np.ndarray, a: dict[str, np.ndarray]) -> None:
    q, d, o = a["q"], a["d"], a.get("o")
    if t == T.Q8_0:
        _pack_q8_0(raw, raw.view(np.int8), q, d)
    elif t == T.Q6_K:
        _pack_q6_k(raw, raw.view(np.int8), q, d)
    elif t == T.Q4_K:
        _pack_q4_k(raw, q, d, o)
    elif t == T.Q4_0:
        _pack_q4_0(raw, q, d)
    elif t == T.Q2_K:
        lowbit.pack_q2_k(raw, q, d, o, a["sb"])
    elif t == T.Q3_K:
        lowbit.pack_q3_k(raw, q, a["h"], d, a["sb"])
    else:
        step = max(1, (16 << 20) // q.shape[1])  # the numpy unpackers in slices: bounded temporaries
        for lo in range(0, raw.shape[0], step):
            q[lo:lo + step], d[lo:lo + step], o[lo:lo + step] = FORMATS[t].unpack(raw[lo:lo + step], q.shape[1])


def pack(w: QTensor, exact: bool = True) -> QTensor | Packed | Mat:
    """The kernels' layout (formats without one are returned as they are): with exact=False
    the int8 layout where the type has one (layouts.py), else the float32-scale `Packed`."""
    if not exact and int8_layout(w) is not None:
        return pack_int8(w)
    if not _packable(w):
        return w
    a = _empty_packed(w.type, w.raw.shape[0], w.k)
    _pack_into(w.type, w.raw, a)
    return Packed(w.name, w.type, w.rows, w.k, n_mats=w.n_mats, **a)


def _exact(w) -> Exact | None:
    """w's exact-path products (layouts.Exact) when w is in the exact layout (a Packed, or a
    float type's QTensor), else None (BLAS over dequantized tiles, or a product per expert)."""
    e = LAYOUTS.get(w.type)
    if e is None or e.exact is None:
        return None
    return e.exact if isinstance(w, Packed if _packable(w) else QTensor) else None


# -- prefill: dequantize tiles for BLAS ----------------------------------------------------

@njit(cache=True, nogil=True)
def _deq_q8_0(q, d, out):
    k = out.shape[1]
    for r in prange(q.shape[0]):
        for j in range(k):
            out[r, j] = d[r, j >> 5] * np.float32(q[r, j])


@njit(cache=True, nogil=True)
def _deq_q6_k(q, d, out):
    k = out.shape[1]
    for r in prange(q.shape[0]):
        for j in range(k):
            out[r, j] = d[r, j >> 4] * np.float32(q[r, j])


@njit(cache=True, nogil=True)
def _deq_q8o(q, d, o, out):
    k = out.shape[1]
    for r in prange(q.shape[0]):
        for j in range(k):
            out[r, j] = d[r, j >> 5] * np.float32(q[r, j]) - o[r, j >> 5]


@njit(cache=True, nogil=True)
def _deq_q4(q, d, o, factor, out):
    nbytes = q.shape[1]
    for r in prange(q.shape[0]):
        for b in range(nbytes):
            g, j = b >> 4, b & 15
            v = np.int32(q[r, b])
            off = factor * o[r, g]
            out[r, g * 32 + j] = d[r, g] * np.float32(v & 15) - off
            out[r, g * 32 + j + 16] = d[r, g] * np.float32(v >> 4) - off


def matmul(x: np.ndarray, w: QTensor | Packed, out: np.ndarray | None = None, rowwise: bool = False) -> np.ndarray:
    """(n, k) float32 @ W.T -> (n, w.rows) float32. rowwise (n <= SMALL_N): each row exactly
    as a lone row (n = 1) computes, as a batched decode step needs (the int8 GEMM rounds apart
    from the decode kernels); the weights are still read once for all rows."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    if x.shape[1] != w.k:
        raise ValueError(f"{w.name}: input has {x.shape[1]} features, weight expects {w.k}")
    if out is None:
        out = np.empty((n, w.rows), np.float32)
    if isinstance(w, Mat):
        if n == 1 or (rowwise and n <= SMALL_N):
            w.layout.decode(x, w.arrays, out)
        elif w.layout.prefill is not None:
            w.layout.prefill(x, w.arrays, out)
        else:
            _prefill(x, w, out)
    elif n <= SMALL_N and (ex := _exact(w)) is not None:
        ex.decode(x, w, out)
    elif rowwise and n <= SMALL_N:
        for i in range(n):
            _prefill(x[i:i + 1], w, out[i:i + 1])
    else:
        _prefill(x, w, out)
    return out


def matmul_experts(x: np.ndarray, w: QTensor | Packed, ids: np.ndarray, xi: np.ndarray) -> np.ndarray:
    """Slot s: x[xi[s]] @ expert ids[s] of the stack w -> (len(ids), w.rows); one launch for
    the common decode layouts, one product per slot for the rest."""
    x = np.ascontiguousarray(x, np.float32)
    ids, xi = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(xi, np.int64)
    out = np.empty((len(ids), w.rows), np.float32)
    if isinstance(w, Mat) and w.layout.experts is not None:
        w.layout.experts(x, w.arrays, ids, xi, out)
    elif (ex := _exact(w)) is not None and ex.experts is not None:
        ex.experts(x, w, ids, xi, out)
    else:
        for s_, (e, r) in enumerate(zip(ids, xi)):
            matmul(x[r:r + 1], w.expert(int(e)), out[s_:s_ + 1])
    return out


def _prefill(x: np.ndarray, w, out: np.ndarray) -> None:
    """Many rows of x: tiles of W (dequantized, or F32 as stored) into BLAS, the tiles dealt
    round-robin to the prefill threads."""
    step = max(1, min(w.rows, TILE_ELEMS // w.k))
    f32 = w.raw.view(np.float32) if w.type == T.F32 and isinstance(w, QTensor) else None

    def part(i: int, m: int) -> None:
        tile = _scratch(i, step * w.k) if isinstance(w, (Packed, Mat)) else None
        for lo in range(i * step, w.rows, m * step):
            hi = min(w.rows, lo + step)
            if f32 is not None:
                t = f32[lo:hi]
            elif tile is not None:
                t = w.dequant(lo, hi, tile[:(hi - lo) * w.k].reshape(hi - lo, w.k))
            else:
                t = w.dequant(lo, hi)
            np.matmul(x, t.T, out=out[:, lo:hi])

    threads.run(part, min(threads.parts(), -(-w.rows // step)))


_SCRATCH: dict[int, np.ndarray] = {}


def _scratch(i: int, n: int) -> np.ndarray:
    """Thread i's reused tile buffer: fresh 16 MB allocations cost page faults on every call."""
    if i not in _SCRATCH or _SCRATCH[i].size < n:
        _SCRATCH[i] = np.empty(n, np.float32)
    return _SCRATCH[i]


def warm_up(forward) -> None:
    """Compile (or load) the decode and prefill kernels of a model before the user waits on them."""
    forward(SMALL_N + 1)
    forward(1)


def fuse(ws: list, exact: bool = True) -> QTensor | Packed | Mat | None:
    """Stack matrices that multiply the same input (q|k|v, gate|up) into one, so one kernel
    launch reads the input once; expert stacks are interleaved per expert. GGUF tensors that
    have a packed layout are packed straight into the stack (one copy, not two). None when the
    parts differ in type, row length or expert count."""
    a = ws[0]
    if any(type(w) is not type(a) or w.type != a.type or w.k != a.k or w.n_mats != a.n_mats for w in ws):
        return None
    E, rows = a.n_mats, sum(w.rows for w in ws)
    name = "+".join(w.name for w in ws)

    def cat(arrs):
        return np.concatenate([x.reshape(E, -1, x.shape[-1]) for x in arrs], axis=1).reshape(E * rows, -1)

    if isinstance(a, QTensor) and not exact and int8_layout(a) is not None:
        return pack_int8(*ws)
    if isinstance(a, QTensor) and _packable(a):
        arrs = _empty_packed(a.type, E * rows, a.k)
        for e in range(E):
            at = e * rows
            for w in ws:
                _pack_into(a.type, w.raw[e * w.rows:(e + 1) * w.rows], {n: x[at:at + w.rows] for n, x in arrs.items()})
                at += w.rows
        return Packed(name, a.type, rows, a.k, n_mats=E, **arrs)
    if isinstance(a, Packed):
        return Packed(name, a.type, rows, a.k, n_mats=E, **{n: cat([getattr(w, n) for w in ws]) for n in a.arrays()})
    return QTensor(name, a.type, rows, a.k, cat([w.raw for w in ws]), E)
