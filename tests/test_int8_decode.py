"""Decode with int8 activations over the engine's own Packed arrays (quant/kernels/
int8_decode_cpu.py): each kernel against a numpy reference of the same arithmetic, the integer
sums exactly; matmul's dispatch with the flag on and off; a tiny model's greedy decode against
the float kernels."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qwen3cli.loader import load
from qwen3cli.model import Model
from quant.kernels import int8_decode_cpu as i8
from quant.kernels import matmul_cpu as mc
from test_int8_kernels import ref_quantize  # ggml's Q8_0 rounding, as the step-1 tests check it

TYPES = [T.Q8_0, T.Q6_K, T.Q4_0, T.Q4_K]
# (rows, k) of one matrix, or of the parts fused into one (q|k|v, gate|up)
SHAPES = [[(3, 256)], [(17, 512)], [(64, 1024)], [(32, 256), (16, 256), (16, 256)], [(40, 512), (40, 512)]]


def random_packed(t, rows, k, seed):
    """Packed arrays of every quant value the layout can hold, scales and offsets of mixed sign."""
    rng = np.random.default_rng(seed)
    a = mc._empty_packed(t, rows, k)
    info = np.iinfo(a["q"].dtype)
    a["q"][:] = rng.integers(info.min, info.max + 1, a["q"].shape)
    for n in ("d", "o"):
        if n in a:
            a[n][:] = rng.standard_normal(a[n].shape) * 0.02
    return mc.Packed("w", t, rows, k, **a)


def make(t, shape, seed=0):
    parts = [random_packed(t, r, k, seed + i) for i, (r, k) in enumerate(shape)]
    return parts[0] if len(parts) == 1 else mc.fuse(parts)


def ref_block_sums(w, xq):
    """Exact integer sums of quants times x's quants: per 16 (Q6_K) or per 32, (rows, groups)."""
    if w.type in (T.Q4_0, T.Q4_K):
        nib = w.q.reshape(w.rows, -1, 16)
        q = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int64)
    else:
        q = w.q.reshape(w.rows, -1, 16 if w.type == T.Q6_K else 32).astype(np.int64)
    return (q * xq.reshape(1, q.shape[1], -1)).sum(-1)


def reference(w, x):
    """(y, magnitude: the sum of |terms| per row) in float64, integer sums exact."""
    xq, xd = ref_quantize(x)
    isum = ref_block_sums(w, xq)
    xdg = np.repeat(xd, 2) if w.type == T.Q6_K else xd
    terms = [w.d.astype(np.float64) * xdg * isum]
    if w.type in (T.Q4_0, T.Q4_K):
        o, factor = (w.o, 1) if w.type == T.Q4_K else (w.d, 8)
        terms.append(-factor * o.astype(np.float64) * xd * xq.sum(1))
    return sum(t.sum(1) for t in terms), sum(np.abs(t).sum(1) for t in terms)


def test_quantize_x_is_ggml_rounding():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1024) * np.exp(rng.standard_normal(1024))).astype(np.float32)
    x[:32] = 0  # an all-zero block: scale 0, quants 0
    x[32:64] = np.float32(0.5) * np.arange(32)  # exact halves: round away from zero
    xq, xd, xs = i8.quantize_x(x)
    q, d = ref_quantize(x)
    np.testing.assert_array_equal(xq, q.ravel())
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xs, q.sum(1))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_integer_block_sums_exact(t):
    # unit scales on one group at a time, zero elsewhere: the kernel's output is that group's
    # integer sum, exact in float32 (|sum| < 2^24)
    w = make(t, [(8, 512)])
    x = np.random.default_rng(2).standard_normal(512).astype(np.float32)
    xq, _, xs = i8.quantize_x(x)
    want = ref_block_sums(w, xq.astype(np.int64).reshape(-1, 32))
    ones = np.ones(512 // 32, np.float32)
    out = np.empty(8, np.float32)
    for g in range(w.d.shape[1]):
        d = np.zeros_like(w.d)
        d[:, g] = 1
        if t == T.Q8_0:
            i8._mv_q8_0(xq, ones, w.q, d, out)
        elif t == T.Q6_K:
            i8._mv_q6_k(xq, ones, w.q, d, out)
        else:
            i8._mv_q4(xq, ones, ones * xs, w.q, d, np.zeros_like(d), np.float32(0), out)
        np.testing.assert_array_equal(out, want[:, g].astype(np.float32))
    if t in (T.Q4_0, T.Q4_K):  # the offsets: sum_g o_g * sum(xq in g), with xd = 1
        o = np.random.default_rng(3).integers(-8, 8, w.d.shape).astype(np.float32)
        i8._mv_q4(xq, ones, ones * xs, w.q, np.zeros_like(w.d), o, np.float32(1), out)
        np.testing.assert_array_equal(out, -(o.astype(np.int64) @ xs.astype(np.int64)).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "+".join(f"{r}x{k}" for r, k in s))
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference(t, shape):
    w = make(t, shape)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, w.k)).astype(np.float32)
    x[1] *= 100  # scale invariance of the quantization
    out = np.empty((3, w.rows), np.float32)
    i8.matmul(x, w, out)
    for i in range(3):
        y, mag = reference(w, x[i])
        assert np.all(np.abs(out[i] - y) <= 1e-5 * mag), np.abs(out[i] - y).max() / mag.max()


@pytest.mark.parametrize("k", [32, 96, 224])
@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_blocks_after_the_last_four(t, k):
    # the kernels take blocks four at a time; rows of 1, 3 or 7 blocks end in the one-block loop
    w = make(t, [(5, k)])
    x = np.random.default_rng(6).standard_normal((1, k)).astype(np.float32)
    out = np.empty((1, 5), np.float32)
    i8.matmul(x, w, out)
    y, mag = reference(w, x[0])
    assert np.all(np.abs(out[0] - y) <= 1e-5 * mag)


@pytest.fixture
def calls(monkeypatch):
    """Which decode kernel matmul ran: the int8 one or the float Q8_0 one."""
    seen = []
    for mod, name in ((mc.int8, "matmul"), (mc, "_mv_q8_0"), (mc, "_prefill")):
        f = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, f=f, name=name: (seen.append(name), f(*a))[1])
    return seen


@pytest.mark.parametrize("n", [1, 3, mc.SMALL_N, mc.SMALL_N + 1])
@pytest.mark.parametrize("flag", [False, True])
def test_matmul_dispatch(monkeypatch, calls, flag, n):
    monkeypatch.setattr(mc, "INT8", flag)
    w = make(T.Q8_0, [(16, 256), (8, 256)])
    x = np.random.default_rng(5).standard_normal((n, 256)).astype(np.float32)
    got = mc.matmul(x, w)
    want = "_prefill" if n > mc.SMALL_N else "matmul" if flag and n <= i8.MAX_ROWS[T.Q8_0] else "_mv_q8_0"
    assert calls == [want]
    if want == "matmul":
        for i in range(n):
            y, mag = reference(w, x[i])
            assert np.all(np.abs(got[i] - y) <= 1e-5 * mag)


TINY = dict(dtype="f32", std=0.05, peaked=True)  # test_model's well-conditioned model
K_SHAPED = dict(TINY, hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=512)  # rows of 256: K quants
PROMPT = [9707, 1879, 11, 151644, 872, 198, 3838, 374]


def greedy(model, steps, forced=None):
    cache = model.new_cache()
    logits = model.forward(PROMPT, cache)
    got, toks = [], []
    for s in range(steps):
        t = int(logits.argmax()) if forced is None else forced[s]
        toks.append(t)
        logits = model.forward([t], cache)
        got.append(logits)
    return np.stack(got), toks


@pytest.mark.parametrize("type_name,kw", [("q8_0", TINY), ("q4_0", TINY), ("q4_k_m", K_SHAPED)],
                         ids=["q8_0", "q4_0", "q4_k_m"])
def test_greedy_decode_close_to_float(gguf_model, monkeypatch, type_name, kw):
    path, _ = gguf_model(type_name, **kw)
    model = Model(load(path).weights, ctx=64)
    kinds = {ly.type for ly in vars(model.w.layers[0]).values() if isinstance(ly, mc.Packed)}
    assert kinds & set(TYPES)
    monkeypatch.setattr(mc, "INT8", True)
    a, toks = greedy(model, 32)
    monkeypatch.setattr(mc, "INT8", False)
    b, _ = greedy(model, 32, toks)  # the float kernels on the same tokens
    rel = np.abs(a - b).max() / (b.max() - b.min())
    top1 = (a.argmax(-1) == b.argmax(-1)).mean()
    print(f"{type_name}: int8 vs float logits, max diff {rel:.2e} of the range, top-1 agreement {top1:.3f}")
    assert 0 < rel <= 0.02 and top1 >= 0.9
