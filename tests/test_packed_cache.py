"""The packed-weights cache (packed_cache.py): a warm start maps the weights an earlier run
packed, and gives exactly what packing the file now would, whatever state its entry is in."""

import hashlib
import json
import os
import threading
import time

from dataclasses import fields

import numpy as np
import pytest

from quant.kernels.layouts import Mat

from qwen3cli.model import packed_cache
from qwen3cli.io.loader import load
from qwen3cli.model.ops_cpu import CpuOps, prepare
from qwen3cli.model.packed_cache import MAGIC, PackedStore

SMALL = dict(hidden=256, ffn=512, heads=8, head_dim=32, layers=2)
KINDS = {"q8_0": ("q8_0", SMALL), "q4_k_m": ("q4_k_m", SMALL), "q5_k_m": ("q5_k_m", SMALL),
         "q4_0-moe-tied": ("q4_0", dict(SMALL, moe=True, tied=True))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(packed_cache.ENV_MAX, raising=False)
    return tmp_path / "cache" / "packed"


def logits_of(w, args):
    """Prefill and one decode step over the prepared weights w (int8 activations)."""
    from qwen3cli.model.forward import Model
    from qwen3cli.model.rope import make_rope, scaling_for_context

    m = Model.__new__(Model)  # Model's forward over weights given as they are: no packing here
    m.args, m.ctx, m.w, m.chunk = args, 32, w, None
    m.ops = CpuOps(args, make_rope(args, scaling_for_context(args, 32)), "f32", exact=False)
    c = m.ops.new_cache(32)
    return np.concatenate([m.forward([1, 5, 9, 3, 7], c), m.forward([2], c)])


def packed_now(path):
    """What packing the file now gives, with no cache involved: its logits, and the arrays."""
    m = load(path)
    w = prepare(m.weights, None, exact=False)
    return logits_of(w, m.args), w


def by_slot(w) -> dict:
    out = {"output": w.output, "token_embd": w.token_embd}
    for i, ly in enumerate(w.layers):
        out.update({f"layers.{i}.{k}": v for k, v in vars(ly).items()})
    return out


def same(got, want) -> None:
    """Every slot the same: packed matrices bit for bit, in the same classes and dtypes. The
    logits only nearly: the threaded prefill's sums may round apart between two runs."""
    (la, wa), (lb, wb) = got, want
    sa, sb = by_slot(wa), by_slot(wb)
    assert sa.keys() == sb.keys()
    for name, a in sa.items():
        b = sb[name]
        if isinstance(b, Mat):
            assert (a.name, a.type, a.rows, a.k, a.n_mats, type(a.arrays)) == \
                (b.name, b.type, b.rows, b.k, b.n_mats, type(b.arrays)), name
            for f in fields(b.arrays):
                x, y = getattr(a.arrays, f.name), getattr(b.arrays, f.name)
                if isinstance(y, np.ndarray):
                    assert x.dtype == y.dtype and x.flags.c_contiguous and np.array_equal(x, y), (name, f.name)
                else:
                    assert x == y, (name, f.name)
        else:
            assert type(a) is type(b), name
            if isinstance(b, np.ndarray):
                assert np.array_equal(a, b), name
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def through_store(path, refuse_packing=False):
    """The weights CpuOps prepares with the file's store, and their logits (the entry written)."""
    m = load(path)
    store = PackedStore(path)

    def refuse(*a, **kw):
        raise AssertionError("packed although the cache holds the entry")

    with pytest.MonkeyPatch.context() as mp:
        if refuse_packing:
            mp.setattr("qwen3cli.model.ops_cpu.prepare", refuse)
        w = CpuOps(m.args, None, "f32", exact=False).prepare(m.weights, None, store)
    store.wait()
    return logits_of(w, m.args), w


def entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_cached_pack_is_the_pack(gguf_model, cache, kind):
    type_name, kw = KINDS[kind]
    path, _ = gguf_model(type_name, **kw)
    want = packed_now(path)
    first = through_store(path)
    assert entries(cache) == [PackedStore(path).key + ".bin"]
    again = through_store(path, refuse_packing=True)
    same(first, want)
    same(again, want)
    w = again[1]
    q = w.layers[0].qkv.arrays.q
    assert not q.flags.owndata  # a view of the mapped entry
    assert q.flags.writeable  # the kernels' own argument types: no new compile for read-only arrays
    if kw.get("tied"):
        assert w.token_embd is w.output


def _rewrite_in_place(path, change):
    """The file's bytes changed in place, its size and mtime kept, as a copy tool could."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    change(data)
    while True:
        with open(path, "r+b") as f:
            f.write(data)
        if os.stat(path).st_ctime_ns != st.st_ctime_ns:
            break
        time.sleep(0.01)  # the same coarse clock tick: write again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_file_changed_in_place_is_packed_again(gguf_model, cache, tmp_path):
    src, _ = gguf_model("q8_0", **SMALL)
    path = tmp_path / "model.gguf"
    path.write_bytes(src.read_bytes())
    old = through_store(path)
    m = load(path)
    t = m._keep.tensors["blk.0.ffn_down.weight"]
    del m

    def change(data):  # every block scale of the tensor doubled (float16 exponent + 1)
        rows = t.nbytes // 34
        for b in range(rows):
            at = t.offset + 34 * b + 1
            data[at] = min(data[at] + 4, 0x7B) if data[at] & 0x7C else data[at]

    _rewrite_in_place(path, change)
    want = packed_now(path)
    assert not np.array_equal(want[1].layers[0].down.arrays.d, old[1].layers[0].down.arrays.d)
    assert not np.allclose(want[0], old[0], rtol=1e-3, atol=1e-3)
    same(through_store(path), want)
    assert len(entries(cache)) == 2  # the old entry stays until pruned: nothing reads it


def _entry_with(header_change=None, body_change=None):
    def corrupt(data: bytes) -> bytes:
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        start = len(MAGIC) + 40
        header = json.loads(data[start:start + n])
        if header_change:
            header_change(header)
        body = json.dumps(header, separators=(",", ":")).encode()
        assert len(body) <= n + 64
        out = MAGIC + len(body).to_bytes(8, "little") + hashlib.sha256(body).digest() + body
        return out + data[len(out):]
    return corrupt


def _set_rows(header):
    mat = next(v["mat"] for k, v in header["slots"].items() if k.endswith(".qkv"))
    mat["rows"] += 32


def _move_array(header):
    header["arrays"][0]["offset"] = header["size"]


CORRUPTIONS = {
    "empty": lambda d: b"",
    "truncated": lambda d: d[: len(d) // 2],
    "no magic": lambda d: b"x" * 16 + d[16:],
    "header bytes flipped": lambda d: d[:len(MAGIC) + 60] + bytes([d[len(MAGIC) + 60] ^ 1]) + d[len(MAGIC) + 61:],
    "other key": _entry_with(lambda h: h.update(key="0" * 64)),
    "shape not the file's": _entry_with(_set_rows),
    "array outside the file": _entry_with(_move_array),
    "a slot missing": _entry_with(lambda h: h["slots"].pop("layers.1.o")),
    "a class not ours": _entry_with(lambda h: next(v for v in h["slots"].values() if isinstance(v, dict) and "mat" in v)
                                    ["mat"].update(cls="os:system")),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_bad_entry_is_packed_again_and_rewritten(gguf_model, cache, how):
    path, _ = gguf_model("q8_0", **SMALL)
    want = packed_now(path)
    through_store(path)
    (entry,) = cache.iterdir()
    good = entry.read_bytes()
    entry.write_bytes(CORRUPTIONS[how](good))
    assert entry.read_bytes() != good
    assert PackedStore(path).load() is None or how in ("shape not the file's", "a slot missing")
    same(through_store(path), want)
    assert entry.read_bytes() == good  # rewritten


def test_no_cache_when_off_or_unwritable(gguf_model, cache, tmp_path, monkeypatch):
    path, _ = gguf_model("q8_0", **SMALL)
    want = packed_now(path)
    monkeypatch.setenv(packed_cache.ENV_MAX, "0")
    assert PackedStore.for_file(path) is None
    monkeypatch.setenv(packed_cache.ENV_MAX, "1000")  # smaller than the entry: not written
    same(through_store(path), want)
    assert entries(cache) == []
    monkeypatch.delenv(packed_cache.ENV_MAX)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(blocker))
    same(through_store(path), want)


def test_the_newest_entries_are_kept(gguf_model, cache, monkeypatch):
    path, _ = gguf_model("q8_0", **SMALL)
    monkeypatch.setattr(packed_cache, "MAX_ENTRIES", 3)
    cache.mkdir(parents=True)
    for i in range(4):
        (cache / f"old{i}.bin").write_bytes(b"x")
        os.utime(cache / f"old{i}.bin", (1000 + i, 1000 + i))
    through_store(path)
    assert entries(cache) == sorted(["old2.bin", "old3.bin", PackedStore(path).key + ".bin"])


def test_the_engine_maps_the_entry_on_a_second_load(gguf_model, cache):
    from qwen3cli.runtime.engine import Engine

    path, _ = gguf_model("q8_0", **SMALL)
    e1 = Engine(load(path), 32)
    for t in threading.enumerate():
        if t.name == "packed-cache":
            t.join()
    assert len(entries(cache)) == 1
    e2 = Engine(load(path), 32)
    ids = [1, 4, 9, 2]
    np.testing.assert_allclose(e1.model.forward(ids, e1.model.new_cache()), e2.model.forward(ids, e2.model.new_cache()),
                               rtol=1e-5, atol=1e-5)
    exact = Engine(load(path), 32, exact=True)  # the float layouts are not cached
    assert len(entries(cache)) == 1 and exact.model.ops.exact


def test_the_cli_writes_the_entry_before_its_process_exits(gguf_model, cache):
    """`python -m qwen3cli` ends with os._exit (cli/entry.py process_main): the answer is
    flushed, the exit code kept, and the cache writer's thread finishes first."""
    import subprocess
    import sys

    path, _ = gguf_model("q8_0", **SMALL)
    cmd = [sys.executable, "-m", "qwen3cli", "run", str(path), "Hello", "-n", "3", "--temp", "0", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["finish_reason"] in ("length", "stop")
    assert entries(cache) == [PackedStore(path).key + ".bin"]
    assert PackedStore(path).load() is not None
    for args, code in ((["--ctx", "0"], 1), (["--bogus"], 2)):  # a usage error, a command line click refuses
        bad = subprocess.run([sys.executable, "-m", "qwen3cli", "run", str(path), "Hello", *args],
                             capture_output=True, text=True)
        assert bad.returncode == code and args[0] in bad.stderr, bad.stderr
