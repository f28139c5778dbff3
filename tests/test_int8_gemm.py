"""Prefill over the int8 layouts (quant/kernels/int8_gemm_cpu.py): dequant / take against
gguf-py's dequantizer of the file's bytes (bit for bit), and the many-rows product against a
numpy reference of the same integer arithmetic and against the decode kernels row by row."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from test_int8_kernels import raw_k, raw_weights

from quant.kernels import int8_cpu as k8
from quant.kernels import int8_gemm_cpu as gemm
from quant.kernels import int8_k_cpu as kk

TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K]


def make(t, rows, k, seed):
    """(file tensor, packed) with random valid bytes of type t."""
    if t in (T.Q8_0, T.Q4_0):
        w = raw_weights(t, rows, k, seed)
        return w, k8.pack(w)
    w = raw_k(t, rows, k, seed)
    return w, kk.pack(w)


def shapes(t):
    ks = [256, 1024, 3072] + ([768, 544] if t in (T.Q8_0, T.Q4_0) else [])  # 768, 544: tail blocks
    return [(t, k) for k in ks]


@pytest.mark.parametrize("t,k", [s for t in TYPES for s in shapes(t)], ids=lambda v: getattr(v, "name", str(v)))
def test_dequant_equals_gguf(t, k):
    w, p = make(t, 21, k, seed=k)
    ref = gguf_dequantize(w.raw, t).reshape(21, k)
    np.testing.assert_array_equal(gemm.dequant(p), ref)
    np.testing.assert_array_equal(gemm.dequant(p, 5, 12), ref[5:12])
    out = np.full((3, k), np.nan, np.float32)
    assert gemm.dequant(p, 18, 21, out=out) is out
    np.testing.assert_array_equal(out, ref[18:])
    ids = [20, 0, 7, 7]
    np.testing.assert_array_equal(gemm.take(p, ids), ref[ids])
    assert gemm.take(p, []).shape == (0, k)


def test_dequant_refuses_bad_rows_and_out():
    _, p = make(T.Q8_0, 4, 64, seed=1)
    with pytest.raises(IndexError):
        gemm.take(p, [4])
    with pytest.raises(IndexError):
        gemm.dequant(p, 3, 5)
    with pytest.raises(ValueError):
        gemm.dequant(p, 0, 2, out=np.empty((3, 64), np.float32))
