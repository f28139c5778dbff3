"""Quantizing from a GGUF file (llama-quantize's way): a BF16 / F32 GGUF gives the very bytes and
metadata that quantizing its checkpoint gives; quantized input is refused unless asked for."""

import numpy as np
import pytest

from quant.gguf_file import GGUFFile
from qwen3cli.io.convert import plan, quantize
from qwen3cli.io.requantize import RequantizeError


def same_file(a, b):
    with GGUFFile(a) as x, GGUFFile(b) as y:
        assert list(x.tensors) == list(y.tensors)
        for name, t in x.tensors.items():
            assert (t.type, t.shape) == (y.tensors[name].type, y.tensors[name].shape), name
            assert np.array_equal(x.raw(name), y.raw(name)), name
        assert set(x.metadata) == set(y.metadata)
        for k, v in x.metadata.items():
            assert x.value_types[k] == y.value_types[k], k
            w = y.metadata[k]
            assert (list(v) == list(w)) if hasattr(v, "__len__") and not isinstance(v, str) else v == w, k


@pytest.mark.parametrize("src_type, dtype, to, moe", [("bf16", "bf16", "q8_0", False), ("f32", "f32", "q4_k_m", False),
                                                     ("f32", "f32", "q5_k_m", True), ("bf16", "bf16", "q6_k", True)])
def test_quantizing_a_float_gguf_equals_quantizing_its_checkpoint(ckpt, tmp_path, src_type, dtype, to, moe):
    src, _ = ckpt(dtype=dtype, std=0.05, moe=moe)
    float_file = quantize(src, tmp_path / "float.gguf", src_type).out
    direct = quantize(src, tmp_path / "direct.gguf", to).out
    via = quantize(float_file, tmp_path / "via.gguf", to)
    same_file(via.out, direct)
    assert via.n_params == plan(src, to).n_params


def test_quantized_input_is_refused_unless_asked(ckpt, tmp_path):
    src, _ = ckpt(dtype="f32", std=0.05)
    q8 = quantize(src, tmp_path / "q8.gguf", "q8_0").out
    with pytest.raises(RequantizeError, match=r"q8.gguf: already quantized \(Q8_0\).*--allow-requantize"):
        quantize(q8, tmp_path / "q4.gguf", "q4_0")
    assert not (tmp_path / "q4.gguf").exists()
    s = quantize(q8, tmp_path / "q4.gguf", "q4_0", allow_requantize=True)
    with GGUFFile(s.out) as g:
        assert g.tensors["blk.0.attn_q.weight"].type_name == "Q4_0"
        assert int(g.metadata["general.file_type"]) == 2  # MOSTLY_Q4_0


def test_from_and_to_split_files(ckpt, tmp_path):
    src, _ = ckpt(dtype="f32", std=0.05)
    whole = quantize(src, tmp_path / "f32.gguf", "f32").out
    parts = quantize(src, tmp_path / "f32-split.gguf", "f32", split_max_size=50_000)
    assert parts.parts > 1
    direct = quantize(src, tmp_path / "q8.gguf", "q8_0").out
    out = quantize(parts.out.with_name(f"f32-split-00002-of-{parts.parts:05d}.gguf"), tmp_path / "via.gguf", "q8_0").out
    same_file(out, direct)
    assert whole.exists()
