"""The runtime layouts: for each GGUF type, how the engine keeps a matrix and which kernel runs it.

Two modes. The default ("int8") is llama.cpp's method: the weights stay at the file's size
(float16 scales, quants packed as in the file or only reordered) and x is quantized to 8 bits
once per product, so the inner loops are integer multiply-adds (int8_cpu.py, int8_k_cpu.py).
"exact" keeps matmul_cpu's float32-scale `Packed` and float activations: the numerics of the
reference implementation, used by the transformers-parity tests and `--exact`; F32 / F16 /
BF16 files always run exact (there is nothing to quantize x against).

An entry names, per role: `pack` (file bytes -> the kernels' arrays, once at load; several
matrices that multiply the same input are packed straight into one stack), `decode`
(a few rows of x, each computed as a lone row), `prefill` (many rows), `experts` (decode of a MoE stack: slot s = x[xi[s]] @
expert ids[s]), `grouped` (prefill of a MoE stack: all active experts' rows in one launch,
int8_moe_gemm_cpu.py), `dequant` / `take` (rows back to float32: embedding lookups, fallbacks).
A type or role without an entry falls back to the exact layout, so adding a format, or a
faster kernel for one role, is one entry here.

Each type's `Entry` in LAYOUTS also names its CUDA kernel (`CudaKernel`: which launcher of
cuda.py, fed which arrays of the exact layout), or None where the GPU cannot run it; the CUDA
backend (qwen3cli/ops_cuda.py) looks a matrix's kernel up here and has no type checks of its own.
And its exact CPU products (`Exact`: exact_decode_cpu's decode and MoE kernels over the exact
layout), which matmul_cpu looks up here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedQuantType
from ..qtensor import QTensor


@dataclass(frozen=True)
class Layout:
    pack: Callable[..., Any]  # (*ws: QTensor) -> arrays of ws stacked (qtensor.stack_parts)
    decode: Callable[[np.ndarray, Any, np.ndarray], Any]  # x (n, k), arrays, out (n, rows): a few rows, each as alone
    prefill: Callable[[np.ndarray, Any, np.ndarray], Any] | None  # x (n, k), arrays, out (n, rows)
    experts: Callable[..., Any] | None  # (x (m, k), arrays, ids, xi, out (slots, rows))
    dequant: Callable[..., np.ndarray] | None  # (arrays, lo, hi, out=None) -> (hi - lo, k)
    take: Callable[..., np.ndarray] | None  # (arrays, ids) -> (len(ids), k)
    grouped: Callable[..., Any] | None = None  # (x, arrays, rows, plan, gather, out (plan.total, rows))


@cache  # an import statement per product costs ~1 us on decode's path
def _int8_cpu():
    from . import int8_cpu
    return int8_cpu


@cache
def _int8_k_cpu():
    from . import int8_k_cpu
    return int8_k_cpu


@cache
def _gemm():
    from . import int8_gemm_cpu
    return int8_gemm_cpu


@cache
def _dequant():
    from . import int8_dequant_cpu
    return int8_dequant_cpu


@cache
def _int8_q5_cpu():
    from . import int8_q5_cpu
    return int8_q5_cpu


@cache
def _moe():
    from . import int8_moe_gemm_cpu
    return int8_moe_gemm_cpu


@cache
def _experts():
    from . import int8_experts_cpu
    return int8_experts_cpu


@cache
def _exact_decode():
    from . import exact_decode_cpu
    return exact_decode_cpu


def _entry(mod, rows=None, gemm: bool = True, experts: bool = True) -> Layout:
    """A layout whose pack, decode (and dequant, where `rows` is that module) live in `mod`
    (imported when first used: numba compiles or loads kernels at import), the rest in the
    shared GEMM / dequantization / experts modules; gemm=False: prefill dequantizes tiles into BLAS."""
    rows = rows or _dequant
    return Layout(
        pack=lambda *ws, after=None: mod().pack(*ws, after=after),
        decode=lambda x, m, out: mod().matvec_rows(x, m, out),
        prefill=(lambda x, m, out: _gemm().matmul(x, m, out)) if gemm else None,
        # out's width is an expert's rows (a Q5 stack's arrays count the whole stack's)
        experts=(lambda x, m, ids, xi, out: _experts().matmul_ids(x, m, ids, xi, out, out.shape[1]))
        if experts else None,
        dequant=lambda m, lo, hi, out=None: rows().dequant(m, lo, hi, out),
        take=lambda m, ids: rows().take(m, ids),
        grouped=(lambda x, m, n, p, gather, out: _moe().matmul_grouped(x, m, n, p, gather, out)) if gemm else None,
    )


@dataclass(frozen=True)
class CudaKernel:
    """How the CUDA backend multiplies by a type: `kernel` names a launcher of
    quant/kernels/cuda.py (by name: this module must not import numba.cuda), called as
    kernel(x, xdiv, ids, *args(w), acc, out); `args` reads the matrix w in the exact layout
    (matmul_cpu.Packed; the file's QTensor for the float types): host arrays, which the backend
    uploads once, and scalars."""
    kernel: str
    args: Callable[[Any], tuple]
    nbytes: Callable[[QTensor], int] | None = None  # device bytes of w, where not its exact layout's


@dataclass(frozen=True)
class Exact:
    """How the exact path multiplies by a type (matmul_cpu: float activations, the matrix a
    matmul_cpu.Packed or, for the float types, the file's QTensor): decode(x (n, k), w, out (n,
    rows)) for a few rows of x (n <= matmul_cpu.SMALL_N; more run as BLAS over dequantized
    tiles); experts(x (m, k), w, ids, xi, out (slots, rows)): slot s = x[xi[s]] @ expert ids[s]
    of the stack, in one launch (None: one product per slot)."""
    decode: Callable[[np.ndarray, Any, np.ndarray], Any]
    experts: Callable[..., Any] | None = None


def _ex(decode: str, experts: str | None = None) -> Exact:
    """exact_decode_cpu's products of these names."""
    return Exact(lambda x, w, out: getattr(_exact_decode(), decode)(x, w, out),
                 (lambda x, w, ids, xi, out: getattr(_exact_decode(), experts)(x, w, ids, xi, out)) if experts else None)


def _ex_nibbles(factor: int, offsets: bool) -> Exact:
    """Nibbles in Q4_0's order, as _q4: value = d q - factor o, o the minimums (Q4_K) or, without
    offsets, d itself (Q4_0 is d (q - 8): factor 8)."""
    f = np.float32(factor)
    return Exact(lambda x, w, out: _exact_decode().mv_nibbles(x, w, out, w.o if offsets else w.d, f),
                 lambda x, w, ids, xi, out: _exact_decode().ids_nibbles(x, w, ids, xi, out, w.o if offsets else w.d, f))


@dataclass(frozen=True)
class Entry:
    """One GGML type in the registry: how each backend runs it."""
    int8: Layout | None  # the CPU's default layout; None: the exact one (matmul_cpu.Packed) serves
    cuda: CudaKernel | None  # None: no CUDA kernel (the backend refuses the file, naming the type)
    exact: Exact | None = None  # None: the exact path runs it as BLAS over dequantized tiles


_NO_OFFSET = np.zeros((1, 1), np.float32)  # mv_i8's "no offsets" (one column)


def _i8(gshift: int, offsets: bool = False) -> CudaKernel:
    """int8 quants: value = d[j >> gshift] q - o[j / 32] (o only for formats with offsets)."""
    return CudaKernel("mv_i8", lambda w: (w.q, w.d, gshift, w.o if offsets else _NO_OFFSET))


def _q4(factor: int, offsets: bool) -> CudaKernel:
    """Nibbles in Q4_0's order: value = d q - factor o, o the minimums (Q4_K) or, without
    offsets, d itself (Q4_0 is d (q - 8): factor 8)."""
    return CudaKernel("mv_q4", lambda w: (w.q, w.d, w.o if offsets else w.d, np.float32(factor)))


def _float(rows: Callable[[QTensor], np.ndarray], nbytes=None) -> CudaKernel:
    return CudaKernel("mv_float", lambda w: (np.ascontiguousarray(rows(w)),), nbytes)


_OFFSETS = _ex("mv_offsets", "ids_offsets")  # int8 + a scale and an offset per 32 in the exact layout

LAYOUTS: dict[T, Entry] = {
    T.F32: Entry(None, _float(lambda w: w.dequant()), _ex("mv_f32")),
    T.F16: Entry(None, _float(lambda w: w.raw.view(np.float16)), _ex("mv_f16")),
    # widened on the host: the GPU kernels have no bf16 loads
    T.BF16: Entry(None, _float(lambda w: w.dequant(), nbytes=lambda w: w.rows * w.n_mats * w.k * 4), _ex("mv_bf16")),
    T.Q8_0: Entry(_entry(_int8_cpu), _i8(5), _ex("mv_q8_0", "ids_q8_0")),
    T.Q4_0: Entry(_entry(_int8_cpu), _q4(8, offsets=False), _ex_nibbles(8, offsets=False)),
    T.Q4_K: Entry(_entry(_int8_k_cpu), _q4(1, offsets=True), _ex_nibbles(1, offsets=True)),
    T.Q6_K: Entry(_entry(_int8_k_cpu), _i8(4), _ex("mv_q6_k", "ids_q6_k")),
    T.Q5_K: Entry(_entry(_int8_q5_cpu, rows=_int8_q5_cpu), _i8(5, offsets=True), _OFFSETS),
    T.Q5_0: Entry(_entry(_int8_q5_cpu, rows=_int8_q5_cpu), _i8(5, offsets=True), _OFFSETS),
    T.Q4_1: Entry(None, _i8(5, offsets=True), _OFFSETS),
    T.Q5_1: Entry(None, _i8(5, offsets=True), _OFFSETS),
    T.Q2_K: Entry(None, CudaKernel("mv_q2_k", lambda w: (w.q, w.d, w.o, w.sb)), _ex("mv_q2_k")),
    T.Q3_K: Entry(None, CudaKernel("mv_q3_k", lambda w: (w.q, w.h, w.d, w.sb)), _ex("mv_q3_k")),
}

INT8: dict[T, Layout] = {t: e.int8 for t, e in LAYOUTS.items() if e.int8 is not None}  # a view, for reading


def cuda_kernel(w) -> CudaKernel:
    """w's CUDA kernel (w: anything with a name and a GGML type)."""
    e = LAYOUTS.get(w.type)
    if e is None or e.cuda is None:
        raise UnsupportedQuantType(f"{w.name}: type {w.type.name} has no CUDA kernel yet; run it with --device cpu")
    return e.cuda


@dataclass(frozen=True)
class Mat:
    """A matrix (or a stack of n_mats experts of `rows` rows each) in an int8 layout: `arrays`
    is the layout's own object, every array's first axis its rows, so row ranges are views."""
    name: str
    type: T
    rows: int
    k: int
    layout: Layout
    arrays: Any
    n_mats: int = 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _arrays(self.arrays).values())

    def _rows(self, lo: int, hi: int):
        extra = {"rows": hi - lo} if "rows" in _names(self.arrays) else {}
        if "n_mats" in _names(self.arrays):
            extra["n_mats"] = 1
        return replace(self.arrays, **extra, **{n: a[lo:hi] for n, a in _arrays(self.arrays).items()})

    def expert(self, e: int) -> "Mat":
        lo = e * self.rows
        return replace(self, name=f"{self.name}[{e}]", n_mats=1, arrays=self._rows(lo, lo + self.rows))

    def dequant(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        hi = self.rows * self.n_mats if hi is None else hi
        return self.layout.dequant(self.arrays, lo, hi, out)

    def take(self, ids) -> np.ndarray:
        return self.layout.take(self.arrays, np.asarray(ids, np.int64))


def _names(obj) -> set[str]:
    return {f.name for f in fields(obj)}


def _arrays(obj) -> dict[str, np.ndarray]:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if isinstance(getattr(obj, f.name), np.ndarray)}


def int8_layout(w: QTensor) -> Layout | None:
    """w's int8 layout, or None where the exact one serves (no entry; a MoE stack before the
    layout has an experts kernel)."""
    e = LAYOUTS.get(w.type)
    lay = e.int8 if e is not None else None
    if lay is None or (w.n_mats > 1 and lay.experts is None):
        return None
    return lay


def pack_int8(*ws: QTensor, after=None, name: str | None = None) -> Mat:
    """ws (one matrix, or several stacked: q|k|v, gate|up) in their type's int8 layout;
    after(row, n) is called once each part's n raw rows, stacked at `row`, are packed."""
    w = ws[0]
    lay = LAYOUTS[w.type].int8
    return Mat(name or "+".join(x.name for x in ws), w.type, sum(x.rows for x in ws), w.k, lay,
               lay.pack(*ws, after=after), w.n_mats)
