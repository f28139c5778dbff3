"""y = x @ W.T on the CPU, for weights kept quantized.

Q8_0 and Q4_0 are repacked once at load (`pack`): float32 scales apart from the quants, and
Q4_0's nibbles reordered so byte m of a row holds elements m and m + k/2. Then one flat loop
over k (scale looked up per element) lets LLVM vectorise; the 32-element block loops over raw
GGUF bytes did not (FEASIBILITY.md: 3-10x slower). Few rows of x (decode) go through those
loops, every weight byte read once per token; many rows (prefill) dequantize a tile of W at a
time and hand it to BLAS. Other formats use their numpy codec + BLAS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from ..qtensor import QTensor

SMALL_N = 8  # rows of x up to which the direct kernels beat dequantize + BLAS
TILE_ELEMS = 1 << 20  # float32 elements dequantized at once (4 MiB, stays in L3 for BLAS)


@dataclass(frozen=True)
class Packed:
    """A Q8_0 / Q4_0 matrix (or expert stack) in the kernels' layout."""
    name: str
    type: T
    rows: int
    k: int
    q: np.ndarray  # int8 (R, k) for Q8_0 and Q6_K; Q4_0: uint8 (R, k/2), byte m = element m | m + k/2 << 4
    d: np.ndarray  # float32 (R, k / group): one scale per group of elements
    n_mats: int = 1

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def expert(self, e: int) -> "Packed":
        s = slice(e * self.rows, (e + 1) * self.rows)
        return Packed(f"{self.name}[{e}]", self.type, self.rows, self.k, self.q[s], self.d[s])

    def _deq(self, q, d, out=None) -> np.ndarray:
        out = np.empty((q.shape[0], self.k), np.float32) if out is None else out
        (_deq_q4_0 if self.type == T.Q4_0 else _deq_q6_k if self.type == T.Q6_K else _deq_q8_0)(q, d, out)
        return out

    def dequant(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self._deq(self.q[lo:hi], self.d[lo:hi], out)

    def take(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return self._deq(self.q[ids], self.d[ids])


@njit(cache=True, inline="always")
def _half(lo, hi):
    """IEEE half from its two little-endian bytes (numba has no float16 on the CPU)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = math.ldexp(np.float64(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(np.float64(m | 1024), e - 25)
    return np.float32(-v if h & 0x8000 else v)


# -- repacking (once, at load) -------------------------------------------------------------

@njit(parallel=True, cache=True)
def _pack_q8_0(raw, rawi, q, d):
    nb = d.shape[1]
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = _half(raw[r, b * 34], raw[r, b * 34 + 1])
            for j in range(32):
                q[r, b * 32 + j] = rawi[r, b * 34 + 2 + j]


@njit(parallel=True, cache=True)
def _pack_q4_0(raw, q, d):
    nb = d.shape[1]
    half = nb * 16  # k / 2
    for r in prange(raw.shape[0]):
        for b in range(nb):
            d[r, b] = _half(raw[r, b * 18], raw[r, b * 18 + 1])
        for m in range(half):  # element m (first half of the row) and element m + half
            e0, e1 = m, m + half
            b0, b1 = e0 >> 5, e1 >> 5
            j0, j1 = e0 & 31, e1 & 31
            n0 = np.int32(raw[r, b0 * 18 + 2 + (j0 & 15)])
            n1 = np.int32(raw[r, b1 * 18 + 2 + (j1 & 15)])
            lo = (n0 & 15) if j0 < 16 else (n0 >> 4)
            hi = (n1 & 15) if j1 < 16 else (n1 >> 4)
            q[r, m] = np.uint8(lo | (hi << 4))


@njit(parallel=True, cache=True)
def _pack_q6_k(raw, rawi, q, d):
    # ggml's dequantize_row_q6_K, kept as int8 quants and one float scale per 16 elements
    nb = q.shape[1] // 256
    for r in prange(raw.shape[0]):
        for b in range(nb):
            o = b * 210
            db = _half(raw[r, o + 208], raw[r, o + 209])
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


def _packable(w: QTensor) -> bool:
    return w.type in (T.Q8_0, T.Q6_K) or (w.type == T.Q4_0 and w.k % 64 == 0)


def _empty_packed(t: T, R: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    if t == T.Q4_0:
        return np.empty((R, k // 2), np.uint8), np.empty((R, k // 32), np.float32)
    return np.empty((R, k), np.int8), np.empty((R, k // (16 if t == T.Q6_K else 32)), np.float32)


def _pack_into(t: T, raw: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    if t == T.Q8_0:
        _pack_q8_0(raw, raw.view(np.int8), q, d)
    elif t == T.Q6_K:
        _pack_q6_k(raw, raw.view(np.int8), q, d)
    else:
        _pack_q4_0(raw, q, d)


def pack(w: QTensor) -> QTensor | Packed:
    """The kernels' layout for Q8_0 / Q4_0 / Q6_K (other formats are returned as they are)."""
    if not _packable(w):
        return w
    q, d = _empty_packed(w.type, w.raw.shape[0], w.k)
    _pack_into(w.type, w.raw, q, d)
    return Packed(w.name, w.type, w.rows, w.k, q, d, w.n_mats)


# -- decode: few rows of x -----------------------------------------------------------------

# Two copies of one loop: the group shift must be a literal for LLVM to vectorise (a runtime
# shift measured 4x slower).
@njit(parallel=True, cache=True, fastmath=True)
def _mv_q8_0(x, q, d, out):
    n, k = x.shape
    for r in prange(q.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * (d[r, j >> 5] * np.float32(q[r, j]))
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q6_k(x, q, d, out):
    n, k = x.shape
    for r in prange(q.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * (d[r, j >> 4] * np.float32(q[r, j]))
            out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_0(x, q, d, out):
    # One row of x (a loop over rows of x inside stopped LLVM from vectorising); the -8 is
    # folded out: sum d x (nib - 8) = sum d x nib - 8 sum d x.
    half = x.shape[0] // 2
    for r in prange(q.shape[0]):
        a = np.float32(0.0)
        c = np.float32(0.0)
        for m in range(half):
            v = np.int32(q[r, m])
            dl = d[r, m >> 5] * x[m]
            dh = d[r, (m + half) >> 5] * x[m + half]
            a += dl * np.float32(v & 15) + dh * np.float32(v >> 4)
            c += dl + dh
        out[r] = a - np.float32(8) * c


ROW_CHUNK = 64  # rows per parallel task in the 16-bit float kernels (one scratch row each)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_bf16(x, w16, out):
    # bf16 -> f32 is a 16-bit shift; numba cannot reinterpret a scalar, so widen a row into
    # a uint32 scratch row and read it back through a float32 view
    n, k = x.shape
    R = w16.shape[0]
    for c in prange((R + ROW_CHUNK - 1) // ROW_CHUNK):
        u = np.empty(k, np.uint32)
        f = u.view(np.float32)
        for r in range(c * ROW_CHUNK, min(R, (c + 1) * ROW_CHUNK)):
            for j in range(k):
                u[j] = np.uint32(w16[r, j]) << np.uint32(16)
            for i in range(n):
                acc = np.float32(0.0)
                for j in range(k):
                    acc += x[i, j] * f[j]
                out[i, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f16(x, w16, out, lut):
    n, k = x.shape
    for r in prange(w16.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[i, j] * lut[w16[r, j]]
            out[i, r] = acc


_F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# -- prefill: dequantize tiles for BLAS ----------------------------------------------------

@njit(parallel=True, cache=True)
def _deq_q8_0(q, d, out):
    k = out.shape[1]
    for r in prange(q.shape[0]):
        for j in range(k):
            out[r, j] = d[r, j >> 5] * np.float32(q[r, j])


@njit(parallel=True, cache=True)
def _deq_q6_k(q, d, out):
    k = out.shape[1]
    for r in prange(q.shape[0]):
        for j in range(k):
            out[r, j] = d[r, j >> 4] * np.float32(q[r, j])


@njit(parallel=True, cache=True)
def _deq_q4_0(q, d, out):
    half = out.shape[1] // 2
    for r in prange(q.shape[0]):
        for m in range(half):
            v = q[r, m]
            out[r, m] = d[r, m >> 5] * np.float32(np.int32(v & 15) - 8)
            out[r, m + half] = d[r, (m + half) >> 5] * np.float32(np.int32(v >> 4) - 8)


def matmul(x: np.ndarray, w: QTensor | Packed, out: np.ndarray | None = None) -> np.ndarray:
    """(n, k) float32 @ W.T -> (n, w.rows) float32."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    if x.shape[1] != w.k:
        raise ValueError(f"{w.name}: input has {x.shape[1]} features, weight expects {w.k}")
    if out is None:
        out = np.empty((n, w.rows), np.float32)
    if isinstance(w, Packed) and n <= SMALL_N:
        if w.type == T.Q8_0:
            _mv_q8_0(x, w.q, w.d, out)
        elif w.type == T.Q6_K:
            _mv_q6_k(x, w.q, w.d, out)
        else:
            for i in range(n):
                _mv_q4_0(x[i], w.q, w.d, out[i])
    elif w.type == T.F32 and isinstance(w, QTensor):
        np.matmul(x, w.raw.view(np.float32).T, out=out)
    elif w.type == T.BF16 and n <= SMALL_N:
        _mv_bf16(x, w.raw.view(np.uint16), out)
    elif w.type == T.F16 and n <= SMALL_N:
        _mv_f16(x, w.raw.view(np.uint16), out, _F16_LUT)
    else:
        step = max(1, min(w.rows, TILE_ELEMS // w.k))
        packed = isinstance(w, Packed)
        tile = _scratch(step * w.k) if packed else None
        for lo in range(0, w.rows, step):
            hi = min(w.rows, lo + step)
            t = w.dequant(lo, hi, tile[:(hi - lo) * w.k].reshape(hi - lo, w.k)) if packed else w.dequant(lo, hi)
            np.matmul(x, t.T, out=out[:, lo:hi])
    return out


_SCRATCH = [np.empty(0, np.float32)]


def _scratch(n: int) -> np.ndarray:
    """One reused tile buffer: fresh 16 MB allocations cost page faults on every call."""
    if _SCRATCH[0].size < n:
        _SCRATCH[0] = np.empty(n, np.float32)
    return _SCRATCH[0]


def cache_is_warm() -> bool:
    """Whether numba's on-disk cache holds these kernels for this source (else the first run
    compiles them, ~1 minute). Uses numba's cache index; if that cannot be read, says yes."""
    try:
        return all(bool(k._cache._cache_file._load_index()) for k in (_mv_q8_0, _deq_q8_0, _pack_q8_0))
    except Exception:
        return True


def warm_up(forward) -> None:
    """Compile (or load) the decode and prefill kernels of a model before the user waits on them."""
    forward(SMALL_N + 1)
    forward(1)


def fuse(ws: list) -> QTensor | Packed | None:
    """Stack matrices that multiply the same input (q|k|v, gate|up) into one, so one kernel
    launch reads the input once; expert stacks are interleaved per expert. GGUF tensors that
    have a packed layout are packed straight into the stack (one copy, not two). None when the
    parts differ in type, row length or expert count."""
    a = ws[0]
    if any(type(w) is not type(a) or w.type != a.type or w.k != a.k or w.n_mats != a.n_mats for w in ws):
        return None
    E, rows = a.n_mats, sum(w.rows for w in ws)
    name = "+".join(w.name for w in ws)
    if isinstance(a, QTensor) and _packable(a):
        q, d = _empty_packed(a.type, E * rows, a.k)
        for e in range(E):
            at = e * rows
            for w in ws:
                part = w.raw[e * w.rows:(e + 1) * w.rows]
                _pack_into(a.type, part, q[at:at + w.rows], d[at:at + w.rows])
                at += w.rows
        return Packed(name, a.type, rows, a.k, q, d, E)

    def cat(arrs):
        return np.concatenate([x.reshape(E, -1, x.shape[-1]) for x in arrs], axis=1).reshape(E * rows, -1)

    if isinstance(a, Packed):
        return Packed(name, a.type, rows, a.k, cat([w.q for w in ws]), cat([w.d for w in ws]), E)
    return QTensor(name, a.type, rows, a.k, cat([w.raw for w in ws]), E)
