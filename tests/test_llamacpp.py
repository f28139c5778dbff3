"""Against llama.cpp itself, when llama-cpp-python is installed (it is not a test requirement:
it compiles llama.cpp). Our quantizer bytes equal libggml's; llama.cpp loads our files,
tokenizes like the official tokenizer and generates from them."""

import ctypes
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from checkpoints import DATA
from quant.formats import FORMATS
from quant.gguf_file import GGUFFile
from qwen3cli.io import convert

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def ggml():
    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(libdir.glob("libggml-base.so*"))))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return f


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q6_K, T.Q4_K, T.Q5_K, T.Q5_0])
def test_quantized_bytes_equal_libggml(ggml, qtype):
    rng = np.random.default_rng(7)
    k = 1024
    x = np.concatenate([
        rng.standard_normal((200, k)) * rng.uniform(1e-3, 10, (200, 1)),
        np.round(rng.standard_normal((20, k)) * 4) / 4,
        np.zeros((2, k)), np.where(rng.random((4, k)) < 0.02, 30.0, 0.01 * rng.standard_normal((4, k))),
    ]).astype(np.float32)
    fmt = FORMATS[qtype]
    theirs = np.zeros((x.shape[0], fmt.row_bytes(k)), np.uint8)
    n = ggml(int(qtype), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], k, None)
    assert n == theirs.nbytes
    ours = fmt.encode(x)
    assert np.array_equal(ours, theirs), f"{int((ours != theirs).sum())} bytes differ"


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0])
def test_imatrix_weighted_bytes_equal_libggml(ggml, qtype):
    """With an importance array ggml runs other, weighted searches (quantize_row_*_impl)."""
    rng = np.random.default_rng(11)
    k = 512
    x = np.concatenate([
        rng.standard_normal((120, k)) * rng.uniform(1e-3, 10, (120, 1)),
        np.round(rng.standard_normal((12, k)) * 4) / 4, np.zeros((2, k)),
        np.where(rng.random((4, k)) < 0.02, 30.0, 0.01 * rng.standard_normal((4, k))),
        np.abs(rng.standard_normal((4, k))), -np.abs(rng.standard_normal((4, k))),
    ]).astype(np.float32)
    fmt = FORMATS[qtype]
    for qw in (rng.gamma(0.5, 2.0, k), np.where(rng.random(k) < 0.3, 0.0, rng.uniform(0, 1e4, k)), np.ones(k)):
        qw = qw.astype(np.float32)
        theirs = np.zeros((x.shape[0], fmt.row_bytes(k)), np.uint8)
        ggml(int(qtype), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], k, qw.ctypes.data)
        ours = fmt.quantize(x, qw)
        bad = np.flatnonzero((ours != theirs).any(1))
        assert bad.size == 0, f"{bad.size} rows differ, first {bad[:5]}"


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1])
def test_q4_1_q5_1_unweighted_bytes_equal_libggml(ggml, qtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 256)) * rng.uniform(1e-3, 10, (64, 1))).astype(np.float32)
    theirs = np.zeros((64, FORMATS[qtype].row_bytes(256)), np.uint8)
    ggml(int(qtype), x.ctypes.data, theirs.ctypes.data, 0, 64, 256, None)
    assert np.array_equal(FORMATS[qtype].quantize(x), theirs)


@pytest.mark.parametrize("kind,type_name", [(dict(moe=False, tied=True, hidden=256), "q4_0"),
                                            (dict(moe=True, tied=False), "q8_0")])
def test_llama_cpp_loads_tokenizes_and_generates(ckpt, tmp_path, kind, type_name):
    d, _ = ckpt(**kind)
    out = tmp_path / "m.gguf"
    convert.quantize(d, out, type_name)
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=2, verbose=False)
    assert llm.n_vocab() == 151936
    # the official ids of 68 strings: llama.cpp gets them from the vocabulary and merges we wrote
    # (llama.cpp does not apply the tokenizer's NFC normalizer: skip texts it would change)
    for case in json.loads((DATA / "expected_encodings.json").read_text())["encodings"]:
        if unicodedata.normalize("NFC", case["text"]) != case["text"]:
            continue
        assert llm.tokenize(case["text"].encode(), add_bos=False, special=True) == case["ids"], case["text"]
    r = llm.create_completion("<|im_start|>user\nHi<|im_end|>\n", max_tokens=4, temperature=0.0, top_k=1)
    assert r["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("type_name", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("moe", [False, True])
def test_our_logits_match_llama_cpp_on_the_same_file(gguf_model, type_name, moe):
    from qwen3cli.model import forward as model_mod
    from qwen3cli.io.loader import load

    kw = dict(dtype="f32", std=0.05, peaked=True, hidden=256)
    path, _ = gguf_model(type_name, **(dict(kw, moe=True, experts=8) if moe else kw))
    prompt = [151644, 872, 198, 9707, 1879, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    # an f32 cache: with f16 the Q4_0 MoE flips one more router near-tie (1.7% of the range, the
    # other cases move by under 0.1%), which is the cache's rounding, not what this test measures
    def logits(exact):
        model = model_mod.Model(load(path).weights, ctx=64, cache_type="f32", exact=exact)
        return model.forward(prompt, model.new_cache(), all_logits=True)

    ours = logits(False)
    # The default path quantizes x to Q8_0 blocks for Q8_0 / Q4_0 weights, as llama.cpp does:
    # it is closer to llama.cpp than float activations (measured 0.5-0.9% of the range against
    # 0.9-7.9%: a Q4_0 MoE's router near-ties flip with float x)
    err, err_exact = (np.abs(x - theirs).max() for x in (ours, logits(True)))
    # an F32 file has no 8-bit path: both runs are float, the default's threaded prefill kernels
    # (prefill_cpu) rounding apart from numpy's by float32 ulps, either way
    assert err <= (err_exact * 1.01 if type_name == "f32" else err_exact)
    bound = (1e-3 if type_name == "f32" else 1.5e-2) * (theirs.max() - theirs.min())
    assert np.abs(ours - theirs).max() <= bound
    top2 = np.sort(theirs, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound  # where the error bound cannot flip the winner
    assert clear.sum() >= len(prompt) // 2
    assert np.array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize("ftype,main,moe", [(15, "Q4_K", False), (15, "Q4_K", True), (17, "Q5_K", False),
                                            (10, "Q2_K", False), (12, "Q3_K", False), (8, "Q5_0", False),
                                            (9, "Q5_1", False), (3, "Q4_1", False), (18, "Q6_K", False)])
def test_llama_cpp_k_quant_files_run_like_llama_cpp(gguf_model, tmp_path, ftype, main, moe):
    """llama.cpp quantizes our F32 file (its Q4_K_M, Q5_K_M, Q2_K, Q3_K_M, Q5_0, Q5_1, Q4_1, with
    Q6_K and others where its rules say); we run the result and compare the logits."""
    from qwen3cli.io.loader import load
    from qwen3cli.model.forward import Model

    kw = dict(dtype="f32", std=0.05, peaked=True, hidden=256, ffn=512)
    src, _ = gguf_model("f32", **(dict(kw, moe=True, experts=8, moe_ffn=256) if moe else kw))
    out = tmp_path / "k.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    m = load(out)
    types = {t.type.name for ly in m.weights.layers for t in vars(ly).values() if hasattr(t, "type")}
    assert main in types, types
    prompt = [151644, 872, 198, 9707, 1879, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    model = Model(m.weights, ctx=64)
    ours = model.forward(prompt, model.new_cache(), all_logits=True)
    # llama.cpp rounds activations to Q8_K for K-quant matmuls, as our default path does for
    # Q4_K / Q5_K / Q6_K; what is left (measured 0.9-2.2% of the range) is mostly the other types
    # in these mixes and the attention's arithmetic
    bound = 0.03 * (theirs.max() - theirs.min())
    assert np.abs(ours - theirs).max() <= bound
    top2 = np.sort(theirs, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound
    assert np.array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


K_MIXES = {"q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q6_k": 18, "q5_0": 8}


@pytest.mark.parametrize("preset,kind", [
    ("q4_k_m", dict(layers=9, tied=True)), ("q4_k_m", dict(layers=3, tied=False)),
    ("q4_k_m", dict(layers=4, tied=False, moe=True, experts=4, moe_ffn=256)),
    ("q4_k_m", dict(layers=3, tied=False, moe=True, experts=8, moe_ffn=256)),  # llama.cpp's 8-expert rules
    ("q4_k_s", dict(layers=9, tied=True)), ("q5_k_m", dict(layers=9, tied=False)),
    ("q5_k_m", dict(layers=3, tied=False, moe=True, experts=8, moe_ffn=256)), ("q6_k", dict(layers=3, tied=True)),
    ("q5_0", dict(layers=3, tied=False)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()))
def test_k_quant_files_are_byte_identical_to_llama_quantize(ckpt, tmp_path, preset, kind):
    """Our `quantize --type q4_k_m|q4_k_s|q5_k_m|q6_k` from the checkpoint == llama-quantize of our
    F32 file: the same type for every tensor (the per-layer mixes) and the same bytes."""
    import subprocess
    import sys

    d, _ = ckpt(dtype="f32", hidden=256, ffn=512, heads=8, head_dim=32, **kind)
    ours, f32, theirs = tmp_path / "ours.gguf", tmp_path / "f32.gguf", tmp_path / "theirs.gguf"
    convert.quantize(d, ours, preset)
    convert.quantize(d, f32, "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_MIXES[preset]
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "compare_gguf.py"), str(ours),
                        str(theirs), "--bytes"], capture_output=True, text=True)
    assert r.returncode == 0 and " 0 differences" in r.stdout, r.stdout[-2000:]
    llm = llama_cpp.Llama(str(ours), n_ctx=32, n_threads=2, verbose=False)  # and llama.cpp runs ours
    llm.eval([151644, 872, 198, 9707])
    assert np.isfinite(np.array(llm.scores[3])).all()


def test_llama_cpp_q4_k_m_file_gives_llama_cpp_greedy_tokens(gguf_model, tmp_path):
    """A Q4_K_M file made by llama-quantize: our greedy continuation equals llama.cpp's."""
    from qwen3cli.io.loader import load
    from qwen3cli.model.forward import Model

    src, _ = gguf_model("f32", dtype="f32", std=0.05, peaked=True, hidden=256, ffn=512, heads=8, head_dim=32)
    out = tmp_path / "k.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    prompt = [151644, 872, 198, 9707, 1879, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    llm.eval(prompt)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    model = Model(load(out).weights, ctx=64)
    cache = model.new_cache()
    logits, ours = model.forward(prompt, cache), []
    for _ in range(16):
        ours.append(int(np.argmax(logits)))
        logits = model.forward([ours[-1]], cache)
    assert ours == theirs


def _llama_quantize_with_imatrix(src, dst, ftype, m):
    """What llama-quantize --imatrix does through the library: the mean importances from
    load_imatrix (ours, tested against llama.cpp's reading rules in test_imatrix.py) as the
    params' imatrix array, and the four quantize.imatrix.* keys as KV overrides."""
    keep = [(n.encode(), np.ascontiguousarray(v, np.float32)) for n, v in m.entries.items()]
    data = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for d, (name, v) in zip(data, keep):
        d.name, d.data, d.size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    kv = [("quantize.imatrix.file", m.source), ("quantize.imatrix.dataset", m.datasets[0]),
          ("quantize.imatrix.entries_count", len(m.entries)), ("quantize.imatrix.chunks_count", m.chunk_count)]
    over = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for o, (key, value) in zip(over, kv):
        o.key = key.encode()
        if isinstance(value, str):
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
        else:
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.imatrix = ctypes.cast(data, type(params.imatrix))
    params.kv_overrides = ctypes.cast(over, type(params.kv_overrides))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("preset,kind", [
    ("q4_0", dict(layers=8, tied=True)),  # and the first ffn_down in Q4_1, as llama.cpp with an imatrix
    ("q5_0", dict(layers=8, tied=False)), ("q4_k_m", dict(layers=3, tied=True)),
    ("q4_k_s", dict(layers=9, tied=False)), ("q5_k_m", dict(layers=3, tied=False)), ("q6_k", dict(layers=2, tied=True)),
    ("q4_k_m", dict(layers=2, tied=False, moe=True, experts=4, moe_ffn=256)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()))
def test_imatrix_files_are_byte_identical_to_llama_quantize(ckpt, tmp_path, monkeypatch, preset, kind):
    """quantize --imatrix == llama-quantize --imatrix on our F32 file, the whole file byte for byte;
    one matrix lacks imatrix data (both quantize it unweighted), experts each get their slice."""
    from checkpoints import imatrix_for
    from quant.imatrix import load_imatrix

    d, _ = ckpt(dtype="f32", hidden=256, ffn=512, heads=8, head_dim=32, **kind)
    monkeypatch.chdir(tmp_path)  # the imatrix path as typed is recorded in the file
    imatrix_for(convert.plan(d, preset), Path("calib.imatrix"), skip=("blk.1.attn_k.weight",))
    ours, f32, theirs = tmp_path / "ours.gguf", tmp_path / "f32.gguf", tmp_path / "theirs.gguf"
    convert.quantize(d, ours, preset, imatrix="calib.imatrix")
    convert.quantize(d, f32, "f32")
    _llama_quantize_with_imatrix(f32, theirs, K_MIXES.get(preset, {"q4_0": 2}.get(preset)), load_imatrix("calib.imatrix"))
    # llama-quantize writes tensors in name order, convert_hf_to_gguf.py in model order: the
    # same standard as the test without an imatrix above
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "compare_gguf.py"), str(ours),
                        str(theirs), "--bytes"], capture_output=True, text=True)
    assert r.returncode == 0 and " 0 differences" in r.stdout, r.stdout[-3000:]
    with GGUFFile(ours) as g:
        assert g.metadata["quantize.imatrix.file"] == "calib.imatrix"
        assert g.metadata["quantize.imatrix.entries_count"] == len(load_imatrix("calib.imatrix").entries)
