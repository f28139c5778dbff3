"""Our GGUF reader and writer against gguf-py's, and against broken files."""

import io
import struct

import gguf
import numpy as np
import pytest

from quant.errors import GGUFFormatError, UnsupportedQuantType
from quant.formats import FORMATS
from quant.gguf_file import GGUFFile, GGUFStreamWriter

T = gguf.GGMLQuantizationType


def _kv():
    w = gguf.GGUFWriter(path=None, arch="qwen3")
    w.add_block_count(3)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list(["a", "ü", "<|im_end|>", ""])
    w.add_token_types([1, 1, 3, 5])
    w.add_bool("test.flag", True)
    w.add_array("test.floats", [0.5, 1.5])
    w.add_chat_template("{{ messages }}")
    return dict(w.kv_data[0])


def _write_ours(path, tensors, chunks=3):
    with open(path, "wb") as f:
        w = GGUFStreamWriter(f)
        for name, (qtype, x) in tensors.items():
            w.add_tensor(name, tuple(reversed(x.shape)), qtype, FORMATS[qtype].nbytes(tuple(reversed(x.shape))))
        w.write_header(_kv())
        for name, (qtype, x) in tensors.items():
            raw = FORMATS[qtype].encode(x.reshape(-1, x.shape[-1]))
            for part in np.array_split(raw, chunks):  # the tensor arrives in pieces
                w.write(part)
        w.finish()


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": (T.Q8_0, rng.standard_normal((10, 64)).astype(np.float32)),
        "blk.0.attn_norm.weight": (T.F32, rng.standard_normal(64).astype(np.float32)),
        "blk.0.ffn_up_exps.weight": (T.Q4_0, rng.standard_normal((3, 5, 64)).astype(np.float32)),
        "blk.0.attn_q.weight": (T.F16, rng.standard_normal((7, 32)).astype(np.float32)),
    }


def test_gguf_py_reads_what_we_write(tmp_path, tensors):
    path = tmp_path / "a.gguf"
    _write_ours(path, tensors)
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "qwen3"
    assert r.fields["qwen3.block_count"].contents() == 3
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "ü", "<|im_end|>", ""]
    assert r.fields["tokenizer.ggml.token_type"].contents() == [1, 1, 3, 5]
    assert r.fields["test.flag"].contents() is True
    assert r.fields["test.floats"].contents() == [0.5, 1.5]
    for t in r.tensors:
        qtype, x = tensors[t.name]
        assert t.tensor_type == qtype
        assert list(t.shape) == list(reversed(x.shape))
        want = FORMATS[qtype].encode(x.reshape(-1, x.shape[-1]))
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(want.shape), want)


def test_we_read_what_gguf_py_writes(tmp_path, tensors):
    path = tmp_path / "b.gguf"
    w = gguf.GGUFWriter(path, arch="qwen3")
    for k, v in _kv().items():
        if k != "general.architecture":
            w.add_key_value(k, v.value, v.type, v.sub_type)
    for name, (qtype, x) in tensors.items():
        raw = FORMATS[qtype].encode(x.reshape(-1, x.shape[-1]))
        w.add_tensor(name, raw.reshape(*x.shape[:-1], -1) if qtype not in (T.F32, T.F16) else raw.view(
            np.float32 if qtype == T.F32 else np.float16).reshape(x.shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as g:
        assert g.metadata["general.architecture"] == "qwen3"
        assert int(g.metadata["qwen3.block_count"]) == 3
        assert list(g.metadata["tokenizer.ggml.tokens"]) == ["a", "ü", "<|im_end|>", ""]
        assert g.metadata["tokenizer.ggml.token_type"].tolist() == [1, 1, 3, 5]
        assert g.metadata["tokenizer.chat_template"] == "{{ messages }}"
        for name, (qtype, x) in tensors.items():
            t = g.tensors[name]
            assert (t.type, t.shape) == (qtype, tuple(reversed(x.shape)))
            np.testing.assert_array_equal(
                FORMATS[qtype].decode(g.raw(name), x.shape[-1]),
                FORMATS[qtype].decode(FORMATS[qtype].encode(x.reshape(-1, x.shape[-1])), x.shape[-1]))


def test_writer_refuses_out_of_order_and_wrong_sizes():
    w = GGUFStreamWriter(io.BytesIO())
    w.add_tensor("a", (32,), T.F32, 128)
    with pytest.raises(RuntimeError):
        w.write(b"\0" * 4)  # before the header
    w.write_header({})
    with pytest.raises(RuntimeError):
        w.add_tensor("b", (32,), T.F32, 128)
    with pytest.raises(RuntimeError):
        w.write(b"\0" * 200)  # more than declared
    with pytest.raises(RuntimeError):
        w.finish()  # tensor "a" not written
    w.write(b"\0" * 128)
    w.finish()


def _good_file(tmp_path, tensors):
    path = tmp_path / "good.gguf"
    _write_ours(path, tensors)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [3, 20, 100, 300, -10])
def test_truncated_files_are_errors(tmp_path, tensors, cut):
    data = _good_file(tmp_path, tensors)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFFormatError, match=r"cut\.gguf: (not a GGUF|truncated|corrupt)"):
        GGUFFile(bad)


def test_corrupt_headers_are_errors(tmp_path, tensors):
    data = bytearray(_good_file(tmp_path, tensors))
    cases = {
        "magic": (b"GGML" + data[4:], "bad magic"),
        "version": (data[:4] + struct.pack("<I", 99) + data[8:], "unsupported GGUF version 99"),
        "counts": (data[:8] + struct.pack("<Q", 2**40) + data[16:], "cannot fit"),
        "strlen": (data[:24] + struct.pack("<Q", 2**62) + data[32:], "truncated or corrupt"),
    }
    for name, (blob, msg) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(bytes(blob))
        with pytest.raises(GGUFFormatError, match=msg):
            GGUFFile(p)


def test_unknown_tensor_type_is_an_error(tmp_path):
    buf = io.BytesIO()
    w = GGUFStreamWriter(buf)
    w.add_tensor("blk.0.attn_q.weight", (32,), 4242, 128)
    w.write_header({})
    w.write(b"\0" * 128)
    w.finish()
    p = tmp_path / "u.gguf"
    p.write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedQuantType, match="'blk.0.attn_q.weight' has unknown GGML type 4242"):
        GGUFFile(p)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFFormatError, match="cannot read"):
        GGUFFile(tmp_path / "missing.gguf")


def test_string_array_items_alone_raw_bytes_and_bad_utf8(tmp_path, tensors):
    path = tmp_path / "s.gguf"
    _write_ours(path, tensors)
    data = path.read_bytes()
    with GGUFFile(path) as g:
        toks = g.metadata["tokenizer.ggml.tokens"]
        assert [toks[i] for i in (2, 0, -1, -4, 1)] == ["<|im_end|>", "a", "", "a", "ü"]  # before any full decode
        with pytest.raises(IndexError):
            toks[4]
        assert toks[1:3] == ["ü", "<|im_end|>"] and list(toks) == ["a", "ü", "<|im_end|>", ""]
        want = b"".join(struct.pack("<Q", len(s)) + s for s in (b"a", "ü".encode(), b"<|im_end|>", b""))
        assert bytes(toks.raw) == want
    bad = data.replace(struct.pack("<Q", 2) + "ü".encode(), struct.pack("<Q", 2) + b"\xc3\x28", 1)
    assert bad != data
    (tmp_path / "bad.gguf").write_bytes(bad)
    with GGUFFile(tmp_path / "bad.gguf") as g:
        toks = g.metadata["tokenizer.ggml.tokens"]
        assert toks[2] == "<|im_end|>"
        with pytest.raises(GGUFFormatError, match=r"tokens\[1\] is not valid UTF-8"):
            toks[1]
        with pytest.raises(GGUFFormatError, match=r"tokens\[1\] is not valid UTF-8"):
            list(toks)
