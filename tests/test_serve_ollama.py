"""serve's ollama endpoints, talked to with ollama's official Python client (and raw HTTP where
the client has no call). The tiny model and the scripted sampler are test_serve's."""

import json
from datetime import datetime

import ollama
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import enc, engine, raw, script, server  # noqa: F401 (fixtures)

from qwen3cli.serve.worker import Worker


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url.removesuffix("/v1"), timeout=60)


@pytest.fixture
def sampled(monkeypatch):
    """The sampling parameters of every request, as the worker resolved them."""
    seen = []
    real = Worker._sampler

    def recording(self, s, thinks):
        sampler = real(self, s, thinks)
        seen.append(sampler.params)
        return sampler

    monkeypatch.setattr(Worker, "_sampler", recording)
    return seen


THOUGHT = "<think>\nI ponder.\n</think>\n\nHello there!"
HI = [{"role": "user", "content": "What is up?"}]


def test_chat_splits_thinking_from_content(client, script, engine):  # noqa: F811
    seq = script.say(THOUGHT)
    r = client.chat(model="tiny", messages=HI, think=True)
    assert (r.message.role, r.message.thinking, r.message.content) == ("assistant", "I ponder.", "Hello there!")
    assert r.model == "tiny:latest" and r.done and r.done_reason == "stop"
    assert r.eval_count == len(seq) and r.prompt_eval_count == len(enc(engine, script.prompts[-1]))
    assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0
    datetime.fromisoformat(r.created_at.replace("Z", "+00:00"))


def test_think_false_turns_the_thinking_off(client, script):  # noqa: F811
    script.say("Hello there!")
    r = client.chat(model="tiny", messages=HI, think=False)
    assert r.message.content == "Hello there!" and not r.message.thinking
    assert script.prompts[-1].endswith("<think>\n\n</think>\n\n")  # the template's own switch
    client.chat(model="tiny", messages=HI, think=True)
    assert not script.prompts[-1].endswith("</think>\n\n")


def test_chat_streams_ndjson_that_adds_up(client, script, server):  # noqa: F811
    seq = script.say(THOUGHT)
    parts = list(client.chat(model="tiny", messages=HI, think=True, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.thinking or "" for p in parts) == "I ponder."
    assert "".join(p.message.content for p in parts) == "Hello there!"
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == len(seq)
    status, lines = raw_lines(server, "/api/chat", {"model": "tiny", "messages": HI})  # stream is ollama's default
    assert status == 200 and len(lines) > 1 and lines[-1]["done"] is True


def raw_lines(server, path, body):
    import http.client

    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.getheader("Content-Type") == "application/x-ndjson"
    out = r.status, [json.loads(line) for line in r.read().splitlines()]
    c.close()
    return out


def test_generate_with_the_template_and_raw(client, script):  # noqa: F811
    script.say(THOUGHT)
    r = client.generate(model="tiny", prompt="What is up?", system="Be brief.", think=True)
    assert (r.thinking, r.response, r.done_reason) == ("I ponder.", "Hello there!", "stop")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in script.prompts[-1]
    parts = list(client.generate(model="tiny", prompt="What is up?", think=True, stream=True))
    assert "".join(p.thinking or "" for p in parts) == "I ponder." and parts[-1].done
    assert "".join(p.response for p in parts) == "Hello there!"
    script.say(" a time")
    r = client.generate(model="tiny", prompt="Once upon", raw=True)  # no template: the text goes on
    assert r.response == " a time" and r.prompt_eval_count == 2


def test_options_map_to_ours(client, script, sampled):  # noqa: F811
    script.say("one two three four five")
    r = client.chat(model="tiny", messages=HI, think=False,
                    options={"temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 42,
                             "repeat_penalty": 1.1, "num_predict": 2, "num_thread": 2, "mirostat": 0,
                             "repeat_last_n": 64})
    p = sampled[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.repeat_penalty) == (0.3, 0.5, 7, 0.1, 42, 1.1)
    assert r.done_reason == "length" and r.eval_count == 2
    r = client.chat(model="tiny", messages=HI, think=False, options={"stop": [" three"]})
    assert r.message.content == "one two" and r.done_reason == "stop"
    r = client.generate(model="tiny", prompt="Once upon", raw=True, options={"num_ctx": 4})
    assert r.done_reason == "length" and r.eval_count == 2  # a 4-token window holds 2 prompt tokens and 2 more
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="Once upon a time", raw=True, options={"num_ctx": 3})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error


def test_tags_show_ps_version(client, server):
    models = client.list().models
    assert [m.model for m in models] == ["tiny:latest"]
    m = models[0]
    assert m.size > 0 and m.details.format == "gguf" and m.details.family == "qwen3"
    assert m.details.quantization_level == "Q8_0" and m.details.parameter_size
    s = client.show("tiny")
    assert "thinking" in s.capabilities and "tools" in s.capabilities
    assert s.modelinfo["general.architecture"] == "qwen3" and "{%" in s.template
    assert "temperature" in s.parameters
    assert client.show("tiny:latest").details == m.details
    (running,) = client.ps().models
    assert running.model == "tiny:latest" and running.context_length == 512
    status, v = raw(server, "GET", "/api/version")
    assert status == 200 and v["version"]


def test_tool_calls_and_logprobs(client, script):  # noqa: F811
    script.say('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                "parameters": {"type": "object", "properties": {}}}}
    r = client.chat(model="tiny", messages=HI, tools=[weather], think=False)
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    seq = script.say("Hello there!")
    r = client.chat(model="tiny", messages=HI, think=False, logprobs=True, top_logprobs=2)
    assert len(r.logprobs) == len(seq) - 1 and all(len(e.top_logprobs) == 2 for e in r.logprobs)
    assert "".join(e.token for e in r.logprobs) == "Hello there!"


def test_a_load_request_answers_loaded(client):
    r = client.chat(model="tiny", messages=[])
    assert r.done and r.done_reason == "load"
    assert client.generate(model="tiny").done_reason == "load"


@pytest.mark.parametrize("call,status,says", [
    (lambda c: c.chat(model="llama3", messages=HI), 404, "not found"),
    (lambda c: c.show("llama3"), 404, "not found"),
    (lambda c: c.chat(model="tiny", messages=HI, options={"temperature": "hot"}), 400, "temperature"),
    (lambda c: c.chat(model="tiny", messages=HI, options={"mirostat": 2}), 400, "mirostat"),
    (lambda c: c.chat(model="tiny", messages=HI, options={"repeat_last_n": 8}), 400, "repeat_last_n"),
    (lambda c: c.chat(model="tiny", messages=HI, options={"warp_speed": 9}), 400, "warp_speed"),
    (lambda c: c.chat(model="tiny", messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    (lambda c: c.chat(model="tiny", messages=HI, think="very"), 400, "think"),
    (lambda c: c.chat(model="tiny", messages=HI, format={"type": "nonsense"}), 400, "format"),
    (lambda c: c.generate(model="tiny", prompt="x", context=[1, 2]), 400, "context"),
    (lambda c: c.generate(model="tiny", prompt="word " * 600), 400, "context"),
    (lambda c: list(c.chat(model="tiny", messages=HI, options={"top_p": 0}, stream=True)), 400, "top_p"),
])
def test_errors_in_ollamas_shape(client, server, call, status, says):
    with pytest.raises(ollama.ResponseError) as e:
        call(client)
    assert e.value.status_code == status and says in e.value.error, e.value.error
    got, body = raw(server, "POST", "/api/chat", {"model": "tiny", "messages": "hi"})
    assert got == 400 and set(body) == {"error"}
    assert raw(server, "GET", "/api/chat")[0] == 405 and set(raw(server, "GET", "/api/nothing")[1]) == {"error"}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
                    | st.text(max_size=8) | st.sampled_from(["json", "low", "tiny", "user", "", "function"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["role", "content", "type", "function", "name", "x"]), inner, max_size=3),
                    max_leaves=6)
BASES = {"/api/chat": {"model": "tiny", "messages": HI, "stream": False, "think": False,
                       "options": {"num_predict": 2}},
         "/api/generate": {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
         "/api/show": {"model": "tiny"}}
# not "format": a schema that parses would meet the scripted sampler, which writes "ok" past its mask
FIELDS = [(path, f) for path, fields in {
    "/api/chat": ["model", "messages", "messages.0", "messages.0.role", "messages.0.content", "messages.0.images",
                  "messages.0.thinking", "tools", "think", "options", "options.temperature",
                  "options.top_k", "options.seed", "options.stop", "options.num_ctx", "options.num_predict",
                  "logprobs", "top_logprobs", "keep_alive"],
    "/api/generate": ["prompt", "system", "raw", "context", "template", "think", "options.top_p",
                      "options.mirostat", "options.num_thread"],
    "/api/show": ["model", "name"]}.items() for f in fields]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FIELDS), value=JSON)
def test_any_value_in_any_field_is_answered_in_ollamas_shape(server, script, case, value):  # noqa: F811
    """Whatever a client puts in a field: a reply, and when it is an error, ollama's {"error"}."""
    script.say("ok")
    path, field = case
    body = json.loads(json.dumps(BASES[path]))
    *parents, last = field.split(".")
    at = body
    for k in parents:
        at = at[int(k)] if k.isdigit() else at[k]
    at[int(last) if last.isdigit() else last] = value
    status, reply = raw(server, "POST", path, body)
    assert status < 500, (field, value, reply)
    if status >= 400:
        assert set(reply) == {"error"} and isinstance(reply["error"], str) and reply["error"], reply
