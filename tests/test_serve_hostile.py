"""`qwen3cli serve` under abuse: wrong JSON of every type in every field the protocol reads,
random and hostile headers, clients that stall, reset, half-close or send bodies without a key,
web pages (Origin, Host), and what reaches the log. Every refusal must be a 4xx with an OpenAI
error object, and the server must answer a normal request afterwards."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3cli.runtime.engine import Engine
from qwen3cli.io.loader import load
from qwen3cli.sampler import Sampler
from qwen3cli.serve import make_server
from qwen3cli.safe_text import printable
from qwen3cli.serve.guard import Limits, is_loopback, names_loopback

CTX = 2048
KEY = "sesame"
FAST = Limits(read_timeout=2.0, write_timeout=1.0, max_connections=32)


@pytest.fixture(scope="module")
def model_path(gguf_model):
    return gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)[0]


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(load(model_path), ctx=CTX)


@pytest.fixture(scope="module")
def tid(engine):
    return engine.tokenizer.token_to_id


@pytest.fixture(autouse=True)
def says_ok(monkeypatch, tid, engine):
    """The model answers "ok" and stops (fast); a test may swap `says_ok.fn`."""
    ok = engine.tokenizer.encode("ok", add_special_tokens=False).ids + [tid("<|im_end|>")]

    class Script:
        fn = staticmethod(lambda generated: ok[min(len(generated), len(ok) - 1)])

    def call(self, logits, generated):
        t = s.fn(generated)  # unless a grammar (a forced tool call) masked it: then its first choice
        return t if np.isfinite(logits[t]) else int(np.argmax(logits))

    s = Script()
    monkeypatch.setattr(Sampler, "__call__", call)
    return s


def start(engine, **kw):
    kw.setdefault("limits", FAST)
    srv = make_server(engine, "127.0.0.1", 0, model_id="tiny", **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def log():
    return []


@pytest.fixture(scope="module")
def server(engine, log):
    srv = start(engine, log=log.append)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def keyed(engine):
    srv = start(engine, api_key=KEY)
    yield srv
    srv.shutdown()
    srv.server_close()


def connect(srv, timeout=10.0):
    return socket.create_connection(srv.server_address[:2], timeout=timeout)


def reply(s):
    """(status, headers, body) of the response on socket `s` (1xx skipped)."""
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, r.headers, r.read()


def send(srv, head: bytes, body: bytes = b"", half_close=False, timeout=10.0):
    s = connect(srv, timeout)
    try:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return reply(s)
    finally:
        s.close()


def request(srv, method="POST", path="/v1/chat/completions", body=None, headers=None, key=None):
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if body is not None:
        h["Content-Length"] = str(len(data))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return send(srv, head.encode("latin-1"), data)


def error_of(status, body) -> dict:
    """The OpenAI error object of a 4xx reply."""
    assert 400 <= status < 500, (status, body[:300])
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
    return e


def still_serves(srv):
    status, _, body = request(srv, body={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "ok", (status, body)


# -- every field, every JSON type ---------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {}}}}
CHAT = {
    "model": "tiny", "max_tokens": 4,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "hm", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "21"},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ],
    "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False},
}
COMPLETION = {"model": "tiny", "prompt": "Once", "max_tokens": 2}

NUMBER, INT, BOOL, STR, LIST, OBJ, NULL = (float, int), (int,), (bool,), (str,), (list,), (dict,), (type(None),)
OPTIONAL = NULL  # absent and null mean the same
COMMON = {
    "model": STR, "temperature": NUMBER + OPTIONAL, "top_p": NUMBER + OPTIONAL, "min_p": NUMBER + OPTIONAL,
    "presence_penalty": NUMBER + OPTIONAL, "repetition_penalty": NUMBER + OPTIONAL,
    "frequency_penalty": NUMBER + OPTIONAL, "top_k": INT + OPTIONAL, "seed": INT + OPTIONAL, "n": INT + OPTIONAL,
    "stop": STR + LIST + OPTIONAL,
    "stream": BOOL + OPTIONAL, "stream_options": OBJ + OPTIONAL, "stream_options.include_usage": BOOL + OPTIONAL,
    "max_tokens": INT + OPTIONAL,
}
CHAT_FIELDS = {
    **COMMON, "logprobs": BOOL + OPTIONAL, "top_logprobs": INT + OPTIONAL, "reasoning_logprobs": BOOL + OPTIONAL,
    "messages": LIST, "messages[0]": OBJ, "messages[0].role": STR, "messages[1].content": STR + LIST,
    "messages[4].content[0]": OBJ, "messages[4].content[0].type": STR,
    "messages[4].content[0].text": STR,
    "messages[2].content": STR + LIST + NULL, "messages[2].reasoning_content": STR + OPTIONAL,
    "messages[2].tool_calls": LIST + OPTIONAL, "messages[2].tool_calls[0]": OBJ,
    "messages[2].tool_calls[0].id": STR + OPTIONAL, "messages[2].tool_calls[0].type": STR + OPTIONAL,
    "messages[2].tool_calls[0].function": OBJ, "messages[2].tool_calls[0].function.name": STR,
    "messages[2].tool_calls[0].function.arguments": STR + OBJ,
    "max_completion_tokens": INT + OPTIONAL, "tools": LIST + OPTIONAL, "tools[0]": OBJ,
    "tools[0].type": STR + OPTIONAL, "tools[0].function": OBJ, "tools[0].function.name": STR,
    "tools[0].function.description": STR + OPTIONAL, "tools[0].function.parameters": OBJ + OPTIONAL,
    "tools[0].function.strict": BOOL + OPTIONAL, "tool_choice": STR + OBJ + OPTIONAL,
    "tool_choice.type": STR + OPTIONAL, "tool_choice.function": OBJ, "tool_choice.function.name": STR,
    "chat_template_kwargs": OBJ + OPTIONAL, "chat_template_kwargs.enable_thinking": BOOL + OPTIONAL,
    "enable_thinking": BOOL + OPTIONAL, "thinking_budget": INT + OPTIONAL, "reasoning_effort": STR + OPTIONAL,
}
COMPLETION_FIELDS = {**COMMON, "prompt": STR + LIST, "suffix": NULL, "echo": BOOL + OPTIONAL,
                     "logprobs": INT + OPTIONAL, "top_logprobs": NULL}  # chat's name: the number is 'logprobs' here
CASES = [("/v1/chat/completions", CHAT, f) for f in CHAT_FIELDS] + \
        [("/v1/completions", COMPLETION, f) for f in COMPLETION_FIELDS]


def put(body, path: str, value):
    """A copy of `body` with `path` (a.b[0].c) set to `value`."""
    body = json.loads(json.dumps(body))
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    at = body
    for k in keys[:-1]:
        at = at.setdefault(k, {}) if isinstance(at, dict) else at[k]
    at[keys[-1]] = value
    return body


def of_type(value, types) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.integers(-3, 3)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["none", "auto", "required", "function", "text", "user", "tiny", "low", ""]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["type", "name", "function", "text", "x"]), inner,
                                             max_size=3), max_leaves=6)


def test_the_base_bodies_are_valid(server):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        status, _, body = request(server, path=path, body=base)
        assert status == 200, body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), value=JSON_VALUES)
def test_every_field_of_the_wrong_type_is_a_400(server, case, value):
    path, base, field = case
    types = (CHAT_FIELDS if base is CHAT else COMPLETION_FIELDS)[field]
    status, headers, body = request(server, path=path, body=put(base, field, value))
    assert status < 500, (field, value, body[:300])
    if not of_type(value, types):
        e = error_of(status, body)
        assert status == 400 and (e["param"] or "").startswith(field), (field, value, e)
    elif status >= 400:
        error_of(status, body)
    still_serves(server)


def test_the_examples_from_the_issue(server):
    for field, value in (("tool_choice", {"function": 5}), ("reasoning_effort", ["low"])):
        status, _, body = request(server, body=put(CHAT, field, value))
        assert status == 400 and error_of(status, body)["param"].startswith(field)
    deep = b'{"model": "tiny", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    for raw in (deep, b'{"model": "tiny", "x": ' + b"[" * 64 + b"]" * 64 + b"}"):
        status, _, body = request(server, body=raw)
        assert (status, error_of(status, body)["code"]) == (400, "invalid_json")
    ok = put(CHAT, "metadata", json.loads("[" * 62 + "]" * 62))  # 63 deep: allowed
    assert request(server, body=ok)[0] == 200
    still_serves(server)


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server):
    big = "word " * (CTX * 128 // 5 + 1000)  # more bytes than CTX tokens of the longest can cover
    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": big}]}),
                       ("/v1/completions", {"model": "tiny", "prompt": big})):
        t0 = time.monotonic()
        status, _, reply_body = request(server, path=path, body=body)
        e = error_of(status, reply_body)
        assert e["code"] == "context_length_exceeded" and "bytes" in e["message"], e
        assert time.monotonic() - t0 < 2.0  # tokenizing 1.3 MB would take over a second here
    still_serves(server)


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "temperature": NaN}', b'{"model": Infinity}',
                                 b'\xff{"model": "tiny"}', '{"model": "tiny"}'.encode("utf-16"),
                                 b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
                                 b'{"model": "tiny", "messages": [{"role": "user", "\\udfff": 1}]}',
                                 b'{"seed": ' + b"9" * 5000 + b"}"])
def test_json_that_is_not_quite_json(server, raw):
    status, _, body = request(server, body=raw)
    assert (status, error_of(status, body)["code"]) == (400, "invalid_json")


def test_paired_surrogate_escapes_are_fine(server):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}]}'
    assert request(server, body=raw)[0] == 200


# -- the request head ---------------------------------------------------------------------------

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.mark.parametrize("lines,status", [
    (b"Content-Length: %d\r\nContent-Length: 7\r\n" % len(BODY), 400),
    (b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(BODY), len(BODY)), 400),
    (b"Content-Length: +%d\r\n" % len(BODY), 400),
    (b"Content-Length: %s\r\n" % "_".join(str(len(BODY))).encode(), 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: 99999999999999999999999\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(BODY), 411),
    (b"", 411),
    (b"Content-Length: %d\r\nHost: 127.0.0.1\r\n" % len(BODY), 400),
    (b"Content-Length: %d\r\n" % len(BODY) + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(80)),
     431),
])
def test_bad_framing_is_refused(server, lines, status):
    got, headers, body = send(server, HEAD + lines + b"\r\n", BODY, half_close=True)
    assert got == status and error_of(got, body)
    assert headers["Connection"] == "close"
    still_serves(server)


def test_a_body_that_stops_arriving_times_out(engine):
    srv = start(engine, limits=Limits(read_timeout=0.5))
    try:
        t0 = time.monotonic()
        status, _, body = send(srv, HEAD + b"Content-Length: 100\r\n\r\n", b'{"model"')
        assert status == 408 and error_of(status, body) and time.monotonic() - t0 < 5
    finally:
        srv.shutdown()
        srv.server_close()


def test_expect_100_continue_only_after_the_checks(keyed):
    s = connect(keyed)
    try:  # a refused request gets its final answer instead of "100 Continue"
        s.sendall(HEAD + b"Content-Length: 500000000\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(12) == b"HTTP/1.1 401"
    finally:
        s.close()
    s = connect(keyed)
    try:
        s.sendall(HEAD + b"Authorization: Bearer %s\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                  % (KEY.encode(), len(BODY)))
        assert s.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        assert reply(s)[0] == 200
    finally:
        s.close()


HEADER_NAMES = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Authorization", "Origin",
                                "Expect", "Connection", "Content-Type", "Access-Control-Request-Method",
                                "X-Anything", "Accept-Encoding"]) | \
    st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True)
HEADER_VALUES = st.sampled_from(["", "0", "5", "-1", "chunked", "close", "keep-alive", "100-continue", "localhost",
                                 "127.0.0.1:80", "[::1]", "evil.example", "http://evil.example", "null",
                                 "Bearer x", "application/json"]) | \
    st.text(st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n"), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "BREW"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/health", "/v1/x", "/\x1b[2J"]),
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
def test_random_headers_get_an_answer(server, method, path, headers):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    if not any(k.lower() == "content-length" for k, _ in headers):
        head += f"Content-Length: {len(BODY)}\r\n"
    # the client then half-closes: a body shorter than its Content-Length ends there, not in a timeout
    status, _, body = send(server, head.encode("latin-1") + b"\r\n", BODY, half_close=True)
    assert status < 500, (status, body[:300])
    if status >= 400:
        error_of(status, body)
    still_serves(server)


# -- clients that misbehave ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_still_gets_its_reply(server, stream):
    body = json.dumps({"model": "tiny", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, data = send(server, HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body, half_close=True)
    assert status == 200
    if stream:
        events = [json.loads(x) for x in re.findall(rb"^data: (\{.*\})$", data, re.M)]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "ok"
        assert data.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(data)["choices"][0]["message"]["content"] == "ok"


def test_a_client_that_stops_reading_frees_the_model(engine, says_ok, tid):
    """A stream nobody reads fills the socket's buffers; the write then times out (1 s here),
    the generation stops, and the request queued behind it is answered."""
    la = engine.tokenizer.encode(" la", add_special_tokens=False).ids[0]
    says_ok.fn = lambda generated: la  # never stops by itself
    log = []
    srv = start(engine, log=log.append, limits=Limits(write_timeout=1.0, send_buffer=16 << 10), parallel=1)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stalled.connect(srv.server_address[:2])
        body = json.dumps({"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                           "chat_template_kwargs": {"enable_thinking": False}}).encode()
        stalled.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        while not srv.worker.batcher.in_use:  # it has the model's one slot
            time.sleep(0.01)
        t0 = time.monotonic()
        status, _, data = request(srv, body={"model": "tiny", "max_tokens": 3,
                                             "messages": [{"role": "user", "content": "hi"}]})
        waited = time.monotonic() - t0
        assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"
        assert waited < 20, waited
        assert srv.worker.batcher.in_use == 0 and srv.worker.batcher.queued == 0
        assert any("stopped reading for 1 s" in ln for ln in log), log
        print(f"\nthe request behind a stalled stream waited {waited:.2f} s")
    finally:
        stalled.close()
        srv.shutdown()
        srv.server_close()


def test_no_key_means_the_body_is_never_read(keyed):
    """Headers claiming 500 MB, a few bytes sent: the 401 comes at once, not after 500 MB."""
    t0 = time.monotonic()
    status, headers, body = send(keyed, HEAD + b"Content-Length: 500000000\r\n\r\n", b'{"model": ')
    assert (status, error_of(status, body)["code"]) == (401, "invalid_api_key")
    assert time.monotonic() - t0 < 1.5 and headers["Connection"] == "close"
    t0 = time.monotonic()  # with the key: refused from the length alone
    status, _, body = send(keyed, HEAD + b"Authorization: Bearer %s\r\nContent-Length: 500000000\r\n\r\n"
                           % KEY.encode(), b'{"model": ')
    assert status == 413 and error_of(status, body) and time.monotonic() - t0 < 1.5
    status, _, body = request(keyed, body=json.loads(BODY), key=KEY)
    assert status == 200


def test_a_client_over_the_connection_limit_gets_a_503(engine):
    srv = start(engine, limits=Limits(max_connections=2))
    idle = [connect(srv) for _ in range(2)]
    try:
        time.sleep(0.2)
        status, headers, body = request(srv, body=json.loads(BODY))
        assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
        for s in idle:
            s.close()
        time.sleep(0.2)
        still_serves(srv)
    finally:
        for s in idle:
            s.close()
        srv.shutdown()
        srv.server_close()


# -- web pages: Host and Origin -----------------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "localhost.", "127.0.0.1", "127.0.0.1:1",
                                  "127.1.2.3:65535", "[::1]", "[::1]:8080", "[0:0:0:0:0:0:0:1]",
                                  "[::ffff:127.0.0.1]:80"])
def test_loopback_host_names_are_accepted(server, host):
    assert names_loopback(host)
    status, _, body = request(server, "GET", "/v1/models", headers={"Host": host})
    assert status == 200, body


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "127.0.0.1:80:80", "[::2]", "[::1", "::1",
                                  "localhost:http", "0.0.0.0", "10.0.0.1", "", "127.0.0.1 evil"])
def test_other_host_names_are_refused_on_loopback(server, host):
    assert not names_loopback(host)
    status, _, body = request(server, "GET", "/v1/models", headers={"Host": host})
    assert (status, error_of(status, body)["code"]) == (403, "host_not_allowed")


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["localhost", "127.0.0.1", "[::1]", "127.9.8.7", "[::ffff:127.0.0.1]"]),
       upper=st.lists(st.booleans(), min_size=20, max_size=20), port=st.none() | st.integers(0, 65535),
       junk=st.sampled_from(["", ".evil.example", "@evil.example", " x", "/", "\x1b", "]", ":1:2"]))
def test_host_names_in_any_case_with_any_port(name, upper, port, junk):
    host = "".join(c.upper() if u else c for c, u in zip(name, upper + [False] * len(name)))
    host += "" if port is None else f":{port}"
    assert names_loopback(host + junk) == (junk == "")


def test_an_ipv6_loopback_bind(engine):
    srv = make_server(engine, "::1", 0, model_id="tiny", limits=FAST)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert srv.url.startswith("http://[::1]:")
        for host, status in ((f"[::1]:{srv.server_address[1]}", 200), ("evil.example", 403)):
            assert request(srv, "GET", "/v1/models", headers={"Host": host})[0] == status
    finally:
        srv.shutdown()
        srv.server_close()


def test_only_loopback_binds_check_the_host():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.2")


def test_no_cors_by_default(server):
    status, headers, _ = request(server, "GET", "/v1/models")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    for method in ("GET", "OPTIONS"):  # a page's request, or its preflight, is refused
        status, headers, body = request(server, method, "/v1/models", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert (status, error_of(status, body)["code"]) == (403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in headers
    status, _, body = request(server, body=json.loads(BODY), headers={"Origin": "null"})
    assert status == 403


def test_cors_origin_lets_one_origin_in(engine):
    srv = start(engine, cors_origins=["http://app.example:3000"])
    try:
        pre = {"Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
        status, headers, _ = request(srv, "OPTIONS", "/v1/chat/completions", headers=pre)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"
        assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-lang"
        assert "POST" in headers["Access-Control-Allow-Methods"] and "Content-Length" not in headers
        status, headers, _ = request(srv, body=json.loads(BODY), headers={"Origin": "http://app.example:3000"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"
        assert headers["Vary"] == "Origin"
        status, headers, _ = request(srv, body=json.loads(BODY), headers={"Origin": "http://app.example:3001"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
    finally:
        srv.shutdown()
        srv.server_close()
    srv = start(engine, cors_origins=["*"])
    try:
        status, headers, _ = request(srv, "GET", "/v1/models", headers={"Origin": "http://any.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    finally:
        srv.shutdown()
        srv.server_close()


# -- the log ------------------------------------------------------------------------------------

def test_log_lines_escape_what_clients_send(server, log):
    del log[:]
    send(server, b"GET /\x1b]0;owned\x07\x1b[2J\xc2\x9b\r HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    send(server, HEAD + b"Content-Length: 2\r\nOrigin: http://e\x1b[31m\r\n\r\n", b"{}")
    assert log and all(ln.isprintable() for ln in log), log
    assert any("\\x1b]0;owned\\x07\\x1b[2J" in ln for ln in log), log
    assert printable("a\u202eb\ud800\n") == "a\\u202eb\\ud800\\n"


def test_a_client_reset_costs_one_log_line_and_no_traceback(server, log, capfd):
    del log[:]
    for i in range(20):  # a reset during an error reply, at varying points
        s = connect(server)
        s.sendall(b"GET /v1/nothing-%d HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" % i)
        time.sleep(0.002 * (i % 5))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    time.sleep(0.3)
    still_serves(server)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    for i in range(20):  # the access line, and at most one more
        assert len([ln for ln in log if f"/v1/nothing-{i} " in ln]) <= 2, log
    assert all("nothing-" in ln or "/v1/chat/completions" in ln for ln in log), log


# -- the real command, in a child process -------------------------------------------------------

def test_cors_origin_must_be_an_origin():
    from typer.testing import CliRunner

    from qwen3cli.cli import app

    r = CliRunner().invoke(app, ["serve", "x.gguf", "--cors-origin", "http://app.example/page"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "--cors-origin" in lines[0], r.stderr


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


@pytest.fixture(scope="module")
def child(model_path, tmp_path_factory):
    """`qwen3cli serve -v --api-key` in a child process; its stderr in a file."""
    err = tmp_path_factory.mktemp("serve") / "stderr"
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "COLUMNS": "200"}
    with open(err, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "qwen3cli", "serve", str(model_path), "--port", "0", "-v",
                              "--api-key", KEY, "--ctx", "256", "--cors-origin", "http://app.example"],
                             stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", err.read_text())):
            assert p.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)

        class Child:
            pid, server_address, stderr = p.pid, ("127.0.0.1", int(m.group(1))), err

        yield Child
    finally:
        p.terminate()
        p.wait(10)


def test_the_command_escapes_its_log_and_prints_no_traceback(child):
    send(child, b"GET /\x1b[31mred\x1b[0m HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for _ in range(5):  # resets during a reply
        s = connect(child)
        s.sendall(HEAD + b"Content-Length: 100000\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    status, headers, _ = request(child, "GET", "/v1/models", headers={"Origin": "http://app.example"}, key=KEY)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example"
    time.sleep(0.3)
    text = child.stderr.read_bytes().decode()
    assert "\x1b" not in text and "\\x1b[31mred\\x1b[0m" in text, text
    assert "Traceback" not in text, text


def test_unauthenticated_big_bodies_cost_no_memory(child):
    """8 clients at once, each sending a body just under the size limit without a key: the
    server reads none of it."""
    before, hwm_before = rss_mb(child.pid)
    junk = b"x" * (Limits().max_body - 1024)
    statuses = []

    def read(s):
        try:
            statuses.append(reply(s)[0])
        except OSError:  # reset before we read: the reply is lost, the point stands
            pass

    def attack():
        s = connect(child, timeout=20)
        try:
            s.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(junk))
            reader = threading.Thread(target=read, args=(s,))
            reader.start()
            try:
                s.sendall(junk)
            except OSError:  # the server stopped listening to us: that is the point
                pass
            reader.join(20)
        finally:
            s.close()

    most, done = [before], threading.Event()

    def watch():  # the RSS while it lasts (the high-water mark may predate it: loading the model)
        while not done.wait(0.005):
            most.append(rss_mb(child.pid)[0])

    t0 = time.monotonic()
    threads = [threading.Thread(target=attack) for _ in range(8)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join(60)
    seconds = time.monotonic() - t0
    done.set()
    after, hwm = rss_mb(child.pid)
    print(f"\n8 x {len(junk) / (1 << 20):.1f} MB without a key: {seconds:.2f} s, server RSS {before:.0f} MB "
          f"before, {max(most):.0f} MB at most during, {after:.0f} MB after (high-water mark {hwm_before:.0f} -> "
          f"{hwm:.0f} MB); answers {statuses}")
    assert max(most) - before < 40 and hwm - hwm_before < 40, (before, max(most), hwm_before, hwm)
    assert statuses and set(statuses) == {401}
