"""Against llama.cpp itself, when llama-cpp-python is installed (it is not a test requirement:
it compiles llama.cpp). Our quantizer bytes equal libggml's; llama.cpp loads our files,
tokenizes like the official tokenizer and generates from them."""

import ctypes
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from checkpoints import DATA
from quant.formats import FORMATS
from qwen3cli import convert

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


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q6_K])
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
