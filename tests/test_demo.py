"""The demo model (qwen3cli/data/demo, trained by scripts/train_demo.py) end to end: a model
that really thinks, answers and calls tools, through run, chat, serve and quantize.

Accuracies are asserted against what transformers measured on the same held-out problems when
the weights were made (demo.json's "accuracy"), with a margin for the smaller samples here."""

import json
import re
import threading

import pytest
from typer.testing import CliRunner

from qwen3cli import api
from qwen3cli.cli import app
from qwen3cli.demo import compact
from qwen3cli.demo.tasks import ABOUT, TOOLS, accuracy, chat_text, held_out
from qwen3cli.io import convert

INFO = json.loads((compact.shipped().parent / "demo.json").read_text())
MEASURED = INFO["accuracy"]  # transformers, greedy, on the same held-out problems
N = 24  # problems per task here (the measurement used INFO["accuracy"]["n"])
MARGIN = 0.2  # ~2 standard errors of a fraction measured on N problems
DIRECT = re.compile(r"\d+ [+-] \d+ = -?\d+\.")  # a bare answer, as the demo gives without thinking


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return compact.checkpoint(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def files(demo_dir, tmp_path_factory):
    """files(type): the demo quantized to `type` by us, made once per module."""
    d, made = tmp_path_factory.mktemp("demo-files"), {}

    def get(type_name: str):
        if type_name not in made:
            made[type_name] = d / f"demo-{type_name}.gguf"
            convert.quantize(demo_dir, made[type_name], type_name)
        return made[type_name]

    return get


@pytest.fixture(scope="module")
def engine(files):
    return api.load(files("q8_0"), ctx=1024)


def replies(engine, **kw):
    def reply(s):
        return api.generate(engine, s.messages, think=s.think, tools=s.tools, temperature=0, max_tokens=300,
                            **kw).text
    return reply


def test_ships_compactly_and_expands_to_a_checkpoint_transformers_loads(demo_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    assert compact.shipped().stat().st_size < 8_000_000
    cfg = INFO["config"]
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] and cfg["num_hidden_layers"] >= 2
    assert INFO["training"]["seconds"] <= 45 * 60
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    emb = model.get_input_embeddings().weight.detach()
    ids = load_file(str(compact.shipped()))[compact.IDS]
    assert emb.shape == (151936, cfg["hidden_size"])
    assert emb.abs().sum(1).nonzero().flatten().tolist() == sorted(int(i) for i in ids)  # the rest are zero rows
    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    s = held_out("arith", True, 1)[0]
    prompt = tok.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    x = tok(prompt, return_tensors="pt").input_ids
    y = model.generate(x, max_new_tokens=300, do_sample=False)
    theirs = tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).rsplit("</think>", 1)[-1].strip()
    ours = api.generate(api.load(demo_dir, quant="bf16", ctx=1024), s.messages, think=True, temperature=0,
                        max_tokens=300).text
    assert ours == theirs


def test_run_json_answers_and_thinking_beats_no_thinking(files):
    """Through `run --json`, as a script would: its answer field graded on held-out sums."""
    path = str(files("q8_0"))
    got = {}
    for think in (True, False):
        right = 0
        for s in held_out("arith", think, N):
            r = CliRunner().invoke(app, ["run", path, s.messages[0]["content"], "--temp", "0", "-n", "300", "--json",
                                         "--think" if think else "--no-think"])
            assert r.exit_code == 0, r.stderr
            out = json.loads(r.stdout)
            assert out["finish_reason"] == "stop"
            assert bool(out["thinking"]) == think
            right += out["answer"].split("=")[-1].strip(" .") == s.answer
        got[think] = right / N
    assert got[True] >= MEASURED["arith/think"] - MARGIN
    assert got[False] <= MEASURED["arith/no_think"] + MARGIN
    assert got[True] > got[False]


def test_tool_calls_and_answers_from_tool_results(engine):
    for kind in ("tool_call", "tool_answer"):
        assert accuracy(replies(engine), kind, False, N) >= MEASURED[f"{kind}/no_think"] - MARGIN, kind


def test_no_think_turns_answer_at_once_and_think_turns_work_it_out(engine):
    chat = api.Chat(engine, temperature=0)
    r = chat.send("What is 25 + 13? /no_think")
    assert r.thinking == "" and DIRECT.fullmatch(r.text), r
    r = chat.send("What is 406 + 395?")  # thinking is the model's default again
    assert "column by column" in r.thinking and r.text.endswith("= 801."), r
    r = chat.send("hello")
    assert r.text == ABOUT


def test_a_thinking_budget_cuts_the_thinking_and_an_answer_follows(engine):
    s = held_out("arith", True, 1)[0]
    full = api.generate(engine, s.messages, think=True, temperature=0, max_tokens=300)
    cut = api.generate(engine, s.messages, think=True, temperature=0, max_tokens=300, thinking_budget=8)
    assert cut.usage.thinking_tokens <= 10 < full.usage.thinking_tokens
    assert cut.finish_reason == "stop" and DIRECT.search(cut.text), cut


def test_serve_reasoning_tools_and_the_tool_round_trip(engine):
    openai = pytest.importorskip("openai")
    from qwen3cli.serve import make_server

    srv = make_server(engine, "127.0.0.1", 0, model_id="demo")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        m = client.chat.completions.create(model="demo", temperature=0, messages=[
            {"role": "user", "content": "What is 4821 + 397?"}]).choices[0].message
        assert "column by column" in m.reasoning_content and m.content == "4821 + 397 = 5218.", m
        ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
        c = client.chat.completions.create(model="demo", temperature=0, messages=ask, tools=TOOLS).choices[0]
        assert c.finish_reason == "tool_calls", c
        call = c.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
        result = {"city": "Oslo", "temperature_c": 4, "sky": "snowing"}
        m = client.chat.completions.create(model="demo", temperature=0, tools=TOOLS, messages=ask + [
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]).choices[0].message
        assert m.content == "In Oslo it is snowing and 4 °C.", m
    finally:
        srv.shutdown()
        srv.server_close()


def test_quantization_quality_on_a_trained_model(files):
    """eval of each type against the BF16 file, on held-out chats (the demo's own distribution)."""
    from qwen3cli.runtime.evaluate import evaluate

    ref = api.load(files("bf16"), ctx=1024)
    text = chat_text(12)
    kl = {}
    for t in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):
        r = evaluate(api.load(files(t), ctx=1024), ref, text, 256)
        kl[t] = r.kl_mean
        if t == "q8_0":
            assert r.kl_mean < 0.01 and r.top1 > 0.98, r
    assert kl["q8_0"] < kl["q4_k_m"] and kl["q6_k"] < kl["q4_0"], kl
    bf16 = accuracy(replies(ref), "arith", True, N)
    q4 = accuracy(replies(api.load(files("q4_k_m"), ctx=1024)), "arith", True, N)
    assert q4 >= bf16 - MARGIN, (q4, bf16)


def test_llama_cpp_files_and_ours_give_the_same_answers(files, tmp_path):
    """llama-quantize's Q4_K_M of the same F32 file, run by llama.cpp, and ours run by us."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    from gguf import LlamaFileType

    theirs = tmp_path / "theirs-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LlamaFileType.MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(files("f32")).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    llm = llama_cpp.Llama(str(theirs), n_ctx=1024, n_threads=2, verbose=False)
    ours = api.load(files("q4_k_m"), ctx=1024)
    same = 0
    problems = held_out("arith", True, 12)
    for s in problems:
        prompt = ours.prompt(s.messages, enable_thinking=True).text
        text = llm(prompt, max_tokens=300, temperature=0, top_k=1)["choices"][0]["text"]
        mine = api.generate(ours, s.messages, think=True, temperature=0, max_tokens=300).text
        same += text.rsplit("</think>", 1)[-1].strip() == mine
    assert same >= len(problems) - 2, same


def test_no_model_runs_the_demo_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    r = CliRunner().invoke(app, ["run", "What is 12 + 34?", "--no-think", "--temp", "0", "--json"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("using the demo model") == 1 and "qwen3cli pull" in r.stderr
    assert DIRECT.fullmatch(json.loads(r.stdout)["answer"])


def test_the_budget_note_the_demo_learned_is_the_one_generation_writes():
    from qwen3cli.demo.tasks import BUDGET_NOTE
    from qwen3cli.runtime.generation import BUDGET_NOTE as written

    assert BUDGET_NOTE == written


def test_training_is_reproducible(tmp_path):
    """The script, a few steps of a small model, twice: the same bytes (fixed seeds, data and
    batches; torch's deterministic kernels)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_demo.py"
    made = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "4", "--echo-first", "100",
                            "--hidden", "64", "--ffn", "128", "--layers", "2", "--eval-n", "1"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        made.append((out / "demo.safetensors").read_bytes())
        info = json.loads((out / "demo.json").read_text())
        assert info["training"]["steps"] == 4 and set(info["accuracy"]) >= {"arith/think", "tool_call/no_think"}
    assert made[0] == made[1]
