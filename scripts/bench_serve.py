"""Server overhead: N sequential short chat requests to `qwen3cli serve` (a separate process,
through the official openai client, streaming) against the same prompts in process (the path
`qwen3cli run` takes: template, tokenize, generate on a fresh cache).

    python scripts/bench_quantize.py --types q8_0      # makes /tmp/qwen3bench/qwen3-0.6b-q8_0.gguf
    python scripts/bench_serve.py [--model FILE] [-n 20] [--max-tokens 16] [--rounds 2]

Both paths decode greedily with thinking off, so they compute the same tokens. Prompts differ
from their first word on, so the server's prefix cache saves only the template's few tokens.
Prints requests/s and mean time to first token for each path and the ratios server / in-process
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


def in_process(path: str, texts: list[str], max_tokens: int) -> tuple[float, float, int]:
    from qwen3cli.engine import Engine
    from qwen3cli.generate import Done, generate
    from qwen3cli.loader import load
    from qwen3cli.sampler import Sampler, SamplingParams

    engine = Engine(load(path), ctx=2048)
    sampler = Sampler(SamplingParams(temperature=0))

    def one(text: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        p = engine.prompt([{"role": "user", "content": text}], enable_thinking=False)
        first = None
        for ev in generate(engine.model, engine.tokenizer, p.ids, sampler, stop_ids=engine.loaded.stop_ids,
                           max_tokens=max_tokens, thinking=p.opened):
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
    res = {"in-process": [], "server": []}
    try:
        for r in range(a.rounds):
            order = ["in-process", "server"] if r % 2 == 0 else ["server", "in-process"]
            for name in order:
                fn = in_process if name == "in-process" else lambda p, t, m: through_server(url, t, m)
                res[name].append(fn(a.model, texts, a.max_tokens))
                rps, ttft, n = res[name][-1]
                print(f"round {r + 1} {name:10s}  {rps:6.3f} requests/s  TTFT {1000 * ttft:7.1f} ms  "
                      f"({n} tokens generated)", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    mean = {k: (sum(x[0] for x in v) / len(v), sum(x[1] for x in v) / len(v)) for k, v in res.items()}
    (srps, sttft), (irps, ittft) = mean["server"], mean["in-process"]
    print(f"\n{a.n} sequential chat requests, {a.max_tokens} tokens max, greedy, thinking off, {a.rounds} rounds")
    print(f"in-process: {irps:.3f} requests/s, TTFT {1000 * ittft:.1f} ms")
    print(f"server:     {srps:.3f} requests/s, TTFT {1000 * sttft:.1f} ms")
    print(f"ratio server / in-process: requests/s {srps / irps:.3f}, TTFT {sttft / ittft:.3f}")
    # the machine is shared: each round's pair ran back to back, so its ratio is the fairer figure
    pairs = sorted((s[0] / i[0], s[1] / i[1]) for s, i in zip(res["server"], res["in-process"]))
    print("per-round ratios (requests/s, TTFT): " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in pairs) +
          f"; median requests/s ratio {pairs[len(pairs) // 2][0]:.3f}, median TTFT ratio "
          f"{sorted(b for _, b in pairs)[len(pairs) // 2]:.3f}")


if __name__ == "__main__":
    main()
