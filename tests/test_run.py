"""`qwen3cli run` end to end on a tiny model: clean stdout, --json, stdin, and every bad input
as one line and a non-zero exit."""

import json
import struct

import pytest
from typer.testing import CliRunner

from qwen3cli.cli import app
from qwen3cli.sampler import Sampler


def run(*args, input=None):
    r = CliRunner().invoke(app, ["run", *[str(a) for a in args]], input=input)
    return r.exit_code, r.stdout, r.stderr


def one_line_error(code, stderr, *needles):
    assert code == 1, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def tiny(gguf_model):
    return gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)[0]


@pytest.fixture
def scripted(monkeypatch):
    """Make the sampler emit a thinking block, then an answer, then stop."""
    from tokenizers import Tokenizer

    from checkpoints import TOKENIZER

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    seq = enc("<think>\nsecret pondering\n</think>\n\nThe answer is 42.<|im_end|>")
    monkeypatch.setattr(Sampler, "__call__", lambda self, logits, generated: seq[len(generated)])
    return seq


def test_answer_only_on_stdout_with_hide_thinking(tiny, scripted):
    code, out, err = run(tiny, "What is 6*7?", "--hide-thinking")
    assert code == 0, err
    assert out == "The answer is 42.\n"
    assert "secret" not in err and "think" not in out


def test_thinking_goes_to_stderr_when_shown(tiny, scripted):
    code, out, err = run(tiny, "What is 6*7?")
    assert code == 0 and out == "The answer is 42.\n"
    assert "secret pondering" in err and "<think>" not in err


def test_json(tiny, scripted):
    code, out, err = run(tiny, "What is 6*7?", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["answer"] == "The answer is 42." and d["thinking"] == "secret pondering"
    assert d["finish_reason"] == "stop" and d["completion_tokens"] == len(scripted)
    assert d["thinking_tokens"] > 0 and d["prompt_tokens"] > 0
    assert set(d["timings"]) >= {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_real_sampling_json_and_stdin(tiny):
    code, out, err = run(tiny, "--json", "-n", "6", "--temp", "0", "--no-think", input="a piped prompt")
    assert code == 0, err
    d = json.loads(out)
    assert d["completion_tokens"] == 6 and d["finish_reason"] in ("length", "stop")
    code2, out2, _ = run(tiny, "--json", "-n", "6", "--temp", "0", "--no-think", input="a piped prompt")
    assert json.loads(out2)["answer"] == d["answer"]  # greedy is deterministic


def test_out_of_tokens_in_thinking(tiny, scripted):
    code, out, err = run(tiny, "q", "-n", "3", "--json")
    assert code == 0 and json.loads(out)["finish_reason"] == "length_in_thinking"
    code, out, err = run(tiny, "q", "-n", "3")
    assert out == "" and "inside the thinking" in err


def _patch_type(src, dst, tensor: str, new_type: int):
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, new_type)
    dst.write_bytes(bytes(data))


def _nan_scale(src, dst, tensor: str):
    """The first Q8_0 block of the tensor gets an fp16 NaN scale."""
    from quant.gguf_file import GGUFFile

    with GGUFFile(src) as g:
        at = g.tensors[tensor].offset
    data = bytearray(src.read_bytes())
    data[at:at + 2] = b"\x00\x7e"
    dst.write_bytes(bytes(data))


def test_bad_inputs(tiny, tmp_path):
    one_line_error(*run(tmp_path / "missing.gguf", "hi")[::2], "missing.gguf", "no such file")
    (tmp_path / "text.gguf").write_text("hello, not a gguf")
    one_line_error(*run(tmp_path / "text.gguf", "hi")[::2], "text.gguf", "not a GGUF")
    (tmp_path / "cut.gguf").write_bytes(tiny.read_bytes()[:4096])
    one_line_error(*run(tmp_path / "cut.gguf", "hi")[::2], "cut.gguf")
    _patch_type(tiny, tmp_path / "q81.gguf", "blk.0.attn_q.weight", 9)  # Q8_1: not runnable
    one_line_error(*run(tmp_path / "q81.gguf", "hi")[::2], "blk.0.attn_q.weight", "Q8_1")
    _nan_scale(tiny, tmp_path / "nan.gguf", "blk.0.attn_q.weight")
    one_line_error(*run(tmp_path / "nan.gguf", "hi")[::2], "nan.gguf", "NaN")
    one_line_error(*run(tiny, "word " * 100, "--ctx", "32")[::2], "context", "--ctx")
    one_line_error(*run(tiny, "hi", "--temp", "-1")[::2], "--temp must be >= 0")
    one_line_error(*run(tiny, "hi", "--ctx", "0")[::2], "--ctx")
    one_line_error(*run(tiny, input="")[::2], "no prompt")


def test_bench_json(tiny):
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "12", "-n", "4", "-r", "2", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert [x["test"] for x in d["results"]] == ["pp12", "tg4"]
    assert all(len(x["runs"]) == 2 and x["tokens_per_s"] > 0 for x in d["results"])
    assert d["peak_rss_mb"] > 0 and d["load_s"] > 0 and d["weights_mb"] > 0 and d["device"] == "cpu"
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "0", "-n", "0"])
    assert r.exit_code == 1 and r.stderr.startswith("error: ")
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "0", "-n", "3", "-r", "1", "--json"])  # decode only
    assert r.exit_code == 0, r.stderr
    assert [x["test"] for x in json.loads(r.stdout)["results"]] == ["tg3"]


def test_bench_at_depth(tiny):
    # llama-bench's -d: the context is filled once, and every timed run starts `depth` tokens in
    from qwen3cli.runtime.bench import run_bench
    from qwen3cli.runtime.engine import Engine
    from qwen3cli.io.loader import load

    engine = Engine(load(tiny), ctx=64)
    calls, forward = [], engine.model.forward

    def spy(tokens, cache, *a, **kw):
        calls.append((len(tokens), cache.n))
        return forward(tokens, cache, *a, **kw)

    engine.model.forward = spy
    res = run_bench(engine, prompt=5, gen=3, reps=2, depth=20)
    assert [r.test for r in res] == ["pp5 @ d20", "tg3 @ d20"]
    assert calls[0] == (20, 0) and calls.count((20, 0)) == 1  # the context, once
    runs = [c for c in calls[1:] if c[1] == 20]  # each pp run and each tg run's first token
    assert runs == [(5, 20)] * 3 + [(1, 20)] * 3
    assert all(n == 1 for n, _ in calls[1:] if _ != 20)  # the rest is decode
    from qwen3cli.runtime.bench import Context

    calls.clear()  # one Context for the calls at a depth: pp and tg share one fill
    context = Context(20)
    run_bench(engine, prompt=5, gen=0, reps=1, depth=20, context=context)
    run_bench(engine, prompt=0, gen=2, reps=1, depth=20, context=context)
    assert calls.count((20, 0)) == 1 and context.fill_s > 0
    r = CliRunner().invoke(app, ["bench", str(tiny), "-d", "16", "-p", "4", "-n", "2", "-r", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["depth"] == 16 and d["ctx"] >= 16 + 4 + 2 and d["fill_s"]["16"] > 0
    assert [x["test"] for x in d["results"]] == ["pp4 @ d16", "tg2 @ d16"]
    r = CliRunner().invoke(app, ["bench", str(tiny), "-d", "40", "--ctx", "32"])
    assert r.exit_code == 1 and "--ctx must be at least" in r.stderr


def test_device_choice(tiny, scripted, monkeypatch):
    import importlib.util

    from numba import config, cuda

    code, out, errs = run(tiny, "hi", "--no-think", "-n", "3", "--json")  # auto never picks the tests' simulator
    assert code == 0 and json.loads(out)["device"] == "cpu" and "running on" not in errs
    one_line_error(*run(tiny, "hi", "--device", "tpu")[::2], "--device must be one of auto, cpu, cuda")
    code, _, errs = run(tiny, "hi", "--device", "cpu", "-n", "3")
    assert code == 0 and "running on" not in errs
    monkeypatch.setattr(config, "ENABLE_CUDASIM", False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr("qwen3cli.model.device._driver_present", lambda: True)  # a driver, but no GPU it can use
    one_line_error(*run(tiny, "hi", "--device", "cuda")[::2], "--device cuda: no CUDA GPU found")
    code, _, errs = run(tiny, "hi", "-n", "3")
    assert code == 0 and "running on the CPU: no CUDA GPU found" in errs
    monkeypatch.setattr("qwen3cli.model.device._driver_present", lambda: False)
    one_line_error(*run(tiny, "hi", "--device", "cuda")[::2], "no NVIDIA driver found")
    code, _, errs = run(tiny, "hi", "-n", "3")  # the extra but no driver: nobody expected a GPU here
    assert code == 0 and "running on" not in errs
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "numba_cuda" else real(n, *a))
    one_line_error(*run(tiny, "hi", "--device", "cuda")[::2], "numba-cuda is not installed", "qwen3cli[cuda]")
    code, _, errs = run(tiny, "hi", "-n", "3")  # no extra, no expectation of a GPU: no line
    assert code == 0 and "running on" not in errs


def test_llama_cpp_flag_habits(tiny, tmp_path):
    """-f FILE is the prompt file, -s the seed, --ctx-size the context, -sys / --system-prompt
    the system prompt: one meaning per short flag, llama.cpp's where it has one."""
    (tmp_path / "p.txt").write_text("Tell me about cats.")
    base = ["--no-think", "-n", "6", "--json", "--temp", "0.9"]
    code, a, err = run(tiny, "-f", tmp_path / "p.txt", "-s", "5", "--ctx-size", "96", *base)
    assert code == 0, err
    code, b, err = run(tiny, "Tell me about cats.", "--seed", "5", "--ctx", "96", *base)
    assert code == 0 and json.loads(a) | {"timings": 0} == json.loads(b) | {"timings": 0}
    code, c, _ = run(tiny, "Tell me about cats.", "-sys", "Be brief.", "--seed", "5", *base)
    code, d, _ = run(tiny, "Tell me about cats.", "--system-prompt", "Be brief.", "--seed", "5", *base)
    assert json.loads(c)["prompt_tokens"] == json.loads(d)["prompt_tokens"] > json.loads(b)["prompt_tokens"]
    one_line_error(*run(tiny, "-f", tmp_path / "missing.txt")[::2], "missing.txt")


@pytest.fixture(scope="module")
def always_thinks(tmp_path_factory):
    """A tiny model with Qwen3-Thinking-2507's template: the prompt opens <think>, --no-think cannot switch it."""
    from checkpoints import DATA, make_checkpoint
    from qwen3cli.io.convert import quantize

    d = tmp_path_factory.mktemp("thinking2507")
    src, _ = make_checkpoint(d / "ck", dtype="f32", std=0.05)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (DATA / "templates" / "Qwen-Qwen3-4B-Thinking-2507.jinja").read_text()
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    return quantize(src, d / "m.gguf", "q8_0").out


def test_run_thinking_budget_display_and_mode_note(always_thinks):
    # a random model never closes its thinking: the budget does, and -n still leaves room for an answer
    code, out, err = run(always_thinks, "hi", "--thinking-budget", "3", "-n", "6", "--json", "--temp", "0")
    assert code == 0, err
    j = json.loads(out)
    assert j["thinking_tokens"] == 3 and j["finish_reason"] == "length", j
    code, out, err = run(always_thinks, "hi", "--thinking-budget", "3", "-n", "6", "--thinking", "collapse",
                         "--no-think")
    assert code == 0 and "this model always thinks: --no-think has no effect" in err
    assert "(thought for 3 tokens, budget hit" in err
    code, _, err = run(always_thinks, "hi", "--thinking", "loud")
    assert code == 1 and "--thinking must be one of show, collapse, hide" in err


def test_bench_sweeps_like_llama_bench(tiny):
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "4,8", "-n", "2,3", "-d", "0,6", "-r", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert [(x["test"], x["depth"]) for x in d["results"]] == [
        ("pp4", 0), ("pp8", 0), ("tg2", 0), ("tg3", 0), ("pp4 @ d6", 6), ("pp8 @ d6", 6), ("tg2 @ d6", 6),
        ("tg3 @ d6", 6)]
    assert d["params"] > 0 and d["ctx"] >= 6 + 8 + 3
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "4", "-n", "2", "-r", "1"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "params" in r.stdout and "pp4" in r.stdout and "CPU" in r.stdout
    r = CliRunner().invoke(app, ["bench", str(tiny), "-p", "4,x"])
    assert r.exit_code == 1 and "-p takes whole numbers" in r.stderr


def test_bench_waits_for_the_packed_cache_write(tiny, tmp_path, monkeypatch):
    """A first run of a file writes its packed weights to disk on a thread; bench's timed runs
    start only once that write is over (it took a core: MoE pp128 read 370 against 1210 tok/s)."""
    import threading
    import time

    from qwen3cli.io.loader import load
    from qwen3cli.model import packed_cache
    from qwen3cli.runtime.bench import run_bench
    from qwen3cli.runtime.engine import Engine

    monkeypatch.setenv("QWEN3CLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(packed_cache.ENV_MAX, raising=False)
    write = packed_cache.PackedStore._write

    def slow_write(self, *a):
        time.sleep(0.5)
        write(self, *a)

    monkeypatch.setattr(packed_cache.PackedStore, "_write", slow_write)
    engine = Engine(load(tiny), ctx=32)
    assert engine.model.packed is not None and engine.model.packed._writer is not None
    writing, forward = [], engine.model.forward

    def spy(tokens, cache, *a, **kw):
        writing.append(any(t.name == "packed-cache" and t.is_alive() for t in threading.enumerate()))
        return forward(tokens, cache, *a, **kw)

    engine.model.forward = spy
    run_bench(engine, prompt=4, gen=2, reps=1)
    assert writing and not any(writing)
    assert list((tmp_path / "cache" / "packed").glob("*.bin"))  # the entry was written, whole
