"""One registry of GGML tensor formats: block geometry from gguf, encode/decode per format.

`encode(rows)` takes float32 rows (n, k) and returns the GGUF bytes (n, row_bytes) as
uint8; `decode(raw, k)` is its inverse up to the format's loss. The quantizers are numba
kernels (quant.kernels.quantize_cpu) that match gguf-py / ggml byte for byte; decoders are
plain numpy and serve as the specification for the runtime kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .errors import UnsupportedQuantType
from .kernels import quantize_cpu as qk
from .kernels import quantize_imatrix as qi

_NO_WEIGHTS = np.empty(0, np.float32)


@dataclass(frozen=True)
class Format:
    type: T
    block_size: int  # elements per block
    type_size: int  # bytes per block
    encode: Callable[[np.ndarray], np.ndarray] | None
    decode: Callable[[np.ndarray, int], np.ndarray]
    # (raw, k) -> (q int8 (n, k), d float32 (n, k/32), o float32 (n, k/32)) with value ~ d q - o
    # (equal up to float rounding): the kernels' layout for formats without one of their own
    unpack: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    # (rows, importance (k,)) -> bytes: ggml's search weighted by an imatrix; None where ggml
    # ignores the importance (Q8_0, the float types)
    encode_weighted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.type.name

    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Encode float32 rows (n, k) as ggml_quantize_chunk does, given the per-column
        importance (k,) of an imatrix or None."""
        if importance is not None and self.encode_weighted is not None:
            return self.encode_weighted(x, np.ascontiguousarray(importance, np.float32))
        if self.encode is None:
            raise UnsupportedQuantType(f"{self.name} can only be written with an importance matrix")
        return self.encode(x)

    def row_bytes(self, k: int) -> int:
        if k % self.block_size:
            raise UnsupportedQuantType(
                f"{self.name} needs rows that are a multiple of {self.block_size}, got {k}"
            )
        return k // self.block_size * self.type_size

    def nbytes(self, ggml_shape: tuple[int, ...]) -> int:
        n_rows = int(np.prod(ggml_shape[1:], dtype=np.int64)) if len(ggml_shape) > 1 else 1
        return n_rows * self.row_bytes(ggml_shape[0])


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).view(np.uint8).reshape(*d.shape, 2)


def _blocks(raw: np.ndarray, type_size: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    return raw.reshape(raw.shape[0], -1, type_size)


def _scale16(blocks: np.ndarray, at: int = 0) -> np.ndarray:
    return blocks[:, :, at : at + 2].copy().view(np.float16).astype(np.float32)


# -- float formats -----------------------------------------------------------------------

def _enc_f32(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint8)


def _dec_f32(raw, k):
    return np.ascontiguousarray(raw).view(np.float32).reshape(raw.shape[0], k)


def _enc_f16(x):
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _dec_f16(raw, k):
    return np.ascontiguousarray(raw).view(np.float16).reshape(raw.shape[0], k).astype(np.float32)


def _enc_bf16(x):
    # Round to nearest even; NaNs stay quiet NaNs (gguf-py / ggml's fp32 -> bf16 rule).
    n = np.ascontiguousarray(x, np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _dec_bf16(raw, k):
    return bf16_to_f32(np.ascontiguousarray(raw).view(np.uint16).reshape(raw.shape[0], k))


# -- 32-element block formats ------------------------------------------------------------

def _enc_q8_0(x):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    d = np.empty((n, k // 32), np.float32)
    q = np.empty((n, k), np.int8)
    qk.q8_0(x, d, q)
    out = np.empty((n, k // 32, 34), np.uint8)
    out[:, :, :2] = _f16_bytes(d)
    out[:, :, 2:] = q.view(np.uint8).reshape(n, k // 32, 32)
    return out.reshape(n, -1)


def _dec_q8_0(raw, k):
    b = _blocks(raw, 34)
    q = b[:, :, 2:].view(np.int8).astype(np.float32)
    return (q * _scale16(b)).reshape(raw.shape[0], k)


def _enc_q4_0(x):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    d = np.empty((n, k // 32), np.float32)
    q = np.empty((n, k // 2), np.uint8)
    qk.q4_0(x, d, q)
    return _pack_q4_0(d, q.reshape(n, k // 32, 16))


def _pack_q4_0(d, qs):
    n, nb = d.shape
    out = np.empty((n, nb, 18), np.uint8)
    out[:, :, :2] = _f16_bytes(d)
    out[:, :, 2:] = qs
    return out.reshape(n, -1)


def _weighted_levels_0(x, qw, nmax):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    d, L = np.empty((n, k // 32), np.float32), np.empty((n, k), np.uint8)
    qi.qx_0(x, qw, nmax, d, L)
    return d, L.reshape(n, k // 32, 2, 16)  # per block: elements 0-15, 16-31


def _encw_q4_0(x, qw):
    d, L = _weighted_levels_0(x, qw, 8)
    return _pack_q4_0(d, L[:, :, 0] | (L[:, :, 1] << 4))


def _encw_q5_0(x, qw):
    d, L = _weighted_levels_0(x, qw, 16)
    return _pack_q5(d, None, L)


def _pack_q5(d, m, L):
    """Q5_0 (m None) / Q5_1 blocks from levels L (n, nb, 2, 16): nibbles, then bit j of qh is
    the fifth bit of element j."""
    n, nb = d.shape
    head = 2 if m is None else 4
    out = np.empty((n, nb, head + 20), np.uint8)
    out[:, :, :2] = _f16_bytes(d)
    if m is not None:
        out[:, :, 2:4] = _f16_bytes(m)
    qh = ((L.reshape(n, nb, 32).astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    out[:, :, head:head + 4] = np.bitwise_or.reduce(qh, axis=-1).astype("<u4").view(np.uint8).reshape(n, nb, 4)
    out[:, :, head + 4:] = (L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)
    return out.reshape(n, -1)


def _pack_q4_1(d, m, L):
    n, nb = d.shape
    out = np.empty((n, nb, 20), np.uint8)
    out[:, :, :2], out[:, :, 2:4] = _f16_bytes(d), _f16_bytes(m)
    out[:, :, 4:] = L[:, :, 0] | (L[:, :, 1] << 4)
    return out.reshape(n, -1)


def _levels_1(x, nmax, qw=None):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    d, m, L = np.empty((n, k // 32), np.float32), np.empty((n, k // 32), np.float32), np.empty((n, k), np.uint8)
    if qw is None:
        qk.qx_1(x, nmax, d, m, L)
    else:
        qi.qx_1(x, qw, nmax, d, m, L)
    return d, m, L.reshape(n, k // 32, 2, 16)


def _enc_q4_1(x):
    return _pack_q4_1(*_levels_1(x, 15))


def _encw_q4_1(x, qw):
    return _pack_q4_1(*_levels_1(x, 15, qw))


def _enc_q5_1(x):
    return _pack_q5(*_levels_1(x, 31))


def _encw_q5_1(x, qw):
    return _pack_q5(*_levels_1(x, 31, qw))


def _dec_q4_0(raw, k):
    b = _blocks(raw, 18)
    qs = b[:, :, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8
    return (q.astype(np.float32) * _scale16(b)).reshape(raw.shape[0], k)


# -- 256-element super-block formats ----------------------------------------------------
# block_q6_K: ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8, d fp16 (210 bytes)

def _enc_q6_k(x, qw=_NO_WEIGHTS):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    nb = k // 256
    d = np.empty((n, nb), np.float32)
    sc = np.empty((n, nb, 16), np.int8)
    ql = np.empty((n, nb, 128), np.uint8)
    qh = np.empty((n, nb, 64), np.uint8)
    qk.q6_k(x, qw, d, sc, ql, qh)
    out = np.empty((n, nb, 210), np.uint8)
    out[:, :, :128] = ql
    out[:, :, 128:192] = qh
    out[:, :, 192:208] = sc.view(np.uint8)
    out[:, :, 208:] = _f16_bytes(d)
    return out.reshape(n, -1)


def _dec_q6_k(raw, k):
    b = _blocks(raw, 210)
    n, nb = b.shape[:2]
    ql = b[:, :, :128].reshape(n, nb, 2, 64).astype(np.int16)
    qh = b[:, :, 128:192].reshape(n, nb, 2, 32).astype(np.int16)
    sc = b[:, :, 192:208].view(np.int8).astype(np.float32).reshape(n, nb, 16)
    d = _scale16(b, 208)[..., 0]
    lo = np.concatenate([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], -1)
    hi = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], -1)
    q = (lo | (hi << 4)) - 32  # (n, nb, 2, 128): element order within each 128 half
    q = q.reshape(n, nb, 16, 16).astype(np.float32)
    return (q * (d[..., None] * sc)[..., None]).reshape(n, k)


# -- read-only formats (llama.cpp writes them; we run them) --------------------------------
# Each decoder follows ggml's dequantize_row_* with the same float operations in the same
# order, so results are bit-identical to gguf-py's (the tests check it on random blocks).

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32): low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, n: int) -> np.ndarray:
    """Little-endian bit j of the (..., n/8) bytes, as (..., n) uint8."""
    return ((packed[..., :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(*packed.shape[:-1], n)


def _dec_q4_1(raw, k):
    b = _blocks(raw, 20)
    q = _nibbles(b[:, :, 4:]).astype(np.float32)
    return (_scale16(b) * q + _scale16(b, 2)).reshape(raw.shape[0], k)


def _q5_quants(b, at):
    hbits = _bits(b[:, :, at:at + 4], 32)
    return (_nibbles(b[:, :, at + 4:]) | (hbits << 4))


def _enc_q5_0(x):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    d, q, qh = np.empty((n, k // 32), np.float32), np.empty((n, k // 2), np.uint8), np.empty((n, k // 32), np.uint32)
    qk.q5_0(x, d, q, qh)
    out = np.empty((n, k // 32, 22), np.uint8)
    out[:, :, :2] = _f16_bytes(d)
    out[:, :, 2:6] = qh.astype("<u4").view(np.uint8).reshape(n, -1, 4)
    out[:, :, 6:] = q.reshape(n, -1, 16)
    return out.reshape(n, -1)


def _dec_q5_0(raw, k):
    b = _blocks(raw, 22)
    q = (_q5_quants(b, 2).astype(np.int8) - np.int8(16)).astype(np.float32)
    return (_scale16(b) * q).reshape(raw.shape[0], k)


def _dec_q5_1(raw, k):
    b = _blocks(raw, 24)
    q = _q5_quants(b, 4).astype(np.float32)
    return (_scale16(b) * q + _scale16(b, 2)).reshape(raw.shape[0], k)


def _k_scale_min(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    a, m, hi = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    scale = np.concatenate([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def _k_levels(x, nmax, rmin, nstep, qw=None):
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    nb = k // 256
    d, dmin = np.empty((n, nb), np.float32), np.empty((n, nb), np.float32)
    sc, L = np.empty((n, nb, 12), np.uint8), np.empty((n, nb, 256), np.uint8)
    if qw is None:
        qk.k_quant_levels(x, nmax, np.float32(rmin), nstep, d, dmin, sc, L)
    else:
        qi.k_quant_levels(x, qw, nmax, nmax == 31, d, dmin, sc, L)
    head = np.empty((n, nb, 16), np.uint8)
    head[:, :, 0:2], head[:, :, 2:4], head[:, :, 4:16] = _f16_bytes(d), _f16_bytes(dmin), sc
    return head, L.reshape(n, nb, 4, 2, 32)  # 4 chunks of 64: (low 32, high 32)


def _enc_q4_k(x, qw=None):
    head, L = _k_levels(x, 15, -1.0, 20, qw)
    qs = (L[:, :, :, 0] | (L[:, :, :, 1] << 4)).reshape(*head.shape[:2], 128)
    return np.concatenate([head, qs], axis=-1).reshape(head.shape[0], -1)


def _enc_q5_k(x, qw=None):
    head, L = _k_levels(x, 31, -0.5, 15, qw)
    lo = L & 15
    qs = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(*head.shape[:2], 128)
    hb = (L >> 4).astype(np.uint8)  # the fifth bit: chunk c's low/high half -> bits 2c / 2c+1 of qh
    shifts = (2 * np.arange(4, dtype=np.uint8)[:, None] + np.arange(2, dtype=np.uint8)[None, :])[..., None]
    qh = np.bitwise_or.reduce((hb << shifts).reshape(*head.shape[:2], 8, 32), axis=2).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=-1).reshape(head.shape[0], -1)


def _dec_q4_k(raw, k):
    b = _blocks(raw, 144)
    n, nb = b.shape[:2]
    sc, mn = _k_scale_min(b[:, :, 4:16])
    d = _scale16(b) * sc  # (n, nb, 8): one scale per 32 elements
    dm = _scale16(b, 2) * mn
    qs = b[:, :, 16:].reshape(n, nb, 4, 32)  # 4 chunks of 32 bytes: 64 elements each
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32).astype(np.float32)
    return (d[..., None] * q - dm[..., None]).reshape(n, k)


def _dec_q5_k(raw, k):
    b = _blocks(raw, 176)
    n, nb = b.shape[:2]
    sc, mn = _k_scale_min(b[:, :, 4:16])
    d = _scale16(b) * sc
    dm = _scale16(b, 2) * mn
    qh = b[:, :, 16:48]  # bit j of byte l: high bit of element l of sub-block j
    qs = b[:, :, 48:].reshape(n, nb, 4, 32)
    lo = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    hi = ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1)  # (n, nb, 8, 32)
    q = (lo | (hi << 4)).astype(np.float32)
    return (d[..., None] * q - dm[..., None]).reshape(n, k)


def _dec_q2_k(raw, k):
    b = _blocks(raw, 84)
    n, nb = b.shape[:2]
    sc = b[:, :, :16]
    dl = _scale16(b, 80) * (sc & 0x0F).astype(np.float32)  # (n, nb, 16)
    ml = _scale16(b, 82) * (sc >> 4).astype(np.float32)
    qs = b[:, :, 16:80].reshape(n, nb, 2, 1, 32)  # two halves of 128 elements
    q = ((qs >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(n, nb, 16, 16).astype(np.float32)
    return (dl[..., None] * q - ml[..., None]).reshape(n, k)


def _dec_q3_k(raw, k):
    b = _blocks(raw, 110)
    n, nb = b.shape[:2]
    hmask, qs, s12 = b[:, :, :32], b[:, :, 32:96], b[:, :, 96:108]
    lo = np.concatenate([s12[..., :8] & 0x0F, s12[..., :8] >> 4], axis=-1)  # (n, nb, 16)
    hi = ((s12[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).transpose(0, 1, 3, 2).reshape(n, nb, 16)
    scale = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = _scale16(b, 108) * scale
    ql = ((qs.reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(n, nb, 8, 32)
    qh = ((hmask[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) ^ 1  # a set bit means no -4
    q = (ql.astype(np.int8) - (qh << 2).astype(np.int8)).astype(np.float32).reshape(n, nb, 16, 16)
    return (dl[..., None] * q).reshape(n, k)


def _unpack_q4_1(raw, k):
    b = _blocks(raw, 20)
    n = raw.shape[0]
    return _nibbles(b[:, :, 4:]).astype(np.int8).reshape(n, k), _scale16(b)[..., 0], -_scale16(b, 2)[..., 0]


def _unpack_q5_0(raw, k):
    b = _blocks(raw, 22)
    d = _scale16(b)[..., 0]
    return _q5_quants(b, 2).astype(np.int8).reshape(raw.shape[0], k), d, 16 * d


def _unpack_q5_1(raw, k):
    b = _blocks(raw, 24)
    return _q5_quants(b, 4).astype(np.int8).reshape(raw.shape[0], k), _scale16(b)[..., 0], -_scale16(b, 2)[..., 0]


def _unpack_q5_k(raw, k):
    b = _blocks(raw, 176)
    n, nb = b.shape[:2]
    sc, mn = _k_scale_min(b[:, :, 4:16])
    qs = b[:, :, 48:].reshape(n, nb, 4, 32)
    lo = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    hi = (b[:, :, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = (lo | (hi << 4)).astype(np.int8).reshape(n, k)
    return q, (_scale16(b) * sc).reshape(n, -1), (_scale16(b, 2) * mn).reshape(n, -1)


def _fmt(t: T, enc, dec, unpack=None, encw=None) -> Format:
    block, size = GGML_QUANT_SIZES[t]
    return Format(t, block, size, enc, dec, unpack, encw)


FORMATS: dict[T, Format] = {
    f.type: f
    for f in (
        _fmt(T.F32, _enc_f32, _dec_f32),
        _fmt(T.F16, _enc_f16, _dec_f16),
        _fmt(T.BF16, _enc_bf16, _dec_bf16),
        _fmt(T.Q8_0, _enc_q8_0, _dec_q8_0),
        _fmt(T.Q4_0, _enc_q4_0, _dec_q4_0, encw=_encw_q4_0),
        _fmt(T.Q6_K, _enc_q6_k, _dec_q6_k, encw=_enc_q6_k),
        _fmt(T.Q4_1, _enc_q4_1, _dec_q4_1, _unpack_q4_1, _encw_q4_1),
        _fmt(T.Q5_0, _enc_q5_0, _dec_q5_0, _unpack_q5_0, _encw_q5_0),
        _fmt(T.Q5_1, _enc_q5_1, _dec_q5_1, _unpack_q5_1, _encw_q5_1),
        _fmt(T.Q2_K, None, _dec_q2_k),
        _fmt(T.Q3_K, None, _dec_q3_k),
        _fmt(T.Q4_K, _enc_q4_k, _dec_q4_k, encw=_enc_q4_k),
        _fmt(T.Q5_K, _enc_q5_k, _dec_q5_k, _unpack_q5_k, _enc_q5_k),
    )
}


def get_format(t: int | T, what: str = "tensor") -> Format:
    """The format for GGML type `t`; `what` names the tensor in the error."""
    try:
        return FORMATS[T(t)]
    except (ValueError, KeyError):
        name = T(t).name if t in T._value2member_map_ else f"#{int(t)}"
        raise UnsupportedQuantType(f"{what}: GGML type {name} is not supported") from None

