"""llama.cpp imatrix files (GGUF and legacy .dat) -> per-column mean importance, and the
errors a stranger's file can cause."""

import numpy as np
import pytest

from checkpoints import write_imatrix_dat, write_imatrix_gguf
from quant.errors import ImatrixError
from quant.imatrix import load_imatrix


def test_gguf_imatrix_means_per_expert(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.uniform(0, 50, 64).astype(np.float32)
    moe = rng.uniform(0, 50, (3, 32)).astype(np.float32)
    path = write_imatrix_gguf(tmp_path / "m.gguf", {
        "blk.0.attn_q.weight": (dense, [7.0]),
        "blk.0.ffn_down_exps.weight": (moe, [4.0, 0.0, 2.0]),  # expert 1 never routed to
    })
    m = load_imatrix(path)
    assert sorted(m.entries) == ["blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"]
    assert m.entries["blk.0.attn_q.weight"].dtype == np.float32
    assert np.array_equal(m.for_tensor("blk.0.attn_q.weight", 64), (dense / np.float32(7))[None])
    e = m.for_tensor("blk.0.ffn_down_exps.weight", 32, 3)
    assert np.array_equal(e[0], moe[0] / np.float32(4)) and np.array_equal(e[2], moe[2] / np.float32(2))
    assert (e[1] == 1).all()  # llama-quantize's importance for an expert with no data
    assert m.for_tensor("blk.1.attn_q.weight", 64) is None and m.chunk_count == 10
    assert m.datasets == ["calibration.txt"]


def test_legacy_dat_imatrix(tmp_path):
    v = np.arange(1, 65, dtype=np.float32) * 3
    m = load_imatrix(write_imatrix_dat(tmp_path / "m.dat", {"blk.0.ffn_up.weight": (v, 3),
                                                            "output.weight": (v[:32], 0)}))
    assert np.array_equal(m.entries["blk.0.ffn_up.weight"], v / np.float32(3))
    assert np.array_equal(m.entries["output.weight"], v[:32])  # ncall 0: values as stored
    assert m.chunk_count == 10 and m.datasets == ["data.txt"]
    assert load_imatrix(write_imatrix_dat(tmp_path / "n.dat", {"a.weight": (v, 1)}, trailer=False)).chunk_count == 0


def test_size_mismatch(tmp_path):
    m = load_imatrix(write_imatrix_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (np.ones(64), [1]),
                                                               "token_embd.weight": (np.ones(64), [1])}))
    with pytest.raises(ImatrixError, match=r"m.gguf: blk.0.attn_q.weight has 64 importance values.*128"):
        m.for_tensor("blk.0.attn_q.weight", 128)
    assert m.for_tensor("token_embd.weight", 128) is None  # llama-quantize lets this one pass


def _dat(tmp_path, **kw):
    return write_imatrix_dat(tmp_path / "m.dat", {"blk.0.ffn_up.weight": (np.ones(64), 2)}, **kw).read_bytes()


@pytest.mark.parametrize("make,match", [
    (lambda p: b"", "empty"),
    (lambda p: b"\x89PNG\r\n\x1a\n" + bytes(100), "neither a GGUF nor"),
    (lambda p: _dat(p)[:60], "truncated"),
    (lambda p: _dat(p)[:6], "neither a GGUF nor"),
    (lambda p: _dat(p)[:4] + b"\xff\xff\xff\x7f" + _dat(p)[8:], "name of"),
    (lambda p: _dat(p).replace(b"\x02\x00\x00\x00\x40\x00\x00\x00", b"\x02\x00\x00\x00\x00\x00\x10\x00"), "claims"),
    (lambda p: write_imatrix_dat(p / "x.dat", {"a.weight": (np.full(32, np.nan), 1)}).read_bytes(), "non-finite"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {"a.weight": (np.ones(32), [1])}).read_bytes()[:-100], "truncated"),
    (lambda p: b"GGUF" + bytes(40), "unsupported GGUF version|corrupt"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {"a.weight": (np.ones(32), [1])}, type="model").read_bytes(),
     "type 'model', not an imatrix"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {"a.weight": (np.ones(32), [1])}, keys=False).read_bytes(),
     "no imatrix.datasets"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {"a.weight": (np.full(32, np.inf), [1])}).read_bytes(), "non-finite"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {"a.weight": (np.ones(33), [1, 1])}).read_bytes(), "do not split"),
    (lambda p: write_imatrix_gguf(p / "x.gguf", {}).read_bytes(), "no data"),
], ids=["empty", "png", "truncated-values", "truncated-name", "huge-name", "huge-count", "nan", "gguf-truncated",
        "gguf-zero-header", "model-gguf", "no-metadata", "inf", "uneven-experts", "gguf-empty"])
def test_bad_files_are_one_typed_error_naming_the_file(tmp_path, make, match):
    path = tmp_path / "bad.imatrix"
    path.write_bytes(make(tmp_path))
    with pytest.raises(ImatrixError, match=match) as e:
        load_imatrix(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImatrixError, match="cannot read: no such file"):
        load_imatrix(tmp_path / "nope.dat")
