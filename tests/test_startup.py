"""Start-up: the tokenizer cache (tokenizer_cache.py) gives the tokenizer the metadata builds,
whatever state its entries are in."""

import json
from pathlib import Path

import pytest

from checkpoints import DATA
from quant.gguf_file import GGUFFile
from qwen3cli.text import tokenizer_cache
from qwen3cli.text.tokenizer import from_gguf_metadata
from qwen3cli.text.tokenizer_cache import load_tokenizer, tokenizer_key

CASES = json.loads((DATA / "expected_encodings.json").read_text())
TEXTS = [c["text"] for c in CASES["encodings"]] + [r["text"] for r in CASES["chat_renders"]] + [
    "<|im_end|> and <|im_eNd|>", "naïve 你好 🦙 😶‍🌫️\n\n\tdone", ""]


@pytest.fixture(scope="module")
def files(gguf_model, tmp_path_factory):
    """The tiny model's GGUF, and a copy whose tokenizer renames <|im_end|> (same length, so
    the file stays valid): two files, two tokenizers."""
    a, _ = gguf_model("q8_0")
    data = a.read_bytes()
    assert data.count(b"<|im_end|>") > 0
    b = tmp_path_factory.mktemp("other") / "renamed.gguf"
    b.write_bytes(data.replace(b"<|im_end|>", b"<|im_eNd|>"))
    return a, b


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


def same(tok, ref):
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def load_from_cache_only(md):
    """load_tokenizer, failing if it would have to build."""
    def refuse(*a, **kw):
        raise AssertionError("rebuilt although the cache holds the entry")

    mp = pytest.MonkeyPatch()
    mp.setattr(tokenizer_cache, "from_gguf_metadata", refuse)
    try:
        return load_tokenizer(md)
    finally:
        mp.undo()


def test_cached_tokenizer_is_the_built_one(files, cache):
    with GGUFFile(files[0]) as g:
        fresh = from_gguf_metadata(g.metadata)
        assert fresh.encode("Hello <|im_end|>").ids[-1] == 151645
        first = load_tokenizer(g.metadata)
        assert entries(cache) == [tokenizer_key(g.metadata) + ".json"]
        again = load_from_cache_only(g.metadata)
    same(first, fresh)
    same(again, fresh)
    for case in CASES["encodings"]:
        assert again.encode(case["text"]).ids == case["ids"], case["text"]


def test_files_with_different_tokenizers_do_not_share_an_entry(files, cache):
    (ga, gb) = (GGUFFile(files[0]), GGUFFile(files[1]))
    with ga, gb:
        assert tokenizer_key(ga.metadata) != tokenizer_key(gb.metadata)
        load_tokenizer(ga.metadata)
        load_tokenizer(gb.metadata)
        assert len(entries(cache)) == 2
        a, b = load_from_cache_only(ga.metadata), load_from_cache_only(gb.metadata)
        same(b, from_gguf_metadata(gb.metadata))
    assert a.token_to_id("<|im_end|>") == b.token_to_id("<|im_eNd|>") == 151645
    assert a.token_to_id("<|im_eNd|>") is None and b.token_to_id("<|im_end|>") is None


def test_an_entry_is_compact_and_gives_the_same_tokenizer(files, cache):
    """Merges as "a b" and the vocabulary in key order parse faster; the tokenizer is the one built."""
    with GGUFFile(files[0]) as g:
        fresh = from_gguf_metadata(g.metadata)
        load_tokenizer(g.metadata)
        (entry,) = cache.iterdir()
        model = json.loads(entry.read_bytes().partition(b"\n")[2])["model"]
        assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in model["merges"])
        assert list(model["vocab"]) == sorted(model["vocab"])
        assert load_from_cache_only(g.metadata).to_str() == fresh.to_str()


def test_compact_keeps_merges_with_a_space_as_pairs():
    text = json.dumps({"model": {"vocab": {"b": 1, "a": 0, "a b": 2}, "merges": [["a", " b"], ["a", "b"]]}})
    model = json.loads(tokenizer_cache._compact(text))["model"]
    assert model["merges"] == [["a", " b"], ["a", "b"]]
    assert list(model["vocab"]) == ["a", "a b", "b"]


def _swap_token(data: bytes) -> bytes:
    """Still valid JSON and a valid tokenizer, but another one: only the checksum can tell."""
    assert b'"<|im_end|>"' in data
    return data.replace(b'"<|im_end|>"', b'"<|im_eNd|>"')


CORRUPTIONS = {
    "empty": lambda d: b"",
    "truncated": lambda d: d[: len(d) // 2],
    "no header": lambda d: d.partition(b"\n")[2],
    "other key": lambda d: d.replace(d[19:83], b"0" * 64, 1),
    "token changed": _swap_token,
    "not UTF-8": lambda d: d[:-10] + b"\xff" * 10,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_entry_is_rebuilt(files, cache, how):
    with GGUFFile(files[0]) as g:
        fresh = from_gguf_metadata(g.metadata)
        load_tokenizer(g.metadata)
        (entry,) = cache.iterdir()
        good = entry.read_bytes()
        entry.write_bytes(CORRUPTIONS[how](good))
        assert entry.read_bytes() != good
        tok = load_tokenizer(g.metadata)
        same(tok, fresh)
        assert entry.read_bytes() == good  # rewritten
        load_from_cache_only(g.metadata)


def test_an_entry_that_is_a_directory_or_an_unwritable_cache_is_no_error(files, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(blocker))
    with GGUFFile(files[0]) as g:
        same(load_tokenizer(g.metadata), from_gguf_metadata(g.metadata))
        monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(tmp_path / "c"))
        (tmp_path / "c" / "tokenizers" / f"{tokenizer_key(g.metadata)}.json").mkdir(parents=True)
        same(load_tokenizer(g.metadata), from_gguf_metadata(g.metadata))


def test_metadata_not_read_from_a_file_is_built_not_cached(files, cache):
    with GGUFFile(files[0]) as g:
        md = dict(g.metadata, **{"tokenizer.ggml.tokens": list(g.metadata["tokenizer.ggml.tokens"])})
        assert tokenizer_key(md) is None
        same(load_tokenizer(md), from_gguf_metadata(g.metadata))
    assert entries(cache) == []


def test_load_uses_the_cache(files, cache):
    from qwen3cli.io.loader import load

    load(files[0])
    assert len(entries(cache)) == 1


def test_compile_watch_sees_compiles_not_cache_loads(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from qwen3cli.model.compiling import CompileWatch

    import uuid

    # numba caches it in tmp_path/__pycache__, or, once quant.kernels has set NUMBA_CACHE_DIR,
    # in that shared folder by path: a source of its own makes every run compile it first
    src = tmp_path / "kern.py"
    src.write_text(f"# {uuid.uuid4()}\nfrom numba import njit\n\n\n@njit\ndef inner(x):\n    return x + 1\n\n\n"
                   "@njit(cache=True)\ndef outer(x):\n    return inner(x) * 2\n")
    calls = []
    watch = CompileWatch(lambda: calls.append("start"), lambda: calls.append("end")).install()
    try:
        for name in ("kern_a", "kern_b"):  # the second is a fresh dispatcher over the same cached source
            spec = importlib.util.spec_from_file_location(name, src)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            assert mod.outer(3) == 8
            assert mod.outer(4) == 10
    finally:
        watch.remove()
        sys.modules.pop("kern_a", None), sys.modules.pop("kern_b", None)
    assert watch.count == 1 and calls == ["start", "end"]


LIGHT_CHILD = r"""
import sys
import numpy as np
import quant.kernels  # noqa: F401  (installs the light cache loads)
import numba
from numba.core import base

refreshes = []
orig = base.BaseContext.refresh
base.BaseContext.refresh = lambda self: (refreshes.append(1), orig(self))[1]
sys.path.insert(0, sys.argv[1])
import kern

x = np.arange(1000, dtype=np.float64)
assert abs(kern.outer(x) - (2 * x + 1).sum()) < 1e-9
print(len(refreshes), len(kern.outer.stats.cache_hits))

@numba.njit
def later(x):  # a compile after a light load: the pipeline refreshes the target itself
    return np.sqrt(x).sum()

assert abs(later(x) - np.sqrt(x).sum()) < 1e-9
print(len(refreshes))
"""


def test_a_cache_load_skips_numbas_registries_and_compiling_still_works(tmp_path):
    """A kernel loaded from numba's cache runs without numba's registries (quant/kernels), and
    the first compile after it builds them as before."""
    import os
    import subprocess
    import sys

    (tmp_path / "kern.py").write_text(
        "import numpy as np\nfrom numba import njit, prange\n\n\n"
        "@njit(cache=True, parallel=True)\ndef outer(x):\n    y = np.empty_like(x)\n"
        "    for i in prange(x.shape[0]):\n        y[i] = 2 * x[i] + 1\n    return y.sum()\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", LIGHT_CHILD, str(tmp_path)], capture_output=True, text=True,
                           cwd=root, env=env) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (r.stdout.split() for r in runs)
    assert first[1] == "0" and int(first[0]) > 0  # compiled: the registries were built for it
    assert second[:2] == ["0", "1"]  # loaded from the cache, with no refresh
    assert int(second[2]) > 0


def test_open_engine_warms_up_only_after_a_compile(files, monkeypatch):
    import numba

    from quant.kernels import matmul_cpu
    from qwen3cli.runtime import engine
    from qwen3cli.runtime.loading import open_engine

    warmed = []
    monkeypatch.setattr(matmul_cpu, "warm_up", lambda forward: warmed.append(forward))
    open_engine(str(files[0]), 64, "q8_0", "cpu")  # this process may compile here: not asserted
    warmed.clear()
    open_engine(str(files[0]), 64, "q8_0", "cpu")
    assert warmed == []  # every kernel the engine uses is loaded: no warm-up

    class Compiling(engine.Engine):  # an engine whose packing compiles a kernel, as on a first run
        def __init__(self, *a, **kw):
            numba.njit(lambda x: x + 1)(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(engine, "Engine", Compiling)
    e = open_engine(str(files[0]), 64, "q8_0", "cpu")
    assert len(warmed) == 1
    warmed[0](2)  # the warm-up runs the engine's forward
    assert e.model.ctx == 64


def _recording_hooks(events):
    from qwen3cli.runtime.loading import LoadHooks

    return LoadHooks(progress=lambda what, done, total: events.append(("progress", what)),
                     warning=lambda line: events.append(("warning", line)),
                     note=lambda line: events.append(("note", line)), stage=lambda text: events.append(("stage", text)))


def test_open_engine_reports_through_hooks_and_prints_nothing(gguf_model, capfd, tmp_path, monkeypatch):
    """A directory converts while it loads: progress first, then the loader's warnings, and not a
    byte on stdout or stderr (the CLI draws them)."""
    from qwen3cli.io.loader import load
    from qwen3cli.runtime.loading import open_engine

    _, src = gguf_model("q8_0")
    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "first"))
    want = load(src).warnings
    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "second"))  # converted again, as on a first run
    capfd.readouterr()
    events = []
    e = open_engine(str(src), 32, "q8_0", "cpu", hooks=_recording_hooks(events))
    assert capfd.readouterr() == ("", "")
    assert e.ctx == 32 and e.model.device == "cpu"
    kinds = [k for k, _ in events]
    assert "progress" in kinds and kinds == sorted(kinds, key=lambda k: k != "progress"), kinds
    assert [line for k, line in events if k == "warning"] == want
    assert any(k == "note" and "converted" in line for k, line in events)  # where the conversion went
    assert "stage" not in kinds  # the CPU has no slow step after the load to announce


def test_open_engine_announces_the_gpu_steps_and_ends_them_on_failure(files, monkeypatch):
    from quant.kernels import matmul_cpu
    from qwen3cli.model import device
    from qwen3cli.runtime import engine
    from qwen3cli.errors import Qwen3CliError
    from qwen3cli.runtime.loading import GPU_STAGE, open_engine

    events = []
    monkeypatch.setattr(device, "pick", lambda d: ("cuda", None))
    monkeypatch.setattr(matmul_cpu, "warm_up", lambda forward: events.append(("warm_up", None)))

    class FakeGpuEngine:
        def __init__(self, loaded, ctx, device, exact, cache_type):
            assert device == "cuda" and events == [("stage", GPU_STAGE)]
            self.model = type("M", (), {"ops": type("O", (), {"summary": "a summary"})()})()

    monkeypatch.setattr(engine, "Engine", FakeGpuEngine)
    open_engine(str(files[0]), 16, hooks=_recording_hooks(events))
    assert events == [("stage", GPU_STAGE), ("note", "a summary"), ("warm_up", None), ("stage", None)]

    class Broken(FakeGpuEngine):
        def __init__(self, *a, **kw):
            raise Qwen3CliError("no room on the GPU")

    events.clear()
    monkeypatch.setattr(engine, "Engine", Broken)
    with pytest.raises(Qwen3CliError, match="no room"):
        open_engine(str(files[0]), 16, hooks=_recording_hooks(events))
    assert events == [("stage", GPU_STAGE), ("stage", None)]  # the CLI's status is stopped


def test_the_cache_keeps_the_newest_entries(files, cache, monkeypatch):
    import os

    monkeypatch.setattr(tokenizer_cache, "MAX_ENTRIES", 2)
    cache.mkdir(parents=True)
    for i, name in enumerate(("old.json", "newer.json")):
        (cache / name).write_text("{}")
        os.utime(cache / name, (1000 + i, 1000 + i))
    with GGUFFile(files[0]) as g:
        load_tokenizer(g.metadata)
        assert entries(cache) == sorted(["newer.json", tokenizer_key(g.metadata) + ".json"])


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from qwen3cli.paths import cache_dir

    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(tmp_path / "ours"))
    assert cache_dir() == tmp_path / "ours"
    monkeypatch.delenv("QWEN3CLI_CACHE_DIR")
    assert cache_dir() == tmp_path / "hub"
    monkeypatch.delenv("QWEN3CLI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qwen3cli"


def _cache_dir_of(env: dict) -> str:
    import subprocess
    import sys

    code = "import os, quant.kernels; print(os.environ.get('NUMBA_CACHE_DIR', ''))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_numba_cache_is_per_kernel_sources(tmp_path, monkeypatch):
    # numba checks a cached kernel against its own file only, while inlined callees from other
    # modules are compiled in: the cache folder is named by a hash of every kernel source
    import hashlib
    import os
    from pathlib import Path

    import quant.kernels

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["QWEN3CLI_NUMBA_CACHE"] = str(tmp_path / "numba")
    h = hashlib.sha256()
    for p in sorted(Path(quant.kernels.__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    assert _cache_dir_of(env) == str(tmp_path / "numba" / h.hexdigest()[:16])
    for i in range(6):  # older folders are pruned: the four newest stay
        (tmp_path / "numba" / f"old{i}").mkdir()
        os.utime(tmp_path / "numba" / f"old{i}", (i, i))
    _cache_dir_of(env)
    assert len(list((tmp_path / "numba").iterdir())) == 4
    assert _cache_dir_of({**env, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}) == str(tmp_path / "mine")


def test_trim_heap_returns_the_tokenizers_parse_buffers():
    # glibc keeps the ~40 MB the tokenizer's parse freed; numpy's big arrays never reuse it
    import subprocess
    import sys
    from pathlib import Path

    code = """
import tokenizers, sys
from qwen3cli.model.memory import trim_heap
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024
t = tokenizers.Tokenizer.from_file(sys.argv[1])
before = anon()
trim_heap()
print(before - anon(), len(t.get_vocab()))
"""
    path = Path(__file__).parent.parent / "qwen3cli" / "data" / "qwen3-tokenizer" / "tokenizer.json"
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    freed, vocab = map(int, r.stdout.split())
    assert vocab > 150_000 and freed >= 10, f"trim_heap gave back {freed} MB"


def test_a_cached_tokenizer_is_parsed_on_a_thread(files, cache):
    import threading

    from qwen3cli.text.tokenizer_cache import start_tokenizer

    with GGUFFile(files[0]) as g:
        fresh = load_tokenizer(g.metadata)  # writes the entry
        seen = []
        pending = start_tokenizer(g.metadata, done=lambda: seen.append(threading.current_thread()))
        tok = pending.result()
    assert seen and seen[0] is not threading.main_thread()
    assert tok.to_str() == fresh.to_str()
    same(tok, fresh)


def test_a_parse_that_fails_on_the_thread_is_rebuilt_on_the_callers(files, cache, monkeypatch):
    from qwen3cli.text.tokenizer_cache import start_tokenizer

    with GGUFFile(files[0]) as g:
        fresh = load_tokenizer(g.metadata)
        monkeypatch.setattr(tokenizer_cache, "_parse", lambda body, n: None)
        tok = start_tokenizer(g.metadata).result()
    same(tok, fresh)


def test_load_lets_the_headers_pages_go(files, cache):
    # the metadata (the tokenizer's ~5 MB) is read once: its pages should not stay resident
    import os

    from qwen3cli.io.loader import load

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps")
    m = load(files[0])
    header = m._keep.data_start
    path = str(files[0])
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if not line.split()[0].endswith(":"):  # a mapping's first line: its address range, ..., its path
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    assert header > 4 << 20
    assert rss < header / 4, f"{rss} bytes of the file resident, header {header}"
    assert m.tokenizer.token_to_id("<|im_end|>") in m.stop_ids


def test_cli_modules_leave_the_engine_unloaded():
    """Each CLI module, imported alone, loads neither numba, numpy, the kernels nor the engine:
    `qwen3cli --help` and a usage error stay fast, whichever command module a user's code or a
    test imports first."""
    from test_imports import ROOT, import_each, modules_under

    heavy = ("numba", "numpy", "quant.kernels", "qwen3cli.runtime.engine", "qwen3cli.model.forward",
             "qwen3cli.runtime.conversation", "prompt_toolkit", "tokenizers", "jinja2")
    # every one but the chat's terminal UI, which `chat` imports only when it runs
    names = [n for n in modules_under(ROOT) if (n == "qwen3cli.cli" or n.startswith("qwen3cli.cli."))
             and n != "qwen3cli.cli.chat_ui"]
    assert "qwen3cli.cli.run" in names and "qwen3cli.cli.quantize" in names
    results = import_each(names, watch=heavy)
    assert {n: loaded for n, (ok, _, loaded) in results.items() if loaded or not ok} == {}
    # the watch sees what a heavy import loads: the library factory's own module pulls the engine in
    (ok, _, loaded), = import_each(["qwen3cli.runtime.engine"], watch=heavy).values()
    assert ok and "numba" in loaded and "qwen3cli.runtime.engine" in loaded


def test_prestart_hands_its_header_and_parse_to_the_load_of_that_file_only(files, cache, monkeypatch):
    """io/early.py: the tokenizer's parse starts at the top of a command, before numba's
    imports, and the loader takes it up for the same file; any other file loads as before."""
    import subprocess
    import sys

    from qwen3cli.io import early
    from qwen3cli.io.loader import load

    fresh = load(files[0]).tokenizer  # writes the entry: prestart only parses a cached one
    early.prestart(files[0])
    started = early._early
    assert started is not None and started.tokenizer is not None
    opened = []
    monkeypatch.setattr("qwen3cli.io.loader.open_gguf", lambda p: opened.append(p))  # must not be needed
    m = load(files[0])
    assert opened == [] and early._early is None and m.tokenizer is started.tokenizer.result()
    same(m.tokenizer, fresh)
    monkeypatch.undo()
    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(cache.parent))

    early.prestart(files[0])  # then another file is loaded: its own header and tokenizer
    other = load(files[1])
    assert early._early is None and other.tokenizer.token_to_id("<|im_eNd|>") is not None
    assert other.tokenizer.token_to_id("<|im_end|>") is None

    # nothing for a directory, a missing path, or a file that is not a GGUF: the loader reports
    for bad in (files[0].parent, files[0].parent / "missing.gguf", Path(__file__)):
        early.prestart(bad)
        assert early._early is None
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "run", __file__, "Hi", "-n", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "test_startup.py" in r.stderr, r.stderr


def test_prestart_of_a_file_changed_since_is_not_taken(files, cache, tmp_path):
    import os
    import shutil

    from qwen3cli.io import early
    from qwen3cli.io.loader import load

    path = tmp_path / "m.gguf"
    shutil.copyfile(files[0], path)
    load(path)
    early.prestart(path)
    assert early._early is not None
    shutil.copyfile(files[1], path)  # replaced between the command's start and its load
    os.utime(path, ns=(1, 1))
    m = load(path)
    assert m.tokenizer.token_to_id("<|im_eNd|>") is not None


def test_the_collector_pauses_only_for_a_process_main_start(monkeypatch):
    """base.pause_gc / resume_gc and keep_until_exit act only where process_main owns the
    process: a test or a program calling main() keeps its collector and its memory."""
    import gc

    from qwen3cli.cli import base

    assert gc.isenabled()
    base.pause_gc()
    base.keep_until_exit(object())
    assert gc.isenabled() and base._kept == []
    monkeypatch.setattr(base, "_whole_process", True)
    monkeypatch.setattr(base, "_kept", [])
    try:
        base.pause_gc()
        assert not gc.isenabled()
        base.resume_gc()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        base.resume_gc()  # once only
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
