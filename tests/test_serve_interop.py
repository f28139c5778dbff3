"""Our OpenAI replies next to llama.cpp's llama-server's: the fields clients read (the openai
client, LangChain, lm-eval) have the same names, nesting and JSON types, so a client moves from
one server to the other unchanged (README, "Past one machine").

The reference replies were recorded from llama-server on the same tiny file and are kept in
tests/data/llama_server_replies.json (with its version). With LLAMA_SERVER=path/to/llama-server
the test also runs that binary live, and QWEN3CLI_RECORD_REPLIES=1 rewrites the file from it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_serve import engine, server  # noqa: F401 (fixtures)

RECORDED = Path(__file__).parent / "data" / "llama_server_replies.json"
HI = [{"role": "user", "content": "What is up?"}]
REQUESTS = {
    "chat": ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 0}),
    "chat_logprobs": ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 2}),
    "chat_stream": ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}, "logprobs": True,
                                             "top_logprobs": 1}),
    "completion": ("/v1/completions", {"prompt": "Once upon", "max_tokens": 2, "temperature": 0}),
    "completion_logprobs": ("/v1/completions", {"prompt": "Once upon", "max_tokens": 2, "temperature": 0,
                                                "logprobs": 2}),
    "models": ("/v1/models", None),
}
USAGE = ["usage.prompt_tokens", "usage.completion_tokens", "usage.total_tokens",
         "usage.prompt_tokens_details.cached_tokens"]
HEAD = ["id", "object", "created", "model", "choices[0].index", "choices[0].finish_reason"]
TOKEN = ["token", "logprob", "bytes[0]", "top_logprobs[0].token", "top_logprobs[0].logprob", "top_logprobs[0].bytes[0]"]
# what clients read, per reply ("stream[i]": the stream's i-th event, counted from the end when negative)
READ = {
    "chat": HEAD + USAGE + ["choices[0].message.role", "choices[0].message.content"],
    "chat_logprobs": HEAD + ["choices[0].message.content"] + [f"choices[0].logprobs.content[0].{f}" for f in TOKEN],
    "chat_stream": [f"stream[1].{f}" for f in ["id", "object", "created", "model", "choices[0].index",
                                                 "choices[0].delta.content", "choices[0].finish_reason"]]
    + [f"stream[1].choices[0].logprobs.content[0].{f}" for f in TOKEN]
    + ["stream[-2].choices[0].finish_reason", "stream[-1].choices"] + [f"stream[-1].{u}" for u in USAGE],
    "completion": HEAD + USAGE + ["choices[0].text"],
    "completion_logprobs": HEAD + ["choices[0].text"] + [f"choices[0].logprobs.content[0].{f}" for f in TOKEN],
    "models": ["object", "data[0].id", "data[0].object"],
}


def call(base: str, model: str, name: str):
    path, body = REQUESTS[name]
    data = None if body is None else json.dumps({"model": model, **body}).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    if not (body or {}).get("stream"):
        return json.loads(text)
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return {"stream": [json.loads(e) for e in events[:-1]]}


def kind(reply, path: str) -> str:
    """The JSON type at a path like a.b[0].c ('missing' when it is not there)."""
    at = reply
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(at, list) or not -len(at) <= i < len(at):
                return "missing"
            at = at[i]
        else:
            if not isinstance(at, dict) or part not in at:
                return "missing"
            at = at[part]
    return {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}.get(
        type(at), "number" if isinstance(at, (int, float)) else type(at).__name__)


def our_replies(server) -> dict:
    base = server.url.removesuffix("/v1")
    return {name: call(base, "tiny", name) for name in REQUESTS}


def compare(ours: dict, theirs: dict) -> list[str]:
    diffs = []
    for name, paths in READ.items():
        for p in paths:
            a, b = kind(ours[name], p), kind(theirs[name], p)
            if a != b or a == "missing":
                diffs.append(f"{name}: {p} is {a} here, {b} in llama-server's")
    return diffs


def test_recorded_replies_hold_what_clients_read():
    """The reference itself: every field compared exists there (a test that cannot fail otherwise)."""
    theirs = json.loads(RECORDED.read_text())["replies"]
    missing = [f"{name}: {p}" for name, paths in READ.items() for p in paths if kind(theirs[name], p) == "missing"]
    assert not missing


def test_our_replies_have_llama_servers_shape(server):
    theirs = json.loads(RECORDED.read_text())["replies"]
    assert compare(our_replies(server), theirs) == []


@pytest.fixture
def live_llama_server(gguf_model):
    exe = os.environ.get("LLAMA_SERVER")
    if not exe:
        pytest.skip("set LLAMA_SERVER=path/to/llama-server to compare with a live one")
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)  # test_serve's file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-m", str(path), "-c", "512", "-np", "1", "-t", "1", "--port", str(port),
                             "--jinja", "--reasoning-format", "deepseek"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/props", timeout=10) as r:
            version = json.loads(r.read()).get("build_info", "")
        yield base, version, str(path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_against_a_live_llama_server(server, live_llama_server):
    base, version, path = live_llama_server
    theirs = {name: call(base, "tiny", name) for name in REQUESTS}
    if os.environ.get("QWEN3CLI_RECORD_REPLIES") == "1":
        text = json.dumps({"llama_server": version, "replies": theirs}, indent=1, ensure_ascii=False)
        RECORDED.write_text(text.replace(json.dumps(path)[1:-1], Path(path).name) + "\n")  # no temporary dir
    assert compare(our_replies(server), theirs) == []


def test_lm_eval_scores_through_both_endpoints(server, tmp_path):
    """scripts/interop_lm_eval.py: loglikelihood and generate_until through local-completions,
    generate_until through local-chat-completions, each ending with numbers."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    script = Path(__file__).parent.parent / "scripts" / "interop_lm_eval.py"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script), "--base-url", server.url.removesuffix("/v1"), "--limit", "2"],
                       capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    ok = [line.split()[:3] for line in r.stdout.splitlines() if line.startswith("local-")]
    assert ok == [["local-completions", "qwen3cli_interop_mc", "ok"],
                  ["local-completions", "qwen3cli_interop_gen", "ok"],
                  ["local-chat-completions", "qwen3cli_interop_gen", "ok"]]
