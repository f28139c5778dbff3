"""MoE decode over the int8 layouts (quant/kernels/int8_experts_cpu.py): each output slot
against the single-matrix kernel on its expert and against test_int8_kernels' numpy references
(the file's bytes decoded by numpy, x quantized by numpy, exact integer block sums). Shapes are
Qwen3-30B-A3B's two row lengths: k = 768 (down: one group of 16 blocks and 8 tail blocks, 3
super-blocks) and k = 2048."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant.kernels import int8_cpu as k8
from quant.kernels import int8_k_cpu as kk
from quant.kernels.int8_experts_cpu import matmul_ids
from quant.qtensor import QTensor
from test_int8_kernels import (raw_k, raw_weights, ref_k_weights, ref_quantize, ref_quantize_k, ref_weights,
                               reference, reference_k)

E, ROWS = 8, 48
TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K]
# 8 slots as a decode step routes them, plus repeats: expert 3 twice on one row of x and once
# on another, row 0 of x shared by most slots
IDS = np.array([3, 7, 0, 3, 5, 3, 1, 7])
XI = np.array([0, 0, 2, 1, 0, 0, 2, 1])


def module(t):
    return k8 if t in (T.Q8_0, T.Q4_0) else kk


def stack(t, k, seed):
    one = (raw_weights if module(t) is k8 else raw_k)(t, E * ROWS, k, seed)
    return QTensor("w", t, ROWS, k, one.raw, E)


def bound(w, x):
    """Sum of |every element's product| per row: the kernels add partial sums in float32 in
    their own order (lanes of 16 or 2 elements, then the lanes), whose rounding is relative to
    the partial sums, not to the (possibly cancelling) block totals that `reference` adds."""
    if module(w.type) is k8:
        (q, d), (xq, xd) = ref_weights(w), ref_quantize(x)
        return np.einsum("rbj,bj->r", np.abs(q) * np.abs(d)[..., None], np.abs(xq) * np.abs(xd)[:, None])
    (q, sc, m, d, dmin), (xq, xd) = ref_k_weights(w), ref_quantize_k(x)
    ax = np.abs(xq) * np.abs(xd)[:, None]
    total = np.einsum("rbi,bi->r", np.abs(sc * q) * np.abs(d)[..., None], ax)
    return total if m is None else total + np.einsum("rbi,bi->r", m * np.abs(dmin)[..., None], ax)


def inputs(k, m=3):
    x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
    x[1, :256] *= 1000  # blocks of very different scales in one row
    return x


@pytest.mark.parametrize("k", [768, 2048])
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_slots_equal_single_expert_products(t, k):
    w, x = stack(t, k, seed=k), inputs(k)
    p = module(t).pack(w)
    got = matmul_ids(x, p, IDS, XI)
    assert got.shape == (len(IDS), ROWS) and got.dtype == np.float32
    ref_of = reference if module(t) is k8 else reference_k
    for s, (e, r) in enumerate(zip(IDS, XI)):
        # float32 rounding over ~20 additions: well under 1e-6 of the bound (measured <= 4e-8);
        # one wrong lane or block would be ~1e-2 of it
        ref, _ = ref_of(w.expert(int(e)), x[r])
        scale = bound(w.expert(int(e)), x[r])
        assert (np.abs(got[s] - ref) <= 1e-6 * scale).all(), (s, (np.abs(got[s] - ref) / scale).max())
        one = module(t).matvec(x[r], p.expert(int(e)))
        assert (np.abs(got[s] - one) <= 1e-6 * scale).all(), (s, (np.abs(got[s] - one) / scale).max())
        if module(t) is kk or k % (32 * 16) == 0:  # no tail blocks: the same arithmetic, bit for bit
            np.testing.assert_array_equal(got[s], one)
    # a repeated (expert, row) pair is the same arithmetic: bit for bit
    np.testing.assert_array_equal(got[0], got[5])


@pytest.mark.skipif(not __import__("quant.kernels.int8_tiles_cpu", fromlist=["x"]).vnni_available(),
                    reason="the CPU has no AVX512-VNNI")
@pytest.mark.parametrize("k", [768, 2048])
@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_K], ids=lambda t: t.name)
def test_vnni_slots_equal_generic_bit_for_bit(t, k):
    """vpdpbusd sums the same integers; Q4_0's tail blocks (k = 768) read x as int8 in the file's order."""
    p, x = module(t).pack(stack(t, k, seed=k + 1)), inputs(k)
    np.testing.assert_array_equal(matmul_ids(x, p, IDS, XI, vnni=True),
                                  matmul_ids(x, p, IDS, XI, vnni=False, avx2=False))


@pytest.mark.skipif(not __import__("quant.kernels.int8_tiles_cpu", fromlist=["x"]).avx2_available(),
                    reason="the CPU has no AVX2")
@pytest.mark.parametrize("k", [768, 2048])
@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_avx2_slots_equal_generic_bit_for_bit(t, k):
    """vpmaddubsw sums the same integers; Q4_0's tail blocks (k = 768) read x as int8 in the file's order."""
    p, x = module(t).pack(stack(t, k, seed=k + 2)), inputs(k)
    np.testing.assert_array_equal(matmul_ids(x, p, IDS, XI, vnni=False, avx2=True),
                                  matmul_ids(x, p, IDS, XI, vnni=False, avx2=False))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_stack_pack_is_the_experts_packs_in_turn(t):
    w = stack(t, 768, seed=5)
    p = module(t).pack(w)
    parts = [module(t).pack(w.expert(e)) for e in range(E)]
    assert p.n_mats == E and p.rows == ROWS and all(q.n_mats == 1 for q in parts)
    for name in ("q", "s", "d", "dmin"):
        if hasattr(p, name) and getattr(p, name) is not None:
            np.testing.assert_array_equal(getattr(p, name), np.concatenate([getattr(q, name) for q in parts]))
            np.testing.assert_array_equal(getattr(p.expert(6), name), getattr(parts[6], name))
    assert p.nbytes == sum(q.nbytes for q in parts)


def test_threads_and_zero_input():
    p = k8.pack(stack(T.Q4_0, 768, seed=2))
    x = inputs(768)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = matmul_ids(x, p, IDS, XI)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, matmul_ids(x, p, IDS, XI))  # slots are independent
    assert not matmul_ids(np.zeros((1, 768), np.float32), p, IDS, np.zeros(8, np.int64)).any()


def test_refuses_bad_indices_and_shapes():
    p = kk.pack(stack(T.Q6_K, 768, seed=3))
    x = inputs(768, m=2)
    for ids, xi in [([0, E], [0, 0]), ([-1], [0]), ([0], [2]), ([0], [-1]), ([0, 1], [0])]:
        with pytest.raises(ValueError):
            matmul_ids(x, p, np.array(ids), np.array(xi))
    with pytest.raises(ValueError):
        matmul_ids(x[:, :512], p, IDS[:1], XI[:1])
    with pytest.raises(ValueError):
        matmul_ids(x, p, IDS[:2], XI[:2], out=np.empty((2, ROWS + 1), np.float32))
    with pytest.raises(ValueError):  # a stack is not one matrix
        kk.matvec(x[0], p)
    assert matmul_ids(x, p, np.array([], np.int64), np.array([], np.int64)).shape == (0, ROWS)
