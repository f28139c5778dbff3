"""Server overhead: N sequential short chat requests to `qwen3cli serve` (a separate process,
through the official openai client, streaming) against the same prompts in process (the path
`qwen3cli run` takes: template, tokenize, generate on a fresh cache).

    python scripts/bench_quantize.py --types q8_0      # makes /tmp/qwen3bench/qwen3-0.6b-q8_0.gguf
    python scripts/bench_serve_overhead.py [--model FILE] [-n 20] [--max-tokens 16] [--rounds 2]

The in-process path runs twice: on a fresh cache per request (as `run`) and over one PrefixCache
(as the server), which isolates the HTTP/JSON/client cost. All paths decode greedily with
thinking off, so they compute the same tokens. Prompts differ from their first word on, so the
prefix cache saves only the template's few tokens. Prints requests/s and mean time to first token for each path and the ratios server / in-process
(requests/s below 1 and TTFT above 1 are the server's overhead). Rounds alternate the order.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[str]:
    words = ["Red", "Why", "Name", "Give", "List", "Say", "Pick", "Tell", "Write", "Count"]
    return [f"{words[i % len(words)]} {i}: one short sentence about colour number {i}." for i in range(n)]


_ENGINE = {}


def in_process(path: str, texts: list[str], max_tokens: int, reuse: bool = False) -> tuple[float, float, int]:
    """`reuse`: keep one PrefixCache across requests, as the server does (else a fresh cache, as `run`)."""
    from qwen3cli.io.loader import load
    from qwen3cli.runtime.engine import Engine
    from qwen3cli.runtime.generation import Done, generate
    from qwen3cli.runtime.prefix_cache import PrefixCache
    from qwen3cli.sampler import Sampler, SamplingParams

    if path not in _ENGINE:
        _ENGINE[path] = Engine(load(path), ctx=2048)
    engine = _ENGINE[path]
    sampler = Sampler(SamplingParams(temperature=0))
    prefix = PrefixCache(engine.model)

    def one(text: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        p = engine.prompt([{"role": "user", "content": text}], enable_thinking=False)
        first = None
        kw = dict(stop_ids=engine.loaded.stop_ids, max_tokens=max_tokens, opened=p.opened)
        events = prefix.generate(engine.tokenizer, p.ids, sampler, **kw) if reuse else \
            generate(engine.model, engine.tokenizer, p.ids, sampler, **kw)
        for ev in events:
            if isinstance(ev, Done):
                return first, ev.completion_tokens
            if first is None and ev.text:
                first = time.perf_counter() - t0
        raise AssertionError("no Done")

    one("warm up")
    t0 = time.perf_counter()
    runs = [one(t) for t in texts]
    return len(texts) / (time.perf_counter() - t0), sum(r[0] for r in runs) / len(runs), sum(r[1] for r in runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen3cli", "serve", path, "--port", str(port), "--ctx", "2048",
                             "--alias", "bench"], cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url + "/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up")


def through_server(url: str, texts: list[str], max_tokens: int) -> tuple[float, float, int]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def one(text: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        first, n = None, 0
        for ch in client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"chat_template_kwargs": {"enable_thinking": False}}):
            if ch.usage:
                n = ch.usage.completion_tokens
            if first is None and ch.choices and (ch.choices[0].delta.content or
                                                 (ch.choices[0].delta.model_extra or {}).get("reasoning_content")):
                first = time.perf_counter() - t0
        return first, n

    one("warm up")
    t0 = time.perf_counter()
    runs = [one(t) for t in texts]
    return len(texts) / (time.perf_counter() - t0), sum(r[0] for r in runs) / len(runs), sum(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/qwen3bench/qwen3-0.6b-q8_0.gguf")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not os.path.exists(a.model):
        raise SystemExit(f"{a.model}: missing; make it with scripts/bench_quantize.py --types q8_0")
    texts = prompts(a.n)
    proc, url = start_server(a.model)
    res = {"in-process": [], "server": [], "in-process+reuse": []}
    paths = {"in-process": in_process, "server": lambda p, t, m: through_server(url, t, m),
             "in-process+reuse": lambda p, t, m: in_process(p, t, m, reuse=True)}
    try:
        for r in range(a.rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for name in order:
                res[name].append(paths[name](a.model, texts, a.max_tokens))
                rps, ttft, n = res[name][-1]
                print(f"round {r + 1} {name:10s}  {rps:6.3f} requests/s  TTFT {1000 * ttft:7.1f} ms  "
                      f"({n} tokens generated)", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    print(f"\n{a.n} sequential chat requests, {a.max_tokens} tokens max, greedy, thinking off, {a.rounds} rounds")
    for k, v in res.items():
        print(f"{k:17s} {sum(x[0] for x in v) / len(v):.3f} requests/s, TTFT {1000 * sum(x[1] for x in v) / len(v):.1f} ms")
    # the machine is shared: each round's runs were back to back, so per-round ratios are the fairer figure
    for base in ("in-process", "in-process+reuse"):
        pairs = [(s[0] / i[0], s[1] / i[1]) for s, i in zip(res["server"], res[base])]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"server / {base}: requests/s {med([p[0] for p in pairs]):.3f}, TTFT {med([p[1] for p in pairs]):.3f} "
              f"(median of rounds: " + ", ".join(f"{x:.3f}/{y:.3f}" for x, y in pairs) + ")")


if __name__ == "__main__":
    main()
