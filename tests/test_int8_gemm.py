"""Prefill over the int8 layouts: dequant / take (quant/kernels/int8_dequant_cpu.py) against
gguf-py's dequantizer of the file's bytes (bit for bit), and the many-rows product
(int8_gemm_cpu.py) against a numpy reference of the same integer arithmetic and against the
decode kernels row by row (Q5_K / Q5_0: int8_q5_cpu's layouts and references, test_int8_q5.py;
their dequant is tested there)."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from test_int8_kernels import raw_k, raw_weights, ref_k_weights, ref_quantize_k, reference, reference_k
from test_int8_q5 import raw_q5, ref_q5_weights
from test_int8_q5 import reference as reference_q5

from quant.kernels import int8_cpu as k8
from quant.kernels import int8_dequant_cpu as deq
from quant.kernels import int8_gemm_cpu as gemm
from quant.kernels import int8_k_cpu as kk
from quant.kernels import int8_q5_cpu as k5

TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K]  # dequant here; the GEMM also takes Q5_K / Q5_0
GEMM_TYPES = TYPES + [T.Q5_K, T.Q5_0]
BLOCK_BYTES = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_K: 144, T.Q6_K: 210, T.Q5_K: 176, T.Q5_0: 22}
BLOCK32 = (T.Q8_0, T.Q4_0, T.Q5_0)  # x as Q8_0 per 32; the others Q8_K per 256


def module(t):
    """The layout's module: pack and the decode kernel (matvec)."""
    return k8 if t in (T.Q8_0, T.Q4_0) else k5 if t in (T.Q5_K, T.Q5_0) else kk


def make(t, rows, k, seed):
    """(file tensor, packed) with random valid bytes of type t."""
    if t in (T.Q8_0, T.Q4_0):
        w = raw_weights(t, rows, k, seed)
    elif t in (T.Q5_K, T.Q5_0):
        w = raw_q5(t, rows, k, seed)
    else:
        w = raw_k(t, rows, k, seed)
    return w, module(t).pack(w)


def shapes(t):
    ks = [256, 1024, 3072] + ([768, 544] if t in (T.Q8_0, T.Q4_0) else [])  # 768, 544: tail blocks
    return [(t, k) for k in ks]


@pytest.mark.parametrize("t,k", [s for t in TYPES for s in shapes(t)], ids=lambda v: getattr(v, "name", str(v)))
def test_dequant_equals_gguf(t, k):
    w, p = make(t, 21, k, seed=k)
    ref = gguf_dequantize(w.raw, t).reshape(21, k)
    np.testing.assert_array_equal(deq.dequant(p), ref)
    np.testing.assert_array_equal(deq.dequant(p, 5, 12), ref[5:12])
    out = np.full((3, k), np.nan, np.float32)
    assert deq.dequant(p, 18, 21, out=out) is out
    np.testing.assert_array_equal(out, ref[18:])
    ids = [20, 0, 7, 7]
    np.testing.assert_array_equal(deq.take(p, ids), ref[ids])
    assert deq.take(p, []).shape == (0, k)


def test_dequant_refuses_bad_rows_and_out():
    _, p = make(T.Q8_0, 4, 64, seed=1)
    with pytest.raises(IndexError):
        deq.take(p, [4])
    with pytest.raises(IndexError):
        deq.dequant(p, 3, 5)
    with pytest.raises(ValueError):
        deq.dequant(p, 0, 2, out=np.empty((3, 64), np.float32))


def lane_scale_k(w, x):
    """Sum of |terms| per 16 elements (the kernels' lanes, which may cancel inside a
    super-block): the size float32 rounding scales with, (n, rows)."""
    q, sc, m, d, dmin = (ref_q5_weights if w.type == T.Q5_K else ref_k_weights)(w)
    out = np.zeros((len(x), w.rows))
    for i, xi in enumerate(x):
        xq, xd = ref_quantize_k(xi)
        lanes = np.einsum("rbli,bli->rbl", (sc * q).reshape(w.rows, -1, 16, 16), xq.reshape(-1, 16, 16))
        out[i] = np.abs(d[..., None] * xd[:, None] * lanes.astype(np.float64)).sum((1, 2))
        if m is not None:
            mins = np.einsum("rbli,bli->rbl", m.reshape(w.rows, -1, 16, 16), xq.reshape(-1, 16, 16))
            out[i] += np.abs(dmin[..., None] * xd[:, None] * mins.astype(np.float64)).sum((1, 2))
    return out


def reference_rows(w, x):
    """(n, rows) result and per-entry sum of |block terms| (per 16 elements for Q4_K / Q6_K):
    the decode tests' numpy reference (x quantized as ggml does, exact int64 block sums, then
    the float scales), row by row."""
    if w.type in BLOCK32:
        pairs = [(reference_q5 if w.type == T.Q5_0 else reference)(w, xi) for xi in x]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    ref = reference_q5 if w.type == T.Q5_K else reference_k
    return np.stack([ref(w, xi)[0] for xi in x]), lane_scale_k(w, x)


def gemm_cases():
    for t in GEMM_TYPES:
        # Q8_0 / Q4_0 / Q5_0: tail blocks after the last full group of 16 (768: 8, the MoE
        # down projection's; 544: 1; 480: 15 and no full group; 256: 8 and none); Q4_K / Q5_K:
        # an odd count of super-blocks (their tiles take them in pairs, the last one alone): 1
        # and 3, the MoE down projection's k = 768
        for k in [1024, 3072] + ([768, 544, 480, 256] if t in BLOCK32 else [256, 768] if t in (T.Q4_K, T.Q5_K)
                                 else []):
            for n in (2, 5, 17, 130):
                if k == 3072 and n == 130 and t != T.Q8_0:
                    continue  # the largest once is enough (the reference is slow)
                yield t, k, n


@pytest.mark.parametrize("t,k,n", list(gemm_cases()), ids=lambda v: getattr(v, "name", str(v)))
def test_matmul_equals_integer_reference_and_decode(t, k, n):
    rows = 33  # odd: the last pair of weight rows is one row
    w, p = make(t, rows, k, seed=n + k)
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    x[:, :256] *= 1000  # blocks of very different scales
    x[n // 2, 256:512] = 0  # a zero block
    out = np.full((n, rows), np.nan, np.float32)
    assert gemm.matmul(x, p, out) is out
    ref, scale = reference_rows(w, x)
    err = np.abs(out - ref)
    assert (err <= 1e-5 * scale).all(), (err / scale).max()
    decode = np.stack([module(t).matvec(xi, p) for xi in x])
    assert (np.abs(out - decode) <= 1e-6 * scale).all()
    if t in BLOCK32 and k % 512 == 0:  # no tail blocks: the decode kernels' own arithmetic
        np.testing.assert_array_equal(out, decode)


@pytest.mark.parametrize("t", BLOCK32, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [768, 544, 480])
def test_tail_blocks_are_a_zero_padded_group(t, k):
    # the blocks after the last full group run as one more group, the missing blocks zero: so
    # the product equals, bit for bit, the one over k padded to whole groups with any finite
    # weights against zero x (each padding lane adds exactly 0, in the same lane order)
    rows, n, kp = 35, 7, -(-k // 512) * 512
    w, p = make(t, rows, k, seed=k)
    wide, _ = make(t, rows, kp, seed=k + 1)
    raw = wide.raw.copy()
    raw[:, :w.raw.shape[1]] = w.raw  # the same first k // 32 blocks, random ones after them
    wide = type(w)(w.name, t, rows, kp, raw)
    x = np.random.default_rng(k).standard_normal((n, k)).astype(np.float32)
    xp = np.concatenate([x, np.zeros((n, kp - k), np.float32)], 1)
    for vnni in {False, gemm.vnni_available()}:
        got = gemm.matmul(x, p, np.empty((n, rows), np.float32), vnni=vnni)
        np.testing.assert_array_equal(got, gemm.matmul(xp, module(t).pack(wide), np.empty((n, rows), np.float32),
                                                       vnni=vnni))
    ref, scale = reference_rows(w, x)
    assert (np.abs(got - ref) <= 1e-5 * scale).all()


UNIT_TYPES = [T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q5_0]  # the tiles with a VNNI path


@pytest.mark.parametrize("t", UNIT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 7])  # tiles of NX = 4 x rows, the last one partial
def test_generic_and_vnni_paths(t, n):
    # the generic tiles (vpmaddubsw) against the reference on every host, and, where the CPU
    # has AVX512-VNNI, the vpdpbusd tiles against them bit for bit (both sum integers exactly,
    # then scale in the same float order)
    k = 768 if t in BLOCK32 else 512  # Q4_0 / Q5_0: a tail block after the full group
    rows = 35  # tasks of RT = 32 rows and pairs: the last task holds 3, the last pair 1
    w, p = make(t, rows, k, seed=11 + n)
    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    generic = gemm.matmul(x, p, np.full((n, rows), np.nan, np.float32), vnni=False)
    ref, scale = reference_rows(w, x)
    assert (np.abs(generic - ref) <= 1e-5 * scale).all()
    if not gemm.vnni_available():
        pytest.skip("no AVX512-VNNI here: the generic path only")
    np.testing.assert_array_equal(gemm.matmul(x, p, np.empty((n, rows), np.float32), vnni=True), generic)
    np.testing.assert_array_equal(gemm.matmul(x, p, np.empty((n, rows), np.float32)), generic)


def test_vnni_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("QWEN3CLI_NO_VNNI", "1")
    assert not gemm.vnni_available()
    monkeypatch.setenv("QWEN3CLI_NO_VNNI", "0")
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,-avx512vnni")
    assert not gemm.vnni_available()  # numba's target, not the host, decides
    from quant.kernels.int8_tiles_cpu import avx2_available

    assert avx2_available()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse4.2,+avx512vnni,+avx512bw")
    assert not avx2_available() and gemm.vnni_available()  # the parse is cached per feature string


@pytest.mark.parametrize("t", GEMM_TYPES, ids=lambda t: t.name)
def test_matmul_threads_and_zero_input(t):
    _, p = make(t, 70, 1024, seed=5)
    x = np.random.default_rng(6).standard_normal((9, 1024)).astype(np.float32)
    two = gemm.matmul(x, p, np.empty((9, 70), np.float32))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = gemm.matmul(x, p, np.empty((9, 70), np.float32))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)  # entries are independent: bit for bit
    assert not gemm.matmul(np.zeros((3, 1024), np.float32), p, np.empty((3, 70), np.float32)).any()


def k_layout_index(k, pairs):
    """Where each byte of quantize_rows' K-quant layout comes from in x's own order, written
    from the layouts' descriptions (independently of the kernels' loops). Q6_K: unit c of a
    super-block, byte 4t + 2h + e = value 16t + 2c + 8h + e. Q4_K / Q5_K: pairs of super-blocks,
    unit u, lane L, byte 4L + 2h + e = value 16(2(L % 8) + u // 4) + 2(u % 4) + 8h + e of
    super-block L // 8 of the pair; an odd count's last super-block alone, unit c, lane L =
    value 16(2(L % 8) + L // 8) + 2c + 8h + e."""
    nsb = k // 256
    c, t, h, e = np.meshgrid(range(4), range(16), range(2), range(2), indexing="ij")
    if not pairs:
        one = (16 * t + 2 * c + 8 * h + e).reshape(-1)
        return np.concatenate([b * 256 + one for b in range(nsb)])
    u, lane, h2, e2 = np.meshgrid(range(8), range(16), range(2), range(2), indexing="ij")
    within = 16 * (2 * (lane % 8) + u // 4) + 2 * (u % 4) + 8 * h2 + e2
    idx = [(2 * p + lane // 8) * 256 + within for p in range(nsb // 2)]
    if nsb % 2:  # here t is the lane L
        idx.append((nsb - 1) * 256 + 16 * (2 * (t % 8) + t // 8) + 2 * c + 8 * h + e)
    return np.concatenate([i.reshape(-1) for i in idx])


@pytest.mark.parametrize("t", [T.Q6_K, T.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 768, 1024])
def test_k_rows_quantize_as_decode_does(t, k):
    # the prefill's vectorised Q8_K (int8_gemm_cpu._q8_k_natural) against decode's quantizer,
    # row by row: the same quants (in the layout's order), scales and sums, on the edges of
    # its rounding and its maximum search
    rng = np.random.default_rng(k)
    x = rng.standard_normal((12, k)).astype(np.float32)
    x[1, 7] = np.nan
    x[2, k - 1] = -np.inf
    x[3] = 0
    x[4, :256] = np.round(x[4, :256] * 4) / 4  # many ties at .25 / .5 steps
    x[4, 9], x[4, 200] = 3.0, -3.0  # the largest magnitude twice, signs apart: the first wins
    x[4, :256] = np.clip(x[4, :256], -3, 3)
    x[5, :256] = 127 / 254  # x * iscale at exactly -0.5 * ... ties of the rounding
    x[5, 0] = -1
    x[6, 256 % k:] *= 1e30
    x[7, :256] = 1e-40  # subnormal: iscale overflows
    x[8, :] = -0.0
    xq, xd, xs = gemm.quantize_rows(x, make(t, 1, k, seed=1)[1], nx=4)
    pairs = t != T.Q6_K
    idx = k_layout_index(k, pairs)
    for i, row in enumerate(x):
        q16, d, s = kk.quantize_x(row)
        pos = np.arange(k) % 256  # decode's order within each super-block (int8_k_cpu)
        natural = q16[np.arange(k) - pos + ((pos & 15) >> 1) * 32 + 2 * (pos >> 4) + (pos & 1)].astype(np.int8)
        if i == 7:
            continue  # a subnormal maximum: decode's rounding of an infinite iscale is undefined
        np.testing.assert_array_equal(xq[i], natural[idx])
        if pairs:
            full = k // 512 * 2  # super-blocks in pairs; an odd count's last has 16 lanes
            np.testing.assert_array_equal(xd[i, :8 * full], np.repeat(d[:full], 8))
            np.testing.assert_array_equal(xs[i, :8 * full], s[:16 * full].reshape(-1, 2).sum(1))
            if full < k // 256:
                np.testing.assert_array_equal(xd[i, 8 * full:], np.repeat(d[full:], 16))
                lanes = np.arange(16)
                np.testing.assert_array_equal(xs[i, 8 * full:], s[16 * full + 2 * (lanes % 8) + lanes // 8])
        else:
            np.testing.assert_array_equal(xd[i], d)
            np.testing.assert_array_equal(xs[i], s)
    assert np.isnan(xd[1, 0]) and np.isnan(xd[2]).any()  # and equal to decode's, above
    assert np.abs(xq[7]).max() == 127  # the subnormal block: still quants in range, not garbage


def test_matmul_refuses_bad_shapes():
    _, p = make(T.Q4_0, 4, 512, seed=2)
    with pytest.raises(ValueError):
        gemm.matmul(np.ones((3, 256), np.float32), p, np.empty((3, 4), np.float32))
    with pytest.raises(ValueError):
        gemm.matmul(np.ones((3, 512), np.float32), p, np.empty((4, 3), np.float32))


QUANT_BYTES = {T.Q8_0: slice(2, 34), T.Q4_0: slice(2, 18), T.Q4_K: slice(16, 144), T.Q6_K: slice(0, 192),
               T.Q5_K: slice(16, 176), T.Q5_0: slice(2, 22)}  # Q5: the fifth bits and the nibbles


@pytest.mark.parametrize("t", GEMM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("sign", [1, -1])
def test_matmul_largest_quants(t, sign):
    # every weight quant at its largest magnitude (Q8_0: -128; 4 / 5 / 6 bits: 15 / 31 / 63)
    # against x quantized to +-127 everywhere: the widest integer sums the kernels hold in int16
    # (Q4_0: 8 vpmaddubsw results, 30480; Q5: 4, 31496; Q6_K: 2, 32004)
    w, _ = make(t, 9, 1024, seed=3)
    raw = w.raw.reshape(9, -1, BLOCK_BYTES[t])
    raw[:, :, QUANT_BYTES[t]] = 0x80 if t == T.Q8_0 else 0xFF
    p = module(t).pack(w)
    x = np.full((6, 1024), sign, np.float32)
    ref, scale = reference_rows(w, x)
    out = gemm.matmul(x, p, np.empty((6, 9), np.float32))
    assert (np.abs(out - ref) <= 1e-5 * scale).all()


@pytest.mark.parametrize("t", GEMM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activation_is_not_rounded_away(t, bad):
    # the int8 path quantizes x: a NaN must not vanish into an int (max() passes it over), or
    # corrupt weights would give finite, wrong logits instead of the engine's NaN error
    from quant.formats import FORMATS
    from quant.kernels.layouts import INT8, Mat
    from quant.kernels.matmul_cpu import matmul, matmul_experts, pack
    from quant.qtensor import QTensor

    rng = np.random.default_rng(3)
    k, rows = 512, 16
    n_mats = 2 if INT8[t].experts else 1  # a stack without an experts kernel stays exact
    raw = FORMATS[t].quantize(rng.standard_normal((n_mats * rows, k)).astype(np.float32))
    stack = pack(QTensor("w", t, rows, k, raw, n_mats), exact=False)
    w = stack.expert(n_mats - 1)
    assert isinstance(w, Mat) and w.layout.prefill is not None
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[:, 100] = bad
    assert np.isnan(matmul(x[:1], w)).all()  # decode
    assert np.isnan(matmul(x, w)).all()  # prefill
    if n_mats == 2:
        assert np.isnan(matmul_experts(x[:2], stack, np.array([0, 1]), np.array([0, 1]))).all()
