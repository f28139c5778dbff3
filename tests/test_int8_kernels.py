"""The int8-activation decode kernels (quant/kernels/int8_cpu.py) against a numpy reference of
the same arithmetic: ggml's Q8_0 rounding of x, exact integer block sums, one float scale per
block. The references decode the GGUF bytes and place elements themselves (from the layout the
module's docstring describes), so a wrong lane, nibble or rounding shows up here."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant.kernels import int8_cpu as k8
from quant.kernels.matmul_cpu import matmul, pack as pack_float
from quant.qtensor import QTensor

G = 16
BLOCK = {T.Q8_0: 34, T.Q4_0: 18}


def kernel_order(nb):
    """Position in the kernels' activation array of element j of block b: pair step j // 2 of a
    group of 16 blocks (lane b % 16), or in place after the last full group."""
    b, j = np.arange(nb)[:, None], np.arange(32)[None, :]
    grouped = (b // G) * 32 * G + (j // 2) * 2 * G + 2 * (b % G) + j % 2
    return np.where(b < nb // G * G, grouped, b * 32 + j)


def ref_quantize(x):
    """ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1 / d)), all float32."""
    xb = x.reshape(-1, 32)
    d = (np.abs(xb).max(1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (xb * inv[:, None]).astype(np.float32).astype(np.float64)
    q = np.trunc(v + np.copysign(0.5, v)).astype(np.int64)  # half away from zero
    return q, d


def raw_weights(t, rows, k, seed):
    """Random file bytes: every quant value (Q8_0's -128 too), finite fp16 scales of mixed sign."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    raw = rng.integers(0, 256, (rows, nb, BLOCK[t]), dtype=np.uint8)
    raw[:, :, :2] = (rng.standard_normal((rows, nb, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return QTensor("w", t, rows, k, raw.reshape(rows, -1))


def ref_weights(w):
    """(integer quants (rows, nb, 32), float32 scales (rows, nb)) straight from the bytes."""
    b = w.raw.reshape(w.rows, w.k // 32, BLOCK[w.type])
    d = b[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    if w.type == T.Q8_0:
        q = b[:, :, 2:].view(np.int8).astype(np.int64)
    else:
        q = np.concatenate([b[:, :, 2:] & 15, b[:, :, 2:] >> 4], axis=-1).astype(np.int64) - 8
    return q, d


def reference(w, x):
    """(result, per-row sum of |block terms|) with exact integer block sums."""
    wq, wd = ref_weights(w)
    xq, xd = ref_quantize(x)
    isum = np.einsum("rbj,bj->rb", wq, xq)  # int64: exact
    terms = (wd * xd).astype(np.float64) * isum
    return terms.sum(1), np.abs(terms).sum(1)


def test_quantizer_rounds_like_ggml():
    # block 0: amax 127 -> d = 1 exactly, so x * (1/d) lands on .5: roundf goes away from zero
    # (np.rint would give 2, -2, 0, -0, 4); block 1 is zero: d = 0, quants 0
    x = np.zeros(64, np.float32)
    x[:6] = [127, 2.5, -2.5, 0.5, -0.5, 3.5]
    xq, xd, xs = k8.quantize_x(x)
    order = kernel_order(2)
    assert list(xq[order[0, :6]]) == [127, 3, -3, 1, -1, 4]
    assert xd[0] == 1 and xd[1] == 0 and not xq[order[1]].any()
    assert xs[0] == 127 + 3 - 3 + 1 - 1 + 4 and xs[1] == 0


@pytest.mark.parametrize("k", [32, 96, 512, 544, 1024, 4096, 4128])
def test_quantizer_equals_reference(k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal(k) * rng.uniform(0.01, 100, k // 32).repeat(32)).astype(np.float32)
    x[64:96] = 0  # a zero block when there is one
    xq, xd, xs = k8.quantize_x(x)
    q, d = ref_quantize(x)
    assert xq.dtype == np.int16
    np.testing.assert_array_equal(xq[kernel_order(k // 32)], q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, q.sum(1))
    assert np.abs(q).max() <= 127


SHAPES = [(1, 32), (7, 64), (5, 480), (33, 512), (300, 544), (65, 1024), (3, 4096), (2, 4128)]


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", SHAPES)
def test_kernel_equals_integer_reference(t, rows, k):
    w = raw_weights(t, rows, k, seed=rows * k)
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    x[:32] *= 1000  # blocks of very different scales
    ref, scale = reference(w, x)
    got = k8.matvec(x, k8.pack(w))
    assert got.shape == (rows,) and got.dtype == np.float32
    assert (np.abs(got - ref) <= 1e-5 * scale).all(), np.abs(got - ref).max() / scale.max()


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_layout_costs_the_file_size(t):
    w = raw_weights(t, 9, 1056, seed=1)
    assert k8.pack(w).nbytes == w.raw.nbytes


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(300, 1024), (77, 2080)])
def test_close_to_float_kernel(t, rows, k):
    # what the int8 path changes for a model: x rounded to 8 bits, ~0.5% of the output's size
    rng = np.random.default_rng(7)
    w = QTensor.from_f32("w", rng.standard_normal((rows, k)).astype(np.float32), t)
    x = rng.standard_normal(k).astype(np.float32)
    old = matmul(x[None], pack_float(w))[0]
    new = k8.matvec(x, k8.pack(w))
    assert np.linalg.norm(new - old) / np.linalg.norm(old) < 0.01


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_zero_input_and_threads(t):
    p = k8.pack(raw_weights(t, 257, 1056, seed=3))
    assert not k8.matvec(np.zeros(1056, np.float32), p).any()
    x = np.random.default_rng(4).standard_normal(1056).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = k8.matvec(x, p)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, k8.matvec(x, p))  # rows are independent: bit for bit


def test_refuses_other_formats_and_shapes():
    w = QTensor.from_f32("w", np.ones((4, 256), np.float32), T.Q6_K)
    with pytest.raises(ValueError):
        k8.pack(w)
    p = k8.pack(raw_weights(T.Q8_0, 4, 64, seed=0))
    with pytest.raises(ValueError):
        k8.matvec(np.ones(32, np.float32), p)


def quad_order_0(nb):
    """Position in the Q4_0 VNNI kernel's x of element j of block b: quad step j // 4 of a group
    (lane b % 16), or in place after the last full group."""
    b, j = np.arange(nb)[:, None], np.arange(32)[None, :]
    grouped = (b // G) * 32 * G + (j // 4) * 4 * G + 4 * (b % G) + j % 4
    return np.where(b < nb // G * G, grouped, b * 32 + j)


@pytest.mark.parametrize("k", [32, 512, 544, 2048])
def test_quantizer_quad_layout(k):
    x = np.random.default_rng(k + 2).standard_normal(k).astype(np.float32)
    q, d = ref_quantize(x)
    xq, xd, xs = k8.quantize_x(x, quad=True)
    assert xq.dtype == np.int8
    np.testing.assert_array_equal(xq[quad_order_0(k // 32)], q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, q.sum(1))


VNNI = __import__("quant.kernels.int8_tiles_cpu", fromlist=["x"]).vnni_available()


@pytest.mark.skipif(not VNNI, reason="the CPU has no AVX512-VNNI")
@pytest.mark.parametrize("rows,k", [(1, 512), (33, 1024), (300, 2048), (64, 6144)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_q4_0_vnni_decode_equals_generic_bit_for_bit(rows, k, n):
    """The vpdpbusd kernel sums the same integers: lone rows (_mv1) and batched rows (rows_body) alike."""
    raw = raw_weights(T.Q4_0, rows, k, seed=rows * k)
    w = k8.pack(raw)
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    x[:, :32] *= 1000
    generic = k8.matvec_rows(x, w, vnni=False, avx2=False)
    vnni = k8.matvec_rows(x, w, vnni=True)
    np.testing.assert_array_equal(vnni, generic)
    ref, scale = reference(raw, x[0])
    assert (np.abs(vnni[0] - ref) <= 1e-5 * scale).all()


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("k", [544, 1056])
def test_q4_0_vnni_leaves_rows_with_a_tail_to_the_generic_kernel(k, isa):
    raw = raw_weights(T.Q4_0, 17, k, seed=k)
    x = np.random.default_rng(k).standard_normal((2, k)).astype(np.float32)
    got = k8.matvec_rows(x, k8.pack(raw), vnni=isa == "vnni", avx2=isa == "avx2")
    ref, scale = reference(raw, x[1])
    assert (np.abs(got[1] - ref) <= 1e-5 * scale).all()


AVX2 = __import__("quant.kernels.int8_tiles_cpu", fromlist=["x"]).avx2_available()


@pytest.mark.skipif(not AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("rows,k", [(1, 512), (33, 1024), (300, 2048), (64, 6144)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_q4_0_avx2_decode_equals_generic_bit_for_bit(rows, k, n):
    """The vpmaddubsw kernel sums the same integers (in i16 over 8 steps, which nibbles all 15
    against x's quants all 127 test): lone rows and batched rows alike."""
    raw = raw_weights(T.Q4_0, rows, k, seed=rows * k + 2)
    for b in range(16):  # group 0: every nibble 15
        raw.raw[:, 18 * b + 2:18 * b + 18] = 0xFF
    w = k8.pack(raw)
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    x[:, :512] = 1.0
    generic = k8.matvec_rows(x, w, vnni=False, avx2=False)
    avx2 = k8.matvec_rows(x, w, vnni=False, avx2=True)
    np.testing.assert_array_equal(avx2, generic)
    ref, scale = reference(raw, x[0])
    assert (np.abs(avx2[0] - ref) <= 1e-5 * scale).all()


# -- Q4_K and Q6_K, x quantized as ggml's Q8_K --------------------------------------------

from quant.kernels import int8_k_cpu as kk  # noqa: E402

KBLOCK = {T.Q4_K: 144, T.Q6_K: 210}


def k_order(nsb):
    """Position of element i of super-block b: pair step (i % 16) // 2, lane i // 16."""
    b, i = np.arange(nsb)[:, None], np.arange(256)[None, :]
    return b * 256 + (i % 16) // 2 * 32 + 2 * (i // 16) + i % 2


def ref_quantize_k(x):
    """ggml's quantize_row_q8_K_ref: the signed value of largest |x| maps to -127, nearest_int
    (half to even), clamped at 127; d = 1 / iscale."""
    xb = x.reshape(-1, 256)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(1)]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, 0).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, 0).astype(np.float32)
    q = np.minimum(127, np.rint((xb * iscale[:, None]).astype(np.float32))).astype(np.int64)
    return q, d


def raw_k(t, rows, k, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // 256, KBLOCK[t]), dtype=np.uint8)
    h = lambda n: (rng.standard_normal((rows, k // 256, n)) * 0.01).astype(np.float16).view(np.uint8)  # noqa: E731
    if t == T.Q4_K:
        raw[:, :, :4] = h(2)  # d, dmin
    else:
        raw[:, :, 208:] = h(1)
    return QTensor("w", t, rows, k, raw.reshape(rows, -1))


def ref_k_weights(w):
    """Integer quants (rows, nsb, 256), integer scales per element's sub-block, float scales."""
    raw = w.raw.reshape(w.rows, w.k // 256, KBLOCK[w.type])
    b = raw.astype(np.int64)
    f16 = lambda i: raw[:, :, i:i + 2].copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    if w.type == T.Q4_K:
        s = b[:, :, 4:16]
        sc = np.concatenate([s[..., :4] & 63, (s[..., 8:] & 15) | ((s[..., :4] >> 6) << 4)], -1)
        m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[:, :, 16:].reshape(w.rows, -1, 4, 32)
        q = np.stack([qs & 15, qs >> 4], 3).reshape(w.rows, -1, 256)  # sub-block 2c low, 2c + 1 high
        return q, sc.repeat(32, -1), m.repeat(32, -1), f16(0), f16(2)
    ql, qh = b[:, :, :128].reshape(w.rows, -1, 2, 64), b[:, :, 128:192].reshape(w.rows, -1, 2, 32)
    quarters = [(ql[..., :32] & 15) | ((qh & 3) << 4), (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
                (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]
    q = np.stack(quarters, 3).reshape(w.rows, -1, 256) - 32
    sc = b[:, :, 192:208].astype(np.uint8).view(np.int8).astype(np.int64)
    return q, sc.repeat(16, -1), None, f16(208), None


def reference_k(w, x):
    q, sc, m, d, dmin = ref_k_weights(w)
    xq, xd = ref_quantize_k(x)
    terms = d * xd * np.einsum("rbi,bi->rb", sc * q, xq).astype(np.float64)
    if m is not None:
        terms = np.concatenate([terms, -dmin * xd * np.einsum("rbi,bi->rb", m, xq).astype(np.float64)], 1)
    return terms.sum(1), np.abs(terms).sum(1)


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_k_reference_decodes_like_the_codec(t):
    w = raw_k(t, 5, 512, seed=9)
    q, sc, m, d, dmin = ref_k_weights(w)
    deq = d[..., None] * sc * q - (0 if m is None else dmin[..., None] * m)
    np.testing.assert_allclose(deq.reshape(5, 512), w.dequant(), rtol=1e-6, atol=1e-6)


def test_k_quantizer_rounds_like_ggml():
    # super-block 0: max -127 -> iscale 1; 1: max +127 -> iscale -1 (d negative); ties go to
    # even (np.floor(v + 0.5) would give 3, -3, 1 / -2); 2 is zero
    x = np.zeros(768, np.float32)
    x[:4] = [-127, 2.5, -3.5, 0.5]
    x[256:258] = [127, 2.5]
    xq, xd, xs = kk.quantize_x(x)
    order = k_order(3)
    assert list(xq[order[0, :4]]) == [-127, 2, -4, 0] and list(xq[order[1, :2]]) == [-127, -2]
    assert list(xd) == [1, -1, 0]
    assert xs[0] == -127 + 2 - 4 and xs[16] == -129 and not xs[32:].any()


@pytest.mark.parametrize("k", [256, 1024, 4096])
def test_k_quantizer_equals_reference(k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal(k) * rng.uniform(0.01, 100, k // 256).repeat(256)).astype(np.float32)
    xq, xd, xs = kk.quantize_x(x)
    q, d = ref_quantize_k(x)
    np.testing.assert_array_equal(xq[k_order(k // 256)], q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, q.reshape(-1, 16).sum(1))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 256), (7, 512), (33, 768), (300, 1024), (3, 4096)])
def test_k_kernel_equals_integer_reference(t, rows, k):
    w = raw_k(t, rows, k, seed=rows + k)
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    x[:256] *= 1000
    ref, scale = reference_k(w, x)
    p = kk.pack(w)
    got = kk.matvec(x, p)
    assert (np.abs(got - ref) <= 1e-5 * scale).all(), np.abs(got - ref).max() / scale.max()
    assert p.nbytes <= w.raw.nbytes * 1.03


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_k_close_to_float_kernel(t):
    rng = np.random.default_rng(8)
    w = QTensor.from_f32("w", rng.standard_normal((200, 1024)).astype(np.float32), t)
    x = rng.standard_normal(1024).astype(np.float32)
    old = matmul(x[None], pack_float(w))[0]
    assert np.linalg.norm(kk.matvec(x, kk.pack(w)) - old) / np.linalg.norm(old) < 0.01


def quad_order(nsb):
    """Position of element i of super-block b in the VNNI kernel's x: quad step (i % 16) // 4, lane i // 16."""
    b, i = np.arange(nsb)[:, None], np.arange(256)[None, :]
    return b * 256 + (i % 16) // 4 * 64 + 4 * (i // 16) + i % 4


@pytest.mark.parametrize("k", [256, 2048])
def test_k_quantizer_quad_layout(k):
    rng = np.random.default_rng(k + 1)
    x = rng.standard_normal(k).astype(np.float32)
    xq, xd, xs = kk.quantize_x(x)
    q8, d8, s8 = kk.quantize_x(x, quad=True)
    assert q8.dtype == np.int8
    np.testing.assert_array_equal(q8[quad_order(k // 256)], xq[k_order(k // 256)])
    np.testing.assert_array_equal(d8, xd)
    np.testing.assert_array_equal(s8, xs)


@pytest.mark.skipif(not VNNI,
                    reason="the CPU has no AVX512-VNNI")
@pytest.mark.parametrize("rows,k", [(1, 256), (33, 768), (300, 1024), (64, 6144)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_q4_k_vnni_decode_equals_generic_bit_for_bit(rows, k, n):
    """The vpdpbusd kernel sums the same integers: lone rows (_mv1) and batched rows (rows_body) alike."""
    w = kk.pack(raw_k(T.Q4_K, rows, k, seed=rows * k))
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    x[:, :256] *= 1000
    generic = kk.matvec_rows(x, w, vnni=False, avx2=False)
    vnni = kk.matvec_rows(x, w, vnni=True)
    np.testing.assert_array_equal(vnni, generic)
    ref, scale = reference_k(raw_k(T.Q4_K, rows, k, seed=rows * k), x[0])
    assert (np.abs(vnni[0] - ref) <= 1e-5 * scale).all()


@pytest.mark.skipif(not AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 256), (33, 768), (300, 1024), (64, 6144)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_k_avx2_decode_equals_generic_bit_for_bit(t, rows, k, n):
    """The vpmaddubsw kernels sum the same integers (in i16 over a window, which the weights'
    largest quants against x's -127 test): lone rows and batched rows alike."""
    raw = raw_k(t, rows, k, seed=rows * k + 1)
    raw.raw[:, slice(16, 144) if t == T.Q4_K else slice(0, 192)] = 0xFF  # super-block 0: quants 15 / 63
    w = kk.pack(raw)
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    x[:, :256] = 1.0  # quants all -127: Q4_K lane sums -30480, Q6_K windows -32004, i16's extremes
    x[:, 256:512] *= 1000
    generic = kk.matvec_rows(x, w, vnni=False, avx2=False)
    avx2 = kk.matvec_rows(x, w, vnni=False, avx2=True)
    np.testing.assert_array_equal(avx2, generic)
    ref, scale = reference_k(raw, x[0])
    # float32 rounds each lane's term; lanes cancel within the x1000 block, so the bound is
    # looser than the blocks' sum |terms| alone gives (1.2e-5 of it seen)
    assert (np.abs(avx2[0] - ref) <= 1e-4 * scale).all()


def test_q4_k_pairs8_layout_is_the_int16_one():
    x = np.random.default_rng(3).standard_normal(1024).astype(np.float32)
    q16, d16, s16 = kk.quantize_x(x)
    q8, d8, s8 = kk.quantize_x(x, pairs8=True)
    assert q8.dtype == np.int8
    np.testing.assert_array_equal(q8, q16)
    np.testing.assert_array_equal(d8, d16)
    np.testing.assert_array_equal(s8, s16)
