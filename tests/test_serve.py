"""`qwen3cli serve` on a tiny model, talked to with the official openai client and raw HTTP.
A scripted sampler decides what the model "says" (thinking, answers, tool calls)."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

from checkpoints import TOKENIZER
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.generation import BUDGET_NOTE
from qwen3cli.io.loader import load
from qwen3cli.sampler import Sampler
from qwen3cli.serve import make_server
from qwen3cli.serve.answer import AnswerSplitter, ToolCall
from qwen3cli.serve.worker import Worker

CTX = 512
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def engine(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    return Engine(load(path), ctx=CTX)


def start(engine, **kw):
    srv = make_server(engine, "127.0.0.1", 0, model_id="tiny", **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(engine):
    srv = start(engine)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def script(engine, monkeypatch):
    """script.say(text): the model writes `text` then <|im_end|>; script.fn: a function of the
    generated ids. Records the prompt text of every chat request."""
    tok = engine.tokenizer

    class Script:
        prompts: list[str] = []
        fn = None

        def say(self, text):
            seq = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
            self.fn = lambda generated: seq[len(generated)]
            return seq

    s = Script()
    monkeypatch.setattr(Sampler, "__call__", lambda self, logits, generated: s.fn(generated))
    real = Worker.prepare_chat

    def recording(self, req):
        job = real(self, req)
        s.prompts.append(tok.decode(job.ids, skip_special_tokens=False))
        return job

    monkeypatch.setattr(Worker, "prepare_chat", recording)
    return s


def enc(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False).ids


def ask(client, content="What is up?", **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def stream(client, content="What is up?", **kw):
    parts = {"reasoning": "", "content": "", "tool_calls": [], "finish": None, "usage": None}
    for ch in ask(client, content, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            parts["usage"] = ch.usage
        for c in ch.choices:
            d = c.delta
            parts["reasoning"] += (d.model_extra or {}).get("reasoning_content") or ""
            parts["content"] += d.content or ""
            parts["tool_calls"] += d.tool_calls or []
            parts["finish"] = c.finish_reason or parts["finish"]
    return parts


def raw(server, method, path, body=None, headers=None):
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out[0], json.loads(out[1]) if out[1] else None


# -- chat ---------------------------------------------------------------------------------------

def test_reasoning_is_split_from_the_answer(client, script, engine):
    seq = script.say("<think>\nI ponder.\n</think>\n\nHello there!")
    r = ask(client)
    m = r.choices[0].message
    assert m.content == "Hello there!" and m.model_extra["reasoning_content"] == "I ponder."
    assert r.choices[0].finish_reason == "stop" and m.tool_calls is None
    assert script.prompts[-1].endswith("<|im_start|>user\nWhat is up?<|im_end|>\n<|im_start|>assistant\n")
    u = r.usage
    assert u.completion_tokens == len(seq) and u.prompt_tokens == len(enc(engine, script.prompts[-1]))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == len(enc(engine, "\nI ponder.\n")) + 1  # and </think>
    assert r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_streaming_says_the_same(client, script):
    seq = script.say("<think>\nI ponder.\n</think>\n\nHello there!")
    p = stream(client)
    assert (p["reasoning"], p["content"], p["finish"]) == ("I ponder.", "Hello there!", "stop")
    assert p["usage"].completion_tokens == len(seq) and p["usage"].completion_tokens_details.reasoning_tokens == 5


def test_enable_thinking_false_and_reasoning_effort_none(client, script):
    script.say("Just the answer.")
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        r = ask(client, extra_body=extra) if "chat_template_kwargs" in extra else ask(client, **extra)
        assert script.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert r.choices[0].message.content == "Just the answer."
        assert r.choices[0].message.model_extra["reasoning_content"] is None


def test_cut_inside_the_thinking_is_length_not_success(client, script, engine):
    seq = script.say("<think>\n" + "hmm " * 40)
    thought = engine.tokenizer.decode(seq[1:5]).strip()
    assert thought.startswith("hmm")
    r = ask(client, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
    assert r.choices[0].message.model_extra["reasoning_content"] == thought
    p = stream(client, max_tokens=5)
    assert (p["finish"], p["content"], p["reasoning"]) == ("length", "", thought)


def test_thinking_budget(client, script, engine):
    tid = engine.tokenizer.token_to_id
    answer = enc(engine, "\n\ndone") + [tid("<|im_end|>")]
    close = tid("</think>")

    def thinker(generated):
        if close in generated:
            return answer[len(generated) - generated.index(close) - 1]
        return tid("<think>") if not generated else enc(engine, " hmm")[0]

    script.fn = thinker
    r = ask(client, extra_body={"thinking_budget": 3})
    m = r.choices[0].message
    assert m.content == "done" and r.choices[0].finish_reason == "stop"
    assert m.model_extra["reasoning_content"] == " hmm hmm hmm" + BUDGET_NOTE.rstrip()  # exactly the budget


def test_stop_strings(client, script):
    script.say("Hello, world. Bye.")
    r = ask(client, stop=[". B", "zzz"])
    assert r.choices[0].message.content == "Hello, world" and r.choices[0].finish_reason == "stop"
    assert stream(client, stop=". B")["content"] == "Hello, world"


# -- tools --------------------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'


def test_a_tool_call_after_thinking(client, script):
    script.say("<think>\nI need the weather.\n</think>\n\n" + CALL % "Paris")
    r = ask(client, "Weather in Paris?", tools=[WEATHER])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.model_extra["reasoning_content"] == "I need the weather."
    [call] = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "# Tools" in script.prompts[-1] and json.dumps(WEATHER) in script.prompts[-1]


def test_several_tool_calls_with_text_streamed_and_not(client, script):
    script.say("Let me check.\n" + CALL % "Paris" + "\n" + CALL % "Oslo")
    r = ask(client, tools=[WEATHER])
    c = r.choices[0]
    assert c.message.content == "Let me check." and c.finish_reason == "tool_calls"
    assert [json.loads(t.function.arguments)["city"] for t in c.message.tool_calls] == ["Paris", "Oslo"]
    p = stream(client, tools=[WEATHER])
    assert p["content"] == "Let me check." and p["finish"] == "tool_calls"
    assert [t.index for t in p["tool_calls"]] == [0, 1]
    assert [json.loads(t.function.arguments)["city"] for t in p["tool_calls"]] == ["Paris", "Oslo"]
    assert all(t.id.startswith("call_") and t.function.name == "get_weather" for t in p["tool_calls"])


def test_malformed_tool_call_stays_in_the_content(client, script):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    script.say(bad)
    r = ask(client, tools=[WEATHER])
    assert r.choices[0].message.content == bad and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    assert stream(client, tools=[WEATHER])["content"] == bad


def test_tool_result_round_trip_renders_like_transformers(client, script):
    script.say("It is 21 degrees in Paris.")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 degrees in Paris."
    hf = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    want = hf.apply_chat_template([{**m, "content": m["content"] or ""} for m in messages], tools=[WEATHER],
                                  add_generation_prompt=True, tokenize=False)
    assert script.prompts[-1] == want
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n') in want


# -- other endpoints ----------------------------------------------------------------------------

def test_models_health_and_completions(client, server, script):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert raw(server, "GET", "/v1/models/tiny")[1]["id"] == "tiny"
    status, h = raw(server, "GET", "/health")
    assert status == 200 and h["status"] == "ok" and h["model"] == "tiny"
    script.say(" a time there was")
    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=40)
    assert c.choices[0].text == " a time there was" and c.choices[0].finish_reason == "stop"
    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=2, echo=True)
    assert c.choices[0].text == "Once upon a time" and c.choices[0].finish_reason == "length"
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="Once upon", stream=True, stop=" there") if ch.choices)
    assert text == " a time"


def test_api_key(engine, script):
    srv = start(engine, api_key="sesame")
    try:
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        status, body = raw(srv, "POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw(srv, "GET", "/health")[0] == 200
        script.say("ok")
        good = openai.OpenAI(base_url=srv.url, api_key="sesame", max_retries=0)
        assert ask(good).choices[0].message.content == "ok"
    finally:
        srv.shutdown()
        srv.server_close()


M = [{"role": "user", "content": "hi"}]
BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"messages": M}, 400, "model", None),
    ({"model": "gpt-4o", "messages": M}, 404, "model", "model_not_found"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages", None),
    ({"model": "tiny", "messages": []}, 400, "messages", None),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"model": "tiny", "messages": M, "temperature": "hot"}, 400, "temperature", None),
    ({"model": "tiny", "messages": M, "temperature": 9}, 400, "temperature", None),
    ({"model": "tiny", "messages": M, "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": "tiny", "messages": M, "top_k": 2.5}, 400, "top_k", None),
    ({"model": "tiny", "messages": M, "stream": "yes"}, 400, "stream", None),
    ({"model": "tiny", "messages": M, "n": 2}, 400, "n", None),
    ({"model": "tiny", "messages": M, "stop": [1]}, 400, "stop", None),
    ({"model": "tiny", "messages": M, "tools": [{"type": "function"}]}, 400, "tools[0]", None),
    ({"model": "tiny", "messages": M, "reasoning_effort": "extreme"}, 400, "reasoning_effort", None),
    ({"model": "tiny", "messages": M, "chat_template_kwargs": {"enable_thinking": "no"}}, 400,
     "chat_template_kwargs.enable_thinking", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * CTX}]}, 400, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=range(len(BAD)))
def test_bad_chat_requests_get_openai_errors(server, body, status, param, code):
    got, reply = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert (reply["error"]["param"], reply["error"]["code"]) == (param, code)


def test_bad_routes_and_completions(server, client, script):
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    assert raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": ""})[1]["error"]["param"] == "prompt"
    assert raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x " * CTX})[0] == 400
    script.say("still here")
    assert ask(client).choices[0].message.content == "still here"  # the server carries on


# -- log-probabilities ------------------------------------------------------------------------

def reference(engine, ids, first):
    """torch's float64 log-softmax of our logits for ids[first:], each given the tokens before it
    (row j scores ids[first + j]), the whole sequence run on a fresh cache."""
    logits = engine.model.forward(ids, engine.model.new_cache(), all_logits=True)
    return torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), -1).numpy()[first - 1:len(ids) - 1]


BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(engine, tid):
    """A token's exact bytes (part of a UTF-8 character, for some), by GPT-2's byte alphabet."""
    return bytes(BYTE_OF[c] for c in engine.tokenizer.id_to_token(tid))


def check_chat_entries(engine, entries, ids, rows, top):
    assert len(entries) == len(ids)
    for e, tid, row in zip(entries, ids, rows):
        want = token_bytes(engine, tid)
        assert bytes(e["bytes"]) == want and e["token"] == want.decode(errors="replace")
        assert e["logprob"] == pytest.approx(row[tid], abs=1e-5)
        best = np.argsort(-row, kind="stable")[:top]
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(row[best], abs=1e-5)
        assert [bytes(t["bytes"]) for t in e["top_logprobs"]] == [token_bytes(engine, int(i)) for i in best]


def test_chat_logprobs_are_log_softmax_of_our_logits(client, script, engine):
    seq = script.say("<think>\nI ponder.\n</think>\n\nHello there!")
    prompt = engine.prompt([{"role": "user", "content": "What is up?"}]).ids
    rows = reference(engine, prompt + seq[:-1], len(prompt))  # the last token, <|im_end|>, is not reported
    close = seq.index(engine.tokenizer.token_to_id("</think>")) + 1
    r = ask(client, logprobs=True, top_logprobs=3, extra_body={"reasoning_logprobs": True})
    lp = r.choices[0].logprobs
    content = [c.model_dump() for c in lp.content]
    check_chat_entries(engine, content, seq[close:-1], rows[close:], 3)
    check_chat_entries(engine, lp.model_extra["reasoning_content"], seq[:close], rows[:close], 3)
    assert "".join(c["token"] for c in content).lstrip("\n") == r.choices[0].message.content == "Hello there!"
    # the scripted sampler picked these tokens, not the model: the chosen one need not be the best
    assert any(c["logprob"] < c["top_logprobs"][0]["logprob"] for c in content)

    r = ask(client, logprobs=True)  # the thinking only when asked; top_logprobs defaults to none
    lp = r.choices[0].logprobs
    assert "reasoning_content" not in (lp.model_extra or {}) and all(c.top_logprobs == [] for c in lp.content)
    assert [c.logprob for c in lp.content] == pytest.approx([c["logprob"] for c in content], abs=1e-5)
    assert ask(client).choices[0].logprobs is None


def test_streamed_chat_logprobs_say_the_same(client, script, engine):
    script.say("<think>\nI ponder.\n</think>\n\nHello there!")
    whole = ask(client, logprobs=True, top_logprobs=2, extra_body={"reasoning_logprobs": True}).choices[0].logprobs
    content, thinking = [], []
    for ch in ask(client, logprobs=True, top_logprobs=2, extra_body={"reasoning_logprobs": True}, stream=True):
        for c in ch.choices:
            if c.logprobs is not None:
                content += [x.model_dump() for x in c.logprobs.content or []]
                thinking += (c.logprobs.model_extra or {}).get("reasoning_content") or []
    assert content == [c.model_dump() for c in whole.content]
    assert thinking == whole.model_extra["reasoning_content"]


def test_completion_logprobs_with_echo_cover_the_prompt(client, script, engine):
    seq = script.say(" time there was")
    prompt = enc(engine, "Once upon a")
    ids = prompt + seq[:3]
    rows = reference(engine, ids, 1)
    c = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=3, echo=True, logprobs=2)
    lp = c.choices[0].logprobs
    texts = [token_bytes(engine, t).decode(errors="replace") for t in ids]
    assert c.choices[0].text == "".join(texts) == "Once upon a time there was"
    assert lp.tokens == texts and lp.text_offset == [sum(map(len, texts[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for i, tid in enumerate(ids[1:]):
        row, top = rows[i], lp.top_logprobs[i + 1]
        assert lp.token_logprobs[i + 1] == pytest.approx(row[tid], abs=1e-5)
        best = np.argsort(-row, kind="stable")[:2]
        want = {}
        for t in [*best, tid]:
            want.setdefault(token_bytes(engine, int(t)).decode(errors="replace"), row[t])
        assert top == pytest.approx(want, abs=1e-5)  # the two best and the chosen one
    # without echo: only the generated tokens; token ids as the prompt (lm-eval's way), streamed
    c = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=3, logprobs=0)
    assert c.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(prompt):], abs=1e-5)
    got = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for ch in client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                        stream=True):
        for k in got:
            got[k] += getattr(ch.choices[0].logprobs, k) if ch.choices and ch.choices[0].logprobs else []
    assert got == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


def test_scoring_a_long_prompt_alone(client, server, engine):
    """max_tokens 0 with echo scores the prompt and writes nothing; a prompt of several prefill
    chunks (64 tokens each) is scored across their seams."""
    ids = enc(engine, " ".join(f"word{i}" for i in range(60)))
    assert len(ids) > 2 * 64
    rows = reference(engine, ids, 1)
    c = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == engine.tokenizer.decode(ids) and c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(ids), 0)
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([rows[j, t] for j, t in enumerate(ids[1:])], abs=1e-5)
    without_echo = {"model": "tiny", "prompt": "x", "max_tokens": 0}
    assert raw(server, "POST", "/v1/completions", without_echo)[1]["error"]["param"] == "max_tokens"


def test_batched_requests_each_get_their_own_rows(engine, script):
    """Four requests decoded together: each one's logprobs are of its own logits row."""
    seq = script.say(" and then some more words came out of it")
    srv = start(engine, parallel=4)
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
        prompts = ["Once upon a", "The cat", "In the beginning there was", "Why"]
        got = [None] * len(prompts)

        def one(i):
            got[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=6, logprobs=0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.worker.batcher.widest > 1  # they did share decode passes
        for p, r in zip(prompts, got):
            ids = enc(engine, p)
            rows = reference(engine, ids + seq[:6], len(ids))
            want = [rows[j, t] for j, t in enumerate(seq[:6])]
            assert r.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-5), p
    finally:
        srv.shutdown()
        srv.server_close()


LOGPROB_BAD = [
    ("/v1/chat/completions", {"messages": M, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": M, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": M, "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": M, "reasoning_logprobs": True}, "reasoning_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "top_logprobs": 1}, "top_logprobs"),
    ("/v1/completions", {"prompt": [1, 1 << 40]}, "prompt"),
    ("/v1/completions", {"prompt": [1, -1]}, "prompt"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", LOGPROB_BAD, ids=range(len(LOGPROB_BAD)))
def test_bad_logprob_requests(server, path, body, param):
    status, reply = raw(server, "POST", path, {"model": "tiny", **body})
    assert status == 400 and reply["error"]["param"] == param, reply


# -- the queue, the cache and clients that leave ------------------------------------------------

def test_kv_prefix_is_reused_between_requests(client, server, script):
    script.say("<think>\nfirst\n</think>\n\nOne.")
    r1 = ask(client, "Count with me.")
    before = raw(server, "GET", "/health")[1]["reused_prompt_tokens"]
    script.say("Two.")
    r2 = client.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Go on."}])
    # the history drops the old thinking: everything up to the first reply's <think> is reused
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens
    assert raw(server, "GET", "/health")[1]["reused_prompt_tokens"] == before + r1.usage.prompt_tokens


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_leaves_stops_its_generation(client, server, script, engine, streaming):
    longest = []

    def endless(generated):
        longest.append(len(generated))
        return enc(engine, " la")[0]

    script.fn = endless
    host, port = server.server_address[:2]
    body = json.dumps({"model": "tiny", "stream": streaming, "messages": M,
                       "chat_template_kwargs": {"enable_thinking": False}}).encode()
    s = socket.create_connection((host, port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    if streaming:
        got = b""
        while got.count(b"data: ") < 4:
            got += s.recv(4096)
        assert b'"content": " la"' in got
    else:
        while not longest:
            time.sleep(0.01)
    s.close()
    deadline = time.time() + 30
    while (h := raw(server, "GET", "/health")[1])["slots_in_use"] + h["queued"] and time.time() < deadline:  # until it has ended
        time.sleep(0.02)
    assert max(longest) < 100, max(longest)  # the context would have allowed ~500
    script.say("after")
    assert ask(client).choices[0].message.content == "after"


def test_answer_splitter_holds_back_partial_markers():
    sp = AnswerSplitter(tools=True, stops=["STOP"], trim=True)
    out = []
    for piece in ["Hi <tool", "_call>\n{\"name\": \"f\", \"argu", "ments\": {}}\n</tool_", "call>\n\n", "x ST", "OP y"]:
        got = sp.push(piece)
        assert not any(isinstance(g, str) and "<tool" in g for g in got)
        out += got
    assert [o if isinstance(o, str) else (o.name, o.arguments) for o in out] == ["Hi", ("f", "{}"), "\n\nx"]
    assert sp.stopped and sp.finish() == []
    sp = AnswerSplitter(tools=True)
    assert sp.push("a <tool_call>{\"name\": 1}") == ["a "] and sp.finish() == ['<tool_call>{"name": 1}']
    assert isinstance(AnswerSplitter(tools=True).push('<tool_call>{"name": "g"}</tool_call>')[0], ToolCall)


def test_serve_command_bad_inputs(tmp_path):
    from qwen3cli.cli import app

    for args, needle in ((["serve", str(tmp_path / "none.gguf")], "no such file"),
                         (["serve", "x.gguf", "--port", "70000"], "--port"),
                         (["serve", "x.gguf", "--max-tokens", "0"], "--max-tokens must be at least 1"),
                         (["serve", "x.gguf", "--reasoning-budget", "-1"], "--reasoning-budget must be at least 0"),
                         (["serve", "x.gguf", "--temp", "-1"], "--temp"),
                         (["serve", "x.gguf", "--parallel", "0"], "--parallel must be between 1 and 64")):
        r = CliRunner().invoke(app, args)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], (args, r.stderr)


def test_server_defaults_fill_what_requests_leave_out(engine, script):
    from qwen3cli.serve.protocol import Sampling
    from qwen3cli.serve.worker import Defaults

    seen = []
    real = Worker._sampler
    Worker._sampler = lambda self, s, thinking: seen.append(s) or real(self, s, thinking)
    srv = start(engine, defaults=Defaults(Sampling(temperature=0.1, top_k=5), think=False, max_tokens=2))
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
        script.say("one two three four")
        r = ask(c)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2  # --max-tokens
        assert script.prompts[-1].endswith("<think>\n\n</think>\n\n")  # --no-think
        assert (seen[-1].temperature, seen[-1].top_k) == (0.1, 5)
        ask(c, temperature=0.9, max_tokens=3, extra_body={"enable_thinking": True})  # the request wins
        assert (seen[-1].temperature, seen[-1].top_k) == (0.9, 5) and not script.prompts[-1].endswith("</think>\n\n")
    finally:
        Worker._sampler = real
        srv.shutdown()
        srv.server_close()


def test_the_server_binds_before_the_model_loads(engine):
    srv = start(None)
    try:
        status, body = raw(srv, "GET", "/health")
        assert status == 503 and body["status"] == "loading"
        status, body = raw(srv, "POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
        assert status == 503 and body["error"]["code"] == "model_loading"
        assert raw(srv, "GET", "/v1/models")[0] == 200
        srv.ready(engine)
        status, body = raw(srv, "GET", "/health")
        assert status == 200 and body["status"] == "ok"
    finally:
        srv.shutdown()
        srv.server_close()
