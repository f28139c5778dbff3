"""MoE prefill in one launch per stack (quant/kernels/int8_moe_gemm_cpu.py): every grouped row
against the dense int8 GEMM on its expert's rows of x (the same arithmetic: bit for bit) and
against test_int8_gemm's numpy reference (x quantized by numpy, exact integer block sums), for
random routings with experts that get no token and odd token counts; the Q5 experts (decode)
kernel against the Q5 decode kernel and the numpy reference."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_int8_gemm import module, reference_rows
from test_int8_kernels import raw_k, raw_weights
from test_int8_q5 import raw_q5

from quant.kernels import int8_gemm_cpu as gemm
from quant.kernels import int8_moe_gemm_cpu as moe
from quant.kernels.int8_experts_cpu import matmul_ids
from quant.qtensor import QTensor

E, ROWS = 6, 37  # odd: an expert's last weight row pair is one row; not a multiple of the 32-row tile
TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q5_0]


def stack(t, k, seed):
    """(file stack of E experts, packed stack)."""
    if t in (T.Q5_K, T.Q5_0):
        w = raw_q5(t, ROWS, k, seed, n_mats=E)
    else:
        one = (raw_weights if t in (T.Q8_0, T.Q4_0) else raw_k)(t, E * ROWS, k, seed)
        w = QTensor("w", t, ROWS, k, one.raw, E)
    return w, module(t).pack(w)


def expert(p, e):
    # Q5Packed counts the stack's rows; the others an expert's
    return p.row_slice(e * ROWS, (e + 1) * ROWS) if p.type in (T.Q5_K, T.Q5_0) else p.expert(e)


def routing(n, k, seed, unused=(2,)):
    """Each token's k distinct experts, never those in `unused`."""
    rng = np.random.default_rng(seed)
    allowed = np.array([e for e in range(E) if e not in unused])
    return np.stack([rng.choice(allowed, k, replace=False) for _ in range(n)])


def inputs(n, k, seed):
    x = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    x[:, :256] *= 1000  # blocks of very different scales
    x[n // 2, 256:512] = 0  # a zero block
    return x


def test_plan_groups_pairs_by_expert():
    top = routing(9, 3, seed=1)
    p = moe.plan(top, E)
    assert sorted(p.row.tolist()) == sorted(set(p.row.tolist()))  # one row per pair
    assert (p.src[p.row] == np.arange(top.size) // 3).all()
    for e in range(E):
        mine = p.row[top.reshape(-1) == e]
        assert ((mine >= p.lo[e]) & (mine < p.hi[e])).all()
        assert (p.hi[e] - p.lo[e]) % moe.NX == 0 and p.hi[e] - p.lo[e] < len(mine) + moe.NX
    pad = np.setdiff1d(np.arange(p.total), p.row)
    assert (p.src[pad] == 9).all()
    assert p.lo[2] == p.hi[2] and 2 not in p.experts
    with pytest.raises(ValueError):
        moe.plan(np.array([[0, E]]), E)


def cases():
    for t in TYPES:
        blocks32 = t in (T.Q8_0, T.Q4_0, T.Q5_0)
        # 768: 8 tail blocks after a full group (the down projection's k) / 3 super-blocks;
        # 544: one tail block
        for k in ([768, 1024, 544] if blocks32 else [768]):
            for vnni in sorted({False, gemm.vnni_available()}):  # generic, and VNNI where the CPU has it
                yield t, k, vnni


@pytest.mark.parametrize("t,k,vnni", list(cases()), ids=lambda v: getattr(v, "name", str(v)))
def test_grouped_equals_dense_gemm_per_expert_and_reference(t, k, vnni):
    w, p = stack(t, k, seed=k)
    n, used = 11, 3  # odd counts; expert 2 gets no token
    top = routing(n, used, seed=k + 1)
    x = inputs(n, k, seed=k + 2)
    pl = moe.plan(top, E)
    out = np.full((pl.total, ROWS), np.nan, np.float32)
    assert moe.matmul_grouped(x, p, ROWS, pl, True, out, vnni=vnni) is out
    pad = np.setdiff1d(np.arange(pl.total), pl.row)
    assert not out[pad].any()  # x's zero row
    for e in range(E):
        tokens, slots = np.nonzero(top == e)
        if not len(tokens):
            continue
        got = out[pl.row[tokens * used + slots]]
        dense = gemm.matmul(x[tokens], expert(p, e), np.empty((len(tokens), ROWS), np.float32))
        np.testing.assert_array_equal(got, dense)
        ref, scale = reference_rows(w.expert(e), x[tokens])
        assert (np.abs(got - ref) <= 1e-5 * scale).all(), (e, (np.abs(got - ref) / scale).max())
    # the down projection's input is in grouped order already
    y = np.random.default_rng(3).standard_normal((pl.total, k)).astype(np.float32)
    down = moe.matmul_grouped(y, p, ROWS, pl, False, vnni=vnni)
    for e in pl.experts:
        rows = np.arange(pl.lo[e], pl.hi[e])
        dense = gemm.matmul(y[rows], expert(p, int(e)), np.empty((len(rows), ROWS), np.float32))
        np.testing.assert_array_equal(down[rows], dense)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_K], ids=lambda t: t.name)
def test_grouped_threads_one_expert_and_no_tokens(t):
    _, p = stack(t, 768, seed=4)
    x = inputs(7, 768, seed=5)
    pl = moe.plan(routing(7, 4, seed=6, unused=()), E)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = moe.matmul_grouped(x, p, ROWS, pl, True)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, moe.matmul_grouped(x, p, ROWS, pl, True))
    solo = moe.plan(np.full((5, 1), 4), E)  # every token to one expert
    got = moe.matmul_grouped(x[:5], p, ROWS, solo, True)
    np.testing.assert_array_equal(got[solo.row], gemm.matmul(x[:5], expert(p, 4), np.empty((5, ROWS), np.float32)))
    empty = moe.plan(np.zeros((0, 2), np.int64), E)
    assert moe.matmul_grouped(x[:0], p, ROWS, empty, True).shape == (0, ROWS)
    with pytest.raises(ValueError):
        moe.matmul_grouped(x[:6], p, ROWS, pl, True)  # the plan is for 7 tokens
    with pytest.raises(ValueError):
        moe.matmul_grouped(x, p, ROWS + 1, pl, True)


def test_scatter_add_weights_slots_back_into_tokens():
    top = routing(9, 3, seed=7)
    pl = moe.plan(top, E)
    y = np.random.default_rng(8).standard_normal((pl.total, 5)).astype(np.float32)
    wts = np.random.default_rng(9).random((9, 3)).astype(np.float32)
    base = np.random.default_rng(10).standard_normal((9, 5)).astype(np.float32)
    got = moe.scatter_add(y, pl, wts, base.copy())
    ref = base + np.einsum("nk,nkh->nh", wts, y[pl.row].reshape(9, 3, 5))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [768, 1024])
@pytest.mark.parametrize("t", [T.Q5_K, T.Q5_0], ids=lambda t: t.name)
def test_q5_experts_decode_equals_decode_kernel_and_reference(t, k):
    if t == T.Q5_K and k == 1024:
        k = 512
    w, p = stack(t, k, seed=k + 11)
    x = inputs(3, k, seed=k)
    ids, xi = np.array([3, 5, 0, 3, 1, 3]), np.array([0, 0, 2, 1, 0, 0])
    got = matmul_ids(x, p, ids, xi, rows=ROWS)
    assert got.shape == (len(ids), ROWS)
    for s, (e, r) in enumerate(zip(ids, xi)):
        one = module(t).matvec(x[r], expert(p, int(e)))
        np.testing.assert_array_equal(got[s], one)  # the decode kernel's arithmetic
        ref, scale = reference_rows(w.expert(int(e)), x[r:r + 1])
        assert (np.abs(got[s] - ref[0]) <= 1e-5 * scale[0]).all()
    with pytest.raises(ValueError):
        matmul_ids(x, p, ids, xi)  # a Q5 stack needs an expert's row count
    with pytest.raises(ValueError):
        matmul_ids(x, p, np.array([E]), np.array([0]), rows=ROWS)
