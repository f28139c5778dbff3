"""Split GGUF files (llama-gguf-split's NAME-0000K-of-0000N.gguf): ours read as gguf-py reads
them, gguf-py's split writer's output loads here, any part opens the model, and a broken set of
parts is a one-line error naming the part."""

import shutil

import gguf
import numpy as np
import pytest

from quant.errors import GGUFFormatError
from quant.gguf_file import GGUFFile
from quant.gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, open_gguf, parse_size, plan_parts
from qwen3cli.io.convert import quantize
from qwen3cli.runtime.engine import Engine
from qwen3cli.io.loader import load

from test_hub import fake_repo


def logits(path, ids=(1, 5, 9, 3)):
    e = Engine(load(path), 64)
    return e.model.forward(list(ids), e.model.new_cache())


@pytest.fixture(scope="module")
def split_model(ckpt, tmp_path_factory):
    """A tiny checkpoint quantized whole and in parts of at most 40 KB of tensor data."""
    src, _ = ckpt(dtype="f32", std=0.05)
    d = tmp_path_factory.mktemp("split")
    whole = d / "whole.gguf"
    quantize(src, whole, "q8_0")
    s = quantize(src, d / "tiny.gguf", "q8_0", split_max_size=40_000)
    return whole, s


def test_parts_are_named_numbered_and_hold_every_tensor_once(split_model):
    whole, s = split_model
    n = s.parts
    assert n > 2 and s.out.name == f"tiny-00001-of-{n:05d}.gguf" and not (s.out.parent / "tiny.gguf").exists()
    with GGUFFile(whole) as w:
        names, tensors = [], {}
        for i in range(n):
            r = gguf.GGUFReader(s.out.with_name(f"tiny-{i + 1:05d}-of-{n:05d}.gguf"))  # the reference reader
            assert r.fields[SPLIT_NO].contents() == i and r.fields[SPLIT_COUNT].contents() == n
            assert r.fields[SPLIT_TENSORS].contents() == len(w.tensors)
            assert ("general.architecture" in r.fields) == (i == 0)  # the metadata lives in the first
            names += [t.name for t in r.tensors]
            assert sum(int(t.n_bytes) for t in r.tensors) <= 40_000 or len(r.tensors) == 1
            tensors.update({t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in r.tensors})
        assert sorted(names) == sorted(w.tensors)
        for name in w.tensors:
            assert np.array_equal(tensors[name], w.raw(name).reshape(-1)), name


def test_any_part_loads_the_whole_model(split_model):
    whole, s = split_model
    want = logits(whole)
    for i in (1, s.parts):
        np.testing.assert_array_equal(logits(s.out.with_name(f"tiny-{i:05d}-of-{s.parts:05d}.gguf")), want)


def test_gguf_py_split_files_load(split_model, tmp_path):
    whole, _ = split_model
    out = tmp_path / "ref.gguf"
    with GGUFFile(whole) as g:
        w = gguf.GGUFWriter(out, arch=g.metadata["general.architecture"], split_max_tensors=7)
        r = gguf.GGUFReader(whole)
        for f in r.fields.values():
            if f.name not in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
                vt = f.types[0]
                sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(f.name, f.contents(), vt, sub)
        for t in r.tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    parts = sorted(tmp_path.glob("ref-*-of-*.gguf"))
    assert len(parts) > 2
    np.testing.assert_array_equal(logits(parts[-1]), logits(whole))


def test_broken_sets_of_parts_are_errors(split_model, tmp_path):
    _, s = split_model
    n = s.parts
    for i in range(1, n + 1):
        name = f"tiny-{i:05d}-of-{n:05d}.gguf"
        shutil.copy(s.out.with_name(name), tmp_path / name)
    first, second = tmp_path / f"tiny-00001-of-{n:05d}.gguf", tmp_path / f"tiny-00002-of-{n:05d}.gguf"

    second.rename(tmp_path / "aside.gguf")
    with pytest.raises(GGUFFormatError, match=f"{second.name}: missing: part 2 of {n}"):
        open_gguf(first)
    shutil.copy(first, second)  # part 1's bytes under part 2's name
    with pytest.raises(GGUFFormatError, match=f"{second.name}: says it is part 1 of {n}, expected part 2"):
        open_gguf(first)
    shutil.copy(first, tmp_path / "renamed.gguf")
    with pytest.raises(GGUFFormatError, match=f"renamed.gguf: part of a {n}-part split file, but not named"):
        open_gguf(tmp_path / "renamed.gguf")


def test_quantize_refuses_existing_parts_before_writing(ckpt, tmp_path):
    src, _ = ckpt(dtype="f32", std=0.05)
    s = quantize(src, tmp_path / "m.gguf", "q8_0", split_max_size=40_000)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    from qwen3cli.errors import OutputError

    with pytest.raises(OutputError, match="exists"):
        quantize(src, tmp_path / "m.gguf", "q8_0", split_max_size=40_000)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert s.parts == len(before)


def test_hub_downloads_every_part(split_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from qwen3cli.io import hub

    _, s = split_model
    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    names = [f"tiny-{i:05d}-of-{s.parts:05d}.gguf" for i in range(1, s.parts + 1)]
    fake_repo(cache, "Qwen/Split-GGUF", {f"Tiny-Q8_0-{n[5:]}": s.out.with_name(n) for n in names})
    path = hub.resolve("Qwen/Split-GGUF:Q8_0")
    assert path.name == f"Tiny-Q8_0-00001-of-{s.parts:05d}.gguf"
    assert load("Qwen/Split-GGUF:Q8_0").args.n_layers > 0
    fake_repo(cache, "Qwen/Broken-GGUF", {f"Tiny-Q8_0-{n[5:]}": s.out.with_name(n) for n in names[:-1]})
    with pytest.raises(hub.HubError, match=f"split into {s.parts} parts but .*{s.parts:05d}.gguf is not in the repo"):
        hub.resolve("Qwen/Broken-GGUF:Q8_0")


def test_sizes_and_plans():
    assert parse_size("50G") == 50 * 10**9 and parse_size("500M") == 500 * 10**6 and parse_size("2.5k") == 2500
    for bad in ("", "0", "-1G", "5X", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert plan_parts([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert plan_parts([3, 3], 100) == [[0, 1]]


def test_cli_quantize_splits_requantizes_and_refuses(ckpt, tmp_path):
    from test_cli import leftovers, one_line_error, run

    src, _ = ckpt(dtype="bf16", std=0.05)  # bf16 values: the BF16 file holds them exactly
    code, _, err = run("quantize", src, "-o", tmp_path / "bf16.gguf", "--type", "bf16", "--split-max-size", "60k")
    assert code == 0, err
    parts = leftovers(tmp_path)
    assert len(parts) > 1 and parts[0] == f"bf16-00001-of-{len(parts):05d}.gguf" and f"in {len(parts)} parts" in err
    code, _, err = run("quantize", tmp_path / parts[-1], "-o", tmp_path / "q8.gguf", "--type", "q8_0")
    assert code == 0, err
    want = quantize(src, tmp_path / "direct.gguf", "q8_0").out
    with GGUFFile(tmp_path / "q8.gguf") as a, GGUFFile(want) as b:
        assert all(np.array_equal(a.raw(n), b.raw(n)) for n in b.tensors) and list(a.tensors) == list(b.tensors)
    code, _, err = run("quantize", tmp_path / "q8.gguf", "-o", tmp_path / "q4.gguf", "--type", "q4_0")
    assert code == 1
    one_line_error(err, "q8.gguf: already quantized (Q8_0)", "--allow-requantize")
    code, _, err = run("quantize", tmp_path / "q8.gguf", "-o", tmp_path / "q4.gguf", "--type", "q4_0", "--allow-requantize")
    assert code == 0, err
    code, _, err = run("quantize", src, "-o", tmp_path / "x.gguf", "--split-max-size", "lots")
    assert code == 1
    one_line_error(err, "--split-max-size", "'lots' is not a size")
    assert "x.gguf" not in leftovers(tmp_path) and not any(n.startswith(".") for n in leftovers(tmp_path))
