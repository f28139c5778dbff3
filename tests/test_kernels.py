"""CPU matmul kernels against the numpy reference codecs: every format, odd shapes, 1..40 rows
of x (decode kernels and the dequantize + BLAS path), one thread and all threads."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant.formats import FORMATS
from quant.kernels.matmul_cpu import SMALL_N, Packed, matmul, pack
from quant.qtensor import QTensor

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q6_K, T.Q4_K, T.Q5_K, T.Q4_1, T.Q5_0, T.Q2_K, T.Q3_K]


def weights(t, rows, k, seed=0):
    rng = np.random.default_rng(seed)
    if FORMATS[t].encode is None:  # formats we only read: random blocks with sane fp16 scales
        block, size = FORMATS[t].block_size, FORMATS[t].type_size
        raw = rng.integers(0, 256, (rows, k // block, size), dtype=np.uint8)
        h = (rng.standard_normal((rows, k // block, size // 2)) * 0.01).astype(np.float16).view(np.uint8)
        keep = rng.random(raw.shape) < 0.7  # most bytes random, the rest finite halves
        raw = np.where(keep, raw, h.reshape(raw.shape))
        with np.errstate(all="ignore"):
            x = FORMATS[t].decode(raw.reshape(rows, -1), k)
        raw = np.where(np.isfinite(x).all(1)[:, None, None], raw, 0).astype(np.uint8)
        return QTensor("w", t, rows, k, raw.reshape(rows, -1))
    w = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1)).astype(np.float32)
    return QTensor.from_f32("w", w, t)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 256), (37, 256), (300, 512), (65, 768)])  # K-quants need k % 256 == 0
@pytest.mark.parametrize("n", [1, 3, SMALL_N, SMALL_N + 1, 40])
def test_matmul_equals_reference(t, rows, k, n):
    q = weights(t, rows, k)
    x = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    ref = x.astype(np.float64) @ FORMATS[t].decode(q.raw, k).astype(np.float64).T
    for w in (q, pack(q)):
        got = matmul(x, w)
        assert got.shape == (n, rows)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q6_K, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_1, T.Q5_K, T.Q2_K, T.Q3_K],
                         ids=lambda t: t.name)
def test_packed_layout_is_exact(t):
    q = weights(t, 50, 512)
    p = pack(q)
    assert isinstance(p, Packed) and p.type == t
    ref = FORMATS[t].decode(q.raw, 512)
    # our own layouts reproduce the codec bit for bit; the generic d*q - o one up to rounding
    check = np.testing.assert_array_equal if t in (T.Q8_0, T.Q4_0, T.Q6_K, T.Q4_K, T.Q2_K, T.Q3_K) else \
        (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(ref).max()))
    check(p.dequant(), ref)
    check(p.dequant(7, 19), ref[7:19])
    check(p.take([49, 0, 3, 3]), ref[[49, 0, 3, 3]])


def test_odd_block_counts():
    q = weights(T.Q4_0, 5, 96)  # 3 blocks per row
    x = np.random.default_rng(5).standard_normal((1, 96)).astype(np.float32)
    np.testing.assert_allclose(matmul(x, pack(q)), x @ q.dequant().T, rtol=1e-5, atol=1e-5)


def test_experts_are_slices_of_the_stack():
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((4 * 24, 128)).astype(np.float32)
    q = QTensor("exps", T.Q8_0, 24, 128, FORMATS[T.Q8_0].encode(stack), n_mats=4)
    p = pack(q)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for e in range(4):
        np.testing.assert_allclose(matmul(x, p.expert(e)), matmul(x, q.expert(e)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q6_K, T.Q4_K, T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_one_thread_equals_all_threads(t):
    p = pack(weights(t, 513, 1024))
    x = np.random.default_rng(3).standard_normal((1, 1024)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = matmul(x, p)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = matmul(x, p)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)  # rows are independent: same order of additions


@pytest.mark.parametrize("t", [T.F32, T.Q8_0, T.Q4_0, T.Q3_K], ids=lambda t: t.name)
def test_fused_matrices_equal_the_parts(t):
    from quant.kernels.matmul_cpu import fuse

    rng = np.random.default_rng(4)
    k = 256
    x = rng.standard_normal((3, k)).astype(np.float32)
    for E in (1, 3):
        parts = [QTensor(f"p{i}", t, r, k, weights(t, E * r, k, seed=i).raw, E) for i, r in enumerate((16, 8, 8))]
        for ws in (parts, [pack(p) for p in parts]):
            f = fuse(ws)
            for e in range(E):
                want = np.concatenate([matmul(x, w.expert(e) if E > 1 else w) for w in ws], axis=1)
                np.testing.assert_allclose(matmul(x, f.expert(e) if E > 1 else f), want, rtol=1e-5,
                                           atol=1e-5 * np.abs(want).max())
    if t != T.F32:
        assert fuse([pack(parts[0]), parts[1]]) is None  # mixed layouts are not stacked


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_expert_products_equal_per_expert_matmuls(t):
    from quant.kernels.matmul_cpu import matmul_experts

    E, rows, k = 3, 5, 256
    stack = QTensor("exps", t, rows, k, weights(t, E * rows, k, seed=6).raw, n_mats=E)
    x = np.random.default_rng(7).standard_normal((2, k)).astype(np.float32)
    ids, xi = np.array([2, 0, 2, 1]), np.array([0, 0, 1, 1])  # slot s: x[xi[s]] through expert ids[s]
    want = np.stack([matmul(x[r:r + 1], stack.expert(int(e)))[0] for e, r in zip(ids, xi)])
    for w in (stack, pack(stack)):
        got = matmul_experts(x, w, ids, xi)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K, T.Q5_K], ids=lambda t: t.name)
def test_int8_stack_packs_each_part_into_its_rows(t):
    # fuse packs q|k|v straight into the stack's rows: the same bytes as packing the stacked
    # file bytes, and as the parts' own packs one after another (per expert for stacks)
    from quant.kernels.layouts import _arrays, pack_int8
    from quant.kernels.matmul_cpu import fuse

    k = 608 if t in (T.Q8_0, T.Q4_0, T.Q5_0) else 512  # 19 blocks of 32: a group and a tail
    for E in (1, 3) if t not in (T.Q5_0, T.Q5_K) else (1,):
        parts = []
        for i, r in enumerate((16, 8, 8)):
            raw = weights(t, E * r, k, seed=i).raw
            ro = np.frombuffer(raw.tobytes(), np.uint8).reshape(raw.shape)  # read-only, as a mapped file
            parts.append(QTensor(f"p{i}", t, r, k, ro, E))
        f = fuse(parts, exact=False)
        assert (f.rows, f.n_mats, f.k) == (32, E, k)
        cat = np.concatenate([p.raw.reshape(E, -1, p.raw.shape[1]) for p in parts], axis=1)
        whole = pack_int8(QTensor("qkv", t, 32, k, cat.reshape(E * 32, -1), E))
        one = [_arrays(pack_int8(QTensor("p", t, p.rows, k, p.raw[e * p.rows:(e + 1) * p.rows])).arrays)
               for e in range(E) for p in parts]
        for name, a in _arrays(f.arrays).items():
            np.testing.assert_array_equal(a, _arrays(whole.arrays)[name])
            np.testing.assert_array_equal(a, np.concatenate([o[name] for o in one]))
    with pytest.raises(ValueError, match="cannot stack"):
        pack_int8(parts[0], QTensor("w", t, 8, 2 * k, weights(t, 8, 2 * k).raw))


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_large_matrix_packs_in_steps_releasing_each(monkeypatch, t):
    # the embedding / output matrix is packed a slice at a time and each slice's file pages are
    # let go before the next: the same bytes as one pack, and every row released exactly once
    from qwen3cli.model import prepare

    rng = np.random.default_rng(5)
    rows, k = 100, 512
    q = QTensor("big", t, rows, k, FORMATS[t].quantize(rng.standard_normal((rows, k)).astype(np.float32)))
    monkeypatch.setattr(prepare, "RELEASE_STEP", 8 * q.raw.shape[1])
    calls = []
    got = prepare.pack_tensor(q, lambda name, rows=None: calls.append((name, rows)), exact=False)
    want = pack(q, exact=False)
    assert got.name == "big" and got.rows == rows
    for f in ("q", "d", "s", "dmin"):
        a, b = getattr(got.arrays, f, None), getattr(want.arrays, f, None)
        assert (a is None and b is None) or np.array_equal(a, b), f
    assert [n for n, _ in calls] == ["big"] * len(calls) and len(calls) == -(-rows // 8)
    assert [r for _, r in calls] == [(lo, min(rows, lo + 8)) for lo in range(0, rows, 8)]
