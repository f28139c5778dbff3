"""The Python API, used only as a user would: `from qwen3cli import ...` (issue 15, part 1)."""

import json
import subprocess
import sys

import pytest

import qwen3cli
from qwen3cli import Chat, batch_generate, generate, load, quantize, stream_generate
from qwen3cli.errors import Qwen3CliError


@pytest.fixture(scope="module")
def model(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    return load(path, ctx=256, threads=1)


def test_import_is_light_and_names_are_the_api():
    code = ("import sys, qwen3cli; print('numba' in sys.modules or 'numpy' in sys.modules); "
            "from qwen3cli import generate, load, Chat; import qwen3cli.runtime.generation; "
            "from qwen3cli import generate as g2; "
            "print(callable(g2) and g2 is generate and not isinstance(g2, type(sys)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # `import qwen3cli` stays light; the names are functions, not modules
    with pytest.raises(AttributeError):
        qwen3cli.no_such_name


def test_generate_equals_the_cli_and_the_stream(model, gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    r = generate(model, "Count to five.", think=False, max_tokens=12, temperature=0)
    assert r.thinking == "" and r.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.timings.prefill_s > 0 and r.usage.thinking_tokens == 0
    cli = subprocess.run([sys.executable, "-m", "qwen3cli", "run", str(path), "Count to five.", "--no-think", "-n", "12",
                          "--temp", "0", "--json", "--ctx", "256"], capture_output=True, text=True, check=True)
    want = json.loads(cli.stdout)
    assert (r.text, r.finish_reason, r.usage.prompt_tokens) == (want["answer"].strip(), want["finish_reason"],
                                                                 want["prompt_tokens"])
    s = stream_generate(model, [{"role": "user", "content": "Count to five."}], think=False, max_tokens=12, temperature=0)
    chunks = list(s)
    assert "".join(c.text for c in chunks).strip() == r.text and not any(c.thinking for c in chunks)
    assert (s.reply.text, s.reply.usage, s.reply.finish_reason) == (r.text, r.usage, r.finish_reason)


def test_batch_generate_gives_each_prompt_its_own_reply(model):
    prompts = ["Count to five.", "Why?", [{"role": "user", "content": "Hi"}], "Name a prime."]
    kw = dict(max_tokens=10, temperature=1.0, top_k=40, seed=11)  # seeded sampling: each keeps its own stream
    alone = [generate(model, p, think=think, **kw) for p, think in zip(prompts, (False, True, False, True))]
    for think in (False, True):
        together = batch_generate(model, prompts, think=think, parallel=3, **kw)
        for p, a, b, t in zip(prompts, alone, together, (False, True, False, True)):
            if t == think:
                assert (b.text, b.thinking, b.finish_reason) == (a.text, a.thinking, a.finish_reason)
                u, v = a.usage, b.usage  # the cached count differs: a slot reuses an earlier prompt's start
                assert (u.prompt_tokens, u.completion_tokens, u.thinking_tokens) == \
                    (v.prompt_tokens, v.completion_tokens, v.thinking_tokens)
    with pytest.raises(Qwen3CliError, match="non-empty list"):
        batch_generate(model, [])
    with pytest.raises(Qwen3CliError, match="parallel"):
        batch_generate(model, ["x"], parallel=0)


def test_chunks_say_thinking_or_answer(model):
    s = stream_generate(model, "Why?", think=True, max_tokens=40, thinking_budget=3, seed=7)
    chunks = list(s)
    assert s.reply.thinking == "".join(c.text for c in chunks if c.thinking).strip("\n")
    assert s.reply.text == "".join(c.text for c in chunks if not c.thinking).strip()
    assert s.reply.usage.completion_tokens == 40 or s.reply.finish_reason == "stop"
    assert generate(model, "Why?", think=True, max_tokens=2, seed=7).finish_reason.startswith("length")


def test_seeds_reproduce_and_sampling_is_checked(model):
    a = generate(model, "Hello", think=False, max_tokens=10, temperature=1.0, seed=3)
    b = generate(model, "Hello", think=False, max_tokens=10, temperature=1.0, seed=3)
    assert a.text == b.text
    with pytest.raises(Qwen3CliError, match="temperature must be >= 0"):
        generate(model, "Hello", temperature=-1)
    with pytest.raises(Qwen3CliError, match="unknown sampling argument 'temp'"):
        generate(model, "Hello", temp=0.5)
    with pytest.raises(Qwen3CliError, match="max_tokens must be a whole number"):
        generate(model, "Hello", max_tokens=0)
    with pytest.raises(Qwen3CliError, match="a string or a list"):
        generate(model, 42)


def test_chat_reuses_its_prefix_and_undoes(model, tmp_path):
    chat = Chat(model, system="Be brief.", think=False, max_tokens=8, seed=1, temperature=0.7)
    first = chat.send("Name a prime.")
    second = chat.send("Another one?")
    # the first turn's KV was kept, up to where the template renders a past reply differently (its think block)
    assert 0 < second.usage.cached_tokens < second.usage.prompt_tokens
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first.text
    again = Chat(model, system="Be brief.", think=False, max_tokens=8, seed=1, temperature=0.7)
    assert [again.send("Name a prime.").text, again.send("Another one?").text] == [first.text, second.text]
    assert chat.undo() and len(chat.messages) == 2
    path = chat.save(tmp_path / "c.json")
    other = Chat(model)
    assert other.load(path) == [] and other.messages == chat.messages
    chat.send("And /think")  # the soft switch: thinking on for this turn, the tag not kept
    assert chat.messages[-2] == {"role": "user", "content": "And", "think": True}


def test_quantize_then_load(ckpt, tmp_path):
    src, _ = ckpt(dtype="f32", std=0.05)
    s = quantize(src, tmp_path / "m.gguf", "q4_0")
    assert s.out == tmp_path / "m.gguf" and s.out.exists()
    m = load(s.out, ctx=64)
    assert generate(m, "Hi", think=False, max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(Qwen3CliError, match="unknown --type 'q3'"):
        quantize(src, tmp_path / "x.gguf", "q3")


def test_the_readme_example_runs(gguf_model, ckpt, tmp_path, monkeypatch):
    """The README's API section, run as written (a tiny model under its file names, fewer tokens)."""
    import re
    import shutil
    from pathlib import Path

    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    src, _ = ckpt(dtype="f32", std=0.05)
    shutil.copy(path, tmp_path / "qwen3-0.6b-q8_0.gguf")
    (tmp_path / "Qwen3-0.6B").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S)[1]
    for a, b in (("max_tokens=200", "max_tokens=5"), ("thinking_budget=256)", "thinking_budget=4, max_tokens=8)"),
                 ('seed=1)', 'seed=1, max_tokens=5)')):
        assert a in code
        code = code.replace(a, b)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "chat.json").exists() and (tmp_path / "qwen3-0.6b-q4_k_m.gguf").exists()
