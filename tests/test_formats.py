"""Codecs against gguf-py: quantized bytes identical, decoders identical, loss within bounds."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as ref

from quant.errors import UnsupportedQuantType
from quant.formats import FORMATS, get_format
from quant.kernels.quantize_cpu import fp16_round


def _hard_rows(rng, k):
    """Random rows plus the cases where rounding rules differ: zeros, ties, signs, spikes."""
    rows = [
        rng.standard_normal(k),
        rng.standard_normal(k) * 1e-3,
        rng.uniform(-1, 1, k) * 300.0,
        np.zeros(k),
        np.full(k, -2.5),
        np.round(rng.standard_normal(k) * 8) / 8,  # many exact .5 steps after scaling
        np.where(rng.random(k) < 0.05, 50.0, rng.standard_normal(k)),
        -np.abs(rng.standard_normal(k)),
        np.tile([127.0, 63.5, -63.5, 0.5, -0.5, 1.0, 0.0, 2.0], k // 8),
        rng.standard_normal(k) * 1e-20,  # below ggml's GROUP_MAX_EPS in K-quants
    ]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.BF16, T.F16, T.F32])
def test_encode_bytes_equal_gguf_py(qtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([_hard_rows(rng, 512), rng.standard_normal((37, 512)).astype(np.float32)])
    ours = FORMATS[qtype].encode(x)
    theirs = ref.quantize(x, qtype)
    assert ours.shape == (x.shape[0], FORMATS[qtype].row_bytes(512))
    assert np.array_equal(ours, np.ascontiguousarray(theirs).view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q6_K, T.BF16, T.F16, T.F32])
def test_decode_equals_gguf_py(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 768)).astype(np.float32)
    raw = FORMATS[qtype].encode(x)
    ours = FORMATS[qtype].decode(raw, 768)
    theirs = ref.dequantize(raw if qtype not in (T.F32, T.F16) else raw.view({T.F32: np.float32, T.F16: np.float16}[qtype]), qtype)
    np.testing.assert_array_equal(ours, np.asarray(theirs, np.float32).reshape(ours.shape))


@pytest.mark.parametrize(
    "qtype,bound",
    [
        # half a step, plus what storing the scale as fp16 costs at the largest quant
        (T.Q8_0, lambda blk: np.abs(blk).max(-1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-6),
        # the side opposite the max clips at +7 steps: one full step at worst
        (T.Q4_0, lambda blk: np.abs(blk).max(-1, keepdims=True) / 8 * (1 + 15 * 2.0**-11) + 1e-6),
        (T.Q6_K, lambda blk: np.abs(blk).max(-1, keepdims=True) / 31 * 1.6 + 1e-6),
    ],
)
def test_quantization_error_within_format_bound(qtype, bound):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 1024)).astype(np.float32) * rng.uniform(0.01, 3, (64, 1))
    fmt = FORMATS[qtype]
    y = fmt.decode(fmt.encode(x), 1024)
    sub = 16 if qtype == T.Q6_K else 32
    err = np.abs(y - x).reshape(64, -1, sub)
    assert (err <= bound(x.reshape(64, -1, sub))).all()
    # and it is a real quantizer, not a pass-through
    assert 0 < np.abs(y - x).mean() < 0.1 * np.abs(x).mean()


def test_q6_k_edge_blocks_decode_sanely():
    rng = np.random.default_rng(3)
    x = _hard_rows(rng, 256)
    fmt = FORMATS[T.Q6_K]
    y = fmt.decode(fmt.encode(x), 256)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[3], 0)  # all-zero block
    np.testing.assert_array_equal(y[9], 0)  # below GROUP_MAX_EPS
    scale = np.abs(x).max(-1, keepdims=True)
    assert (np.abs(y - x) <= scale / 20 + 1e-6).all()


def test_fp16_round_matches_numpy():
    rng = np.random.default_rng(4)
    v = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
        [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 6.1e-5],
        (np.arange(2048) + 0.5) * 2.0**-24,  # subnormal ties
        1 + (np.arange(64) + 0.5) * 2.0**-10,  # normal ties
    ]).astype(np.float32)
    ours = np.array([fp16_round(np.float32(a)) for a in v], np.float32)
    with np.errstate(over="ignore"):
        expected = v.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours, expected)


def test_unsupported_type_is_an_error_not_zeros():
    with pytest.raises(UnsupportedQuantType, match="blk.0.attn_q.weight: GGML type IQ2_XXS"):
        get_format(T.IQ2_XXS, "blk.0.attn_q.weight")
    with pytest.raises(UnsupportedQuantType, match="multiple of 32"):
        FORMATS[T.Q8_0].row_bytes(100)


READ_ONLY = [T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K]


@pytest.mark.parametrize("qtype", READ_ONLY, ids=lambda t: t.name)
def test_read_only_decoders_equal_gguf_py_bit_for_bit(qtype):
    import warnings

    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    k, n = block * 3, 64
    cases = [rng.integers(0, 256, (n, k // block * size), dtype=np.uint8),  # any bytes (inf/nan scales too)
             np.zeros((2, k // block * size), np.uint8)]
    # realistic: every fp16 field a finite value of varied magnitude (tiny to huge)
    sane = cases[0].copy().reshape(n, -1, size)
    halves = (rng.standard_normal((n, sane.shape[1], size // 2)) * 10.0 ** rng.integers(-6, 4, (n, 1, 1)))
    h16 = halves.astype(np.float16).view(np.uint8)
    mask = rng.random(sane.shape) < 0.5
    cases.append(np.where(mask, sane, h16.reshape(sane.shape)).reshape(n, -1))
    for raw in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = ref.dequantize(raw, qtype).reshape(raw.shape[0], k)
            ours = FORMATS[qtype].decode(raw, k)
        assert ours.dtype == np.float32
        assert np.array_equal(ours, want, equal_nan=True)
    assert (FORMATS[qtype].encode is None) == (qtype in (T.Q2_K, T.Q3_K))  # the others are also written


@pytest.mark.parametrize("qtype,bound", [(T.Q4_K, 0.085), (T.Q5_K, 0.042), (T.Q5_0, 0.06)])
def test_k_quant_writers_round_trip_and_error(qtype, bound):
    # ggml's Q4_K search (make_qkx2_quants); bytes equal libggml's in tests/test_llamacpp.py.
    # Here: it decodes back within the format's error, beats a plain min/max 4-bit grid, and
    # edge rows (zeros, constant, one outlier) behave.
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal((64, 512)).astype(np.float32),
                        np.zeros((1, 512), np.float32), np.full((1, 512), 3.5, np.float32),
                        np.where(np.arange(512) == 7, 100.0, 0.01).astype(np.float32)[None]])
    fmt = FORMATS[qtype]
    y = fmt.decode(fmt.encode(x), 512)
    err = np.sqrt(np.mean((y[:64] - x[:64]) ** 2))
    g = x[:64].reshape(64, -1, 32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    levels = 15 if qtype == T.Q4_K else 31
    naive = np.round((g - lo) / (hi - lo) * levels) / levels * (hi - lo) + lo
    assert err < bound  # N(0, 1) rows; llama.cpp's own quantizer gives the same bytes (test_llamacpp)
    if qtype != T.Q5_0:  # the K-quants' search beats a plain min/max grid (Q5_0 has no minimum)
        assert err < np.sqrt(np.mean((naive.reshape(64, 512) - x[:64]) ** 2))
    assert np.array_equal(y[64], x[64])
    assert np.abs(y[65] - 3.5).max() < 0.05
    assert abs(y[66, 7] - 100.0) < 2.0


WEIGHTED = [T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_imatrix_weighting_lowers_the_weighted_error(qtype):
    # bytes equal libggml's with the same importance in tests/test_llamacpp.py; here, that the
    # importance steers the search: columns that matter come out closer than without it
    rng = np.random.default_rng(3)
    k = 512
    x = (rng.standard_normal((64, k)) * rng.uniform(0.01, 1, (64, 1))).astype(np.float32)
    qw = rng.lognormal(0, 2, k).astype(np.float32)
    fmt = FORMATS[qtype]

    def weighted_error(raw):
        return float((qw * (fmt.decode(raw, k) - x) ** 2).sum())

    weighted = fmt.quantize(x, qw)
    assert weighted_error(weighted) < 0.75 * weighted_error(fmt.quantize(x))  # measured 0.34-0.57
    assert weighted_error(weighted) < 0.75 * weighted_error(fmt.encode(x))
    rel = np.sqrt(((fmt.decode(weighted, k) - x) ** 2).mean() / (x ** 2).mean())
    assert rel < {T.Q6_K: 0.03, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q5_K: 0.06}.get(qtype, 0.12)
    zeros = np.zeros((2, k), np.float32)
    assert not fmt.decode(fmt.quantize(zeros, qw), k).any()


def test_q8_0_ignores_the_importance_like_ggml():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = FORMATS[T.Q8_0]
    assert np.array_equal(q8.quantize(x, np.arange(64, dtype=np.float32)), q8.encode(x))
