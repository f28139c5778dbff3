"""The backend interface (qwen3cli/backend.py), the weights' preparation that both backends
share (prepare.py), and the layout registry's completeness (quant/kernels/layouts.py)."""

import inspect
from dataclasses import replace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant.formats import FORMATS
from quant.kernels.layouts import LAYOUTS, Mat
from quant.kernels.matmul_cpu import Packed, matmul, pack
from quant.qtensor import QTensor
from qwen3cli.model.backend import Backend, open_backend
from qwen3cli.model.ops_cpu import CpuOps
from qwen3cli.model.prepare import prepare_layer
from qwen3cli.model.weights import LayerWeights
from test_kernels import weights as random_weights


def protocol_members() -> dict[str, inspect.Signature | None]:
    """Backend's methods with their signatures (self dropped), and its attributes (None)."""
    out = {n: None for n in Backend.__annotations__}
    for n, f in vars(Backend).items():
        if inspect.isfunction(f) and not n.startswith("_"):
            sig = inspect.signature(f)
            out[n] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return out


def check_implements(cls) -> None:
    """cls has every member of Backend, each method callable with the protocol's arguments."""
    members = protocol_members()
    assert {"prepare", "new_cache", "matmul", "attention", "ffn", "moe", "name"} <= set(members)
    for name, sig in members.items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        if sig is None:
            continue
        impl = inspect.getattr_static(cls, name)
        if isinstance(impl, staticmethod):
            params = list(inspect.signature(impl.__func__).parameters.values())
        else:
            params = list(inspect.signature(impl).parameters.values())[1:]
        got = inspect.Signature(params)
        # positionally, as Model calls them, and every keyword the protocol names
        got.bind(*range(len(sig.parameters)))
        got.bind(**{p: None for p in sig.parameters})


def test_cpu_backend_implements_the_interface():
    check_implements(CpuOps)


def test_the_check_catches_a_missing_or_narrower_method():
    class Short(CpuOps):
        def residual(self, x, a):  # one argument short
            return x

    with pytest.raises(TypeError):
        check_implements(Short)

    class Partial:
        name, summary = "x", ""

    with pytest.raises(AssertionError, match="lacks"):
        check_implements(Partial)


def test_unknown_backend_is_refused():
    from qwen3cli.model.device import DeviceError

    with pytest.raises(DeviceError, match="unknown backend 'tpu'"):
        open_backend("tpu", None, None, 8, "f32")


def test_every_file_type_has_a_registry_entry_with_a_cuda_kernel():
    """Every type a file may hold runs somewhere: its entry names a launcher of cuda.py (read
    from the source, so no numba.cuda is needed) and an int8 layout where the CPU has one."""
    from pathlib import Path

    import quant.kernels.layouts as L

    cuda_src = (Path(L.__file__).parent / "cuda.py").read_text()
    assert set(LAYOUTS) == set(FORMATS)
    for t, e in LAYOUTS.items():
        assert e.cuda is not None, t.name
        assert f"def {e.cuda.kernel}(" in cuda_src, (t.name, e.cuda.kernel)
    assert {T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K} <= set(L.INT8)


def layer(types: dict[str, T], moe: bool = False) -> LayerWeights:
    k, vec = 64, np.ones(64, np.float32)

    def m(name, rows, n_mats=1):
        t = types.get(name, T.Q8_0)
        w = random_weights(t, rows * n_mats, k, seed=len(name))
        return QTensor(name, t, rows, k, w.raw, n_mats)

    ly = LayerWeights(attn_norm=vec, q=m("q", 64), k=m("k", 32), v=m("v", 32), o=m("o", 64), q_norm=vec[:16],
                      k_norm=vec[:16], ffn_norm=vec)
    if moe:
        ly.router, ly.gate_exps, ly.up_exps, ly.down_exps = m("router", 4), m("gate_exps", 32, 4), m("up_exps", 32, 4), \
            m("down_exps", 64, 4)
    else:
        ly.gate, ly.up, ly.down = m("gate", 128), m("up", 128), m("down", 64)
    return ly


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_prepare_fills_the_declared_fused_fields(exact, moe):
    """Stacks of parts of one type replace the parts (same LayerWeights class, no wrapper);
    parts that differ in type stay apart. The stacks hold the parts' rows in order."""
    ffn = ("gate_exps", "up_exps") if moe else ("gate", "up")
    ly = layer({"k": T.Q4_0}, moe)  # q|k|v cannot stack: k is another type
    released = []
    got = prepare_layer(ly, lambda name, rows=None: released.append(name), exact)
    assert type(got) is LayerWeights
    assert got.qkv is None and all(isinstance(getattr(got, n), (Packed, Mat)) for n in "qkv")
    assert got.gate_up is not None and all(getattr(got, n) is None for n in ffn)
    assert got.gate_up.rows == sum(getattr(ly, n).rows for n in ffn)
    assert set(ffn) <= set(released) and {"q", "k", "v", "o"} <= set(released)
    # the stack multiplies as its parts do (the first expert for a MoE stack)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    stack = got.gate_up.expert(0) if moe else got.gate_up
    parts = [pack(getattr(ly, n), exact) for n in ffn]
    want = np.concatenate([matmul(x, p.expert(0) if moe else p) for p in parts], axis=1)
    np.testing.assert_allclose(matmul(x, stack), want, rtol=1e-5, atol=1e-5)


def test_the_cpu_reads_the_same_entries(monkeypatch):
    """The int8 layout is the entry's too: a type whose entry has none runs the exact layout."""
    import quant.kernels.layouts as L

    w = random_weights(T.Q8_0, 8, 64)
    assert isinstance(pack(w, exact=False), Mat)
    monkeypatch.setitem(L.LAYOUTS, T.Q8_0, replace(L.LAYOUTS[T.Q8_0], int8=None))
    assert isinstance(pack(w, exact=False), Packed)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.Q5_0, T.F16], ids=lambda t: t.name)
def test_the_exact_path_runs_the_entries_kernels(monkeypatch, t):
    """matmul_cpu's few-rows and MoE products for the exact layout are the type's entry's
    (layouts.Exact): a spy in the entry sees each call and returns its kernel's result; with no
    kernels in the entry the same products come from dequantized tiles (BLAS), one per expert."""
    import quant.kernels.layouts as L
    from quant.kernels.matmul_cpu import SMALL_N, matmul_experts

    E, rows, k = 2, 6, 256
    stack = pack(QTensor("exps", t, rows, k, random_weights(t, E * rows, k, seed=3).raw, n_mats=E))
    x = np.random.default_rng(5).standard_normal((SMALL_N, k)).astype(np.float32)
    ids, xi = np.array([1, 0, 1]), np.array([0, 0, 3])
    w0 = stack.expert(0)
    want = x @ w0.dequant().T
    want_ids = np.stack([x[r] @ stack.expert(int(e)).dequant().T for e, r in zip(ids, xi)])
    ex = L.LAYOUTS[t].exact
    calls = []

    def spy(kind, f):
        return lambda x, w, *rest: calls.append(kind) or f(x, w, *rest)

    monkeypatch.setitem(L.LAYOUTS, t, replace(L.LAYOUTS[t], exact=L.Exact(
        spy("decode", ex.decode), ex.experts and spy("experts", ex.experts))))
    close = {"rtol": 1e-4, "atol": 1e-4 * np.abs(want).max()}
    np.testing.assert_allclose(matmul(x, w0), want, **close)
    np.testing.assert_allclose(matmul_experts(x, stack, ids, xi), want_ids, **close)
    assert calls == (["decode", "experts"] if ex.experts else ["decode"] * (1 + len(ids)))
    calls.clear()
    monkeypatch.setitem(L.LAYOUTS, t, replace(L.LAYOUTS[t], exact=None))
    np.testing.assert_allclose(matmul(x, w0), want, **close)
    np.testing.assert_allclose(matmul_experts(x, stack, ids, xi), want_ids, **close)
    assert calls == []
