"""Q5_K / Q5_0 int8-activation kernels (quant/kernels/int8_q5_cpu.py) against numpy references
of the same arithmetic (x rounded as ggml's Q8_K / Q8_0, exact integer sums, then the float
scales), and their dequantization against gguf's, bit for bit. The references read the GGUF
bytes themselves, so a wrong lane, nibble or fifth bit in the layout shows up here."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from test_int8_kernels import ref_k_weights, ref_quantize, ref_quantize_k  # ggml's roundings of x

from quant.errors import UnsupportedQuantType
from quant.kernels import int8_q5_cpu as k5
from quant.kernels.matmul_cpu import matmul, pack as pack_float
from quant.qtensor import QTensor

BLOCK = {T.Q5_K: (256, 176), T.Q5_0: (32, 22)}  # elements, bytes
FORMATS = [T.Q5_K, T.Q5_0]


def raw_q5(t, rows, k, seed, n_mats=1):
    """Random file bytes: every quant and scale value, finite fp16 d (and dmin) of mixed sign."""
    rng = np.random.default_rng(seed)
    n, size = BLOCK[t]
    raw = rng.integers(0, 256, (n_mats * rows, k // n, size), dtype=np.uint8)
    halves = 2 if t == T.Q5_K else 1
    d = (rng.standard_normal((n_mats * rows, k // n, halves)) * 0.01).astype(np.float16)
    raw[:, :, :2 * halves] = d.view(np.uint8)
    return QTensor("w", t, rows, k, raw.reshape(n_mats * rows, -1), n_mats)


def ref_q5_weights(w):
    """(quants 0..31 (R, nb, block), integer scale and minimum per element (Q5_K), d, dmin)."""
    R = w.raw.shape[0]
    raw = w.raw.reshape(R, -1, BLOCK[w.type][1])
    if w.type == T.Q5_K:
        # without its 32 bytes of fifth bits a Q5_K block is a Q4_K block
        as_q4 = QTensor("w", T.Q4_K, R, w.k, np.concatenate([raw[:, :, :16], raw[:, :, 48:]], -1).reshape(R, -1))
        low, sc, m, d, dmin = ref_k_weights(as_q4)
        qh = raw[:, :, 16:48].astype(np.int64)
        fifth = (qh[:, :, None, :] >> np.arange(8)[None, None, :, None]) & 1  # bit s: sub-block s
        return low | (fifth.reshape(R, -1, 256) << 4), sc, m, d, dmin
    d = raw[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qh = raw[:, :, 2:6].copy().view(np.uint32).astype(np.int64)  # bit j: element j
    qs = raw[:, :, 6:].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], -1) | (((qh >> np.arange(32)) & 1) << 4)
    return q, None, None, d, None


def reference(w, x):
    """(result, per-row sum of |terms|) from exact int64 sums of quants."""
    q, sc, m, d, dmin = ref_q5_weights(w)
    if w.type == T.Q5_K:
        xq, xd = ref_quantize_k(x)
        terms = [d * xd * np.einsum("rbi,bi->rb", sc * q, xq).astype(np.float64),
                 -dmin * xd * np.einsum("rbi,bi->rb", m, xq).astype(np.float64)]
        terms = np.concatenate(terms, 1)
    else:
        xq, xd = ref_quantize(x)
        terms = (d * xd).astype(np.float64) * np.einsum("rbj,bj->rb", q - 16, xq)
    return terms.sum(1), np.abs(terms).sum(1)


def gguf_floats(w):
    return dequantize(w.raw, w.type).reshape(w.raw.shape[0], w.k)


@pytest.mark.parametrize("t", FORMATS, ids=lambda t: t.name)
def test_reference_decodes_like_gguf(t):
    w = raw_q5(t, 5, 512, seed=9)
    q, sc, m, d, dmin = ref_q5_weights(w)
    n = BLOCK[t][0]
    deq = d[..., None] * sc * q - dmin[..., None] * m if t == T.Q5_K else d[..., None] * (q - 16)
    np.testing.assert_allclose(deq.reshape(5, 512), gguf_floats(w), rtol=1e-6, atol=1e-6)
    assert q.min() == 0 and q.max() == 31 and q.shape[-1] == n


KS = {T.Q5_K: [256, 1024, 3072], T.Q5_0: [96, 256, 544, 3072, 4128]}  # Q5_0: tails after groups of 16


@pytest.mark.parametrize("t,k", [(t, k) for t in FORMATS for k in KS[t]],
                         ids=lambda v: v.name if isinstance(v, T) else str(v))
def test_kernel_equals_integer_reference(t, k):
    w = raw_q5(t, 33, k, seed=k)
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    x[:32] *= 1000  # blocks of very different scales
    ref, scale = reference(w, x)
    p = k5.pack(w)
    got = k5.matvec(x, p)
    assert got.shape == (33,) and got.dtype == np.float32
    assert (np.abs(got - ref) <= 1e-5 * scale).all(), np.abs(got - ref).max() / scale.max()
    assert p.nbytes <= w.raw.nbytes * 1.03
    # and close to the float product with the file's weights (x's 8-bit rounding only)
    exact = gguf_floats(w).astype(np.float64) @ x
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01


@pytest.mark.parametrize("t", FORMATS, ids=lambda t: t.name)
def test_close_to_float_kernel_on_quantized_floats(t):
    # weights as the quantizer writes them (not random bytes), against today's decode path
    rng = np.random.default_rng(8)
    w = QTensor.from_f32("w", rng.standard_normal((200, 1024)).astype(np.float32), t)
    x = rng.standard_normal(1024).astype(np.float32)
    old = matmul(x[None], pack_float(w))[0]
    assert np.linalg.norm(k5.matvec(x, k5.pack(w)) - old) / np.linalg.norm(old) < 0.01


@pytest.mark.parametrize("t", FORMATS, ids=lambda t: t.name)
def test_dequant_and_take_are_gguf_exactly(t):
    w = raw_q5(t, 21, 1024 + BLOCK[t][0] * (1 if t == T.Q5_0 else 0), seed=5)  # Q5_0: one tail block
    p = k5.pack(w)
    want = gguf_floats(w)
    np.testing.assert_array_equal(k5.dequant(p), want)
    out = np.full((6, w.k), np.nan, np.float32)
    assert k5.dequant(p, 3, 9, out) is out
    np.testing.assert_array_equal(out, want[3:9])
    ids = np.array([20, 0, 7, 7])
    np.testing.assert_array_equal(k5.take(p, ids), want[ids])
    with pytest.raises(IndexError):
        k5.take(p, [21])


@pytest.mark.parametrize("t", FORMATS, ids=lambda t: t.name)
def test_expert_stack_rows_are_views(t):
    stack = raw_q5(t, 9, 512, seed=11, n_mats=3)
    p = k5.pack(stack)
    assert p.rows == 27 and p.nbytes <= stack.raw.nbytes * 1.03
    x = np.random.default_rng(2).standard_normal(512).astype(np.float32)
    e1 = p.row_slice(9, 18)
    assert all(np.shares_memory(a, getattr(p, n)) for n, a in e1.arrays().items())
    alone = k5.pack(stack.expert(1))
    np.testing.assert_array_equal(k5.matvec(x, e1), k5.matvec(x, alone))
    np.testing.assert_array_equal(k5.dequant(e1), gguf_floats(stack)[9:18])


@pytest.mark.parametrize("t", FORMATS, ids=lambda t: t.name)
def test_zero_input_and_threads(t):
    p = k5.pack(raw_q5(t, 257, 1024, seed=3))
    assert not k5.matvec(np.zeros(1024, np.float32), p).any()
    x = np.random.default_rng(4).standard_normal(1024).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = k5.matvec(x, p)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, k5.matvec(x, p))  # rows are independent: bit for bit


def test_refuses_other_formats_and_shapes():
    with pytest.raises(UnsupportedQuantType):
        k5.pack(QTensor.from_f32("w", np.ones((4, 256), np.float32), T.Q4_K))
    p = k5.pack(raw_q5(T.Q5_K, 4, 512, seed=0))
    with pytest.raises(ValueError):
        k5.matvec(np.ones(256, np.float32), p)
