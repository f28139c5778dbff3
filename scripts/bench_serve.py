"""Serve throughput: concurrent streaming chats against `qwen3cli serve`, batched and not.

    python scripts/bench_serve.py FILE.gguf [FILE.gguf ...] --clients 1 2 4 8 [--tokens 64]
        [--llama-server PATH]  # the same runs against llama.cpp's llama-server --parallel N

For each file it starts `qwen3cli serve --parallel P` (P = the most clients asked) and, as the
baseline in the same run, `--parallel 1` (requests one after another, as before batching), each
in a subprocess of its own with 2 threads; then for each client count C, C streaming chat
requests at once, each asking for --tokens tokens. It prints (medians of --rounds interleaved waves) the aggregate decode rate
(completion tokens of all requests over the wall time from the first request to the last
token), the median time to first token, and the ratios against one client and against
--parallel 1. Then:

- newcomer: the TTFT of a request sent while 3 others stream, against its TTFT alone;
- mask: one client's decode rate with a JSON schema (response_format) against without.

Run it with nothing else on the machine: on 2 cores any other process halves the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["Tell me a story about a lighthouse.", "Explain how tides work.", "Write a poem about rain.",
           "Describe a busy market.", "What makes a good cup of tea?", "Plan a day in the mountains.",
           "Why do cats purr?", "Summarise the history of bridges."]
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "array", "items": {
    "type": "string"}}}, "required": ["title", "lines"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, what: str):
        self.port, self.what = port, what
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{what} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                ok = r.status == 200 and b"ok" in r.read()
                c.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{what} did not come up")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def chat(port: int, prompt: str, tokens: int, schema: bool = False) -> dict:
    """One streaming chat; the time of its first and last token and its token count."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.7, "seed": 1,
            "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    first = last = None
    usage = None
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            d = ch.get("delta", {})
            if d.get("content") or d.get("reasoning_content"):
                now = time.perf_counter()
                first = first or now
                last = now
    c.close()
    return {"start": t0, "first": first or t0, "last": last or t0, "tokens": usage["completion_tokens"] if usage else 0}


def wave(port: int, clients: int, tokens: int) -> dict:
    out = [None] * clients

    def one(i):
        out[i] = chat(port, PROMPTS[i % len(PROMPTS)], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0, t1 = min(r["start"] for r in out), max(r["last"] for r in out)
    return {"tps": sum(r["tokens"] for r in out) / (t1 - t0),
            "ttft": statistics.median(r["first"] - r["start"] for r in out)}


def newcomer(port: int, tokens: int, probes: int = 7) -> tuple[float, float]:
    """Median TTFTs of a short request alone and sent while 3 others stream (probes spaced
    apart, so each lands at another point of a decode step)."""
    def ttft():
        r = chat(port, PROMPTS[4], 2)
        return r["first"] - r["start"]

    base = statistics.median(ttft() for _ in range(probes))
    streams = [threading.Thread(target=chat, args=(port, PROMPTS[i], tokens * 8)) for i in range(3)]
    for t in streams:
        t.start()
    time.sleep(1.0)  # they are decoding
    busy = []
    for i in range(probes):
        busy.append(ttft())
        time.sleep(0.137 * (i + 1) % 0.3)
    for t in streams:
        t.join()
    return base, statistics.median(busy)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="waves per client count, interleaved; medians are shown")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary, run the same way")
    a = ap.parse_args()
    print(f"host CPU: {cpu_name()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    top = max(a.clients)
    for f in a.files:
        name = Path(f).name
        runs = {}
        setups = [(f"qwen3cli --parallel {p}", [sys.executable, "-m", "qwen3cli", "serve", f, "--parallel", str(p),
                                               "--ctx", str(a.ctx), "--threads", str(a.threads), "--alias", "m"], p)
                  for p in (top, 1)]
        if a.llama_server:
            setups.append((f"llama-server --parallel {top}", [a.llama_server, "-m", f, "-np", str(top), "-c",
                                                              str(a.ctx * top), "-t", str(a.threads), "--no-webui"], top))
        for what, cmd, _ in setups:
            port = free_port()
            srv = Server(cmd + ["--port", str(port)], port, what)
            try:
                wave(port, 1, 16), wave(port, top, 8)  # warm: kernels loaded, every slot's cache touched
                got = {c: [] for c in a.clients}
                for _ in range(a.rounds):  # interleaved: a slow spell of the host hits every count alike
                    for c in a.clients:
                        got[c].append(wave(port, c, a.tokens))
                runs[what] = {c: {k: statistics.median(w[k] for w in ws) for k in ("tps", "ttft")}
                              for c, ws in got.items()}
                if what.startswith("qwen3cli") and what.endswith(str(top)):
                    runs["newcomer"] = newcomer(port, a.tokens)
                    rates = {False: [], True: []}
                    for _ in range(a.rounds):
                        for schema in (False, True):
                            r = chat(port, PROMPTS[0], a.tokens, schema=schema)
                            rates[schema].append(r["tokens"] / (r["last"] - r["first"]))
                    runs["mask"] = [statistics.median(rates[False]), statistics.median(rates[True])]
            finally:
                srv.close()
        ours = f"qwen3cli --parallel {top}"
        one = runs[ours][min(a.clients)]["tps"]
        print(f"\n{name}: {a.tokens} tokens a request, short chat prompts")
        for what in [w for w in runs if w.startswith(("qwen3cli", "llama-server"))]:
            for c, r in runs[what].items():
                vs_serial = r["tps"] / runs["qwen3cli --parallel 1"][c]["tps"]
                print(f"  {what:26s} clients {c}: {r['tps']:7.1f} tok/s aggregate ({r['tps'] / one:4.2f}x one client, "
                      f"{vs_serial:4.2f}x --parallel 1); median TTFT {r['ttft'] * 1e3:7.0f} ms")
        base, busy = runs["newcomer"]
        print(f"  newcomer TTFT: {base * 1e3:.0f} ms alone, {busy * 1e3:.0f} ms while 3 others stream "
              f"({busy / base:.2f}x)")
        plain, shaped = runs["mask"]
        print(f"  JSON schema: {shaped:.1f} tok/s against {plain:.1f} without ({shaped / plain:.2f}x)")


if __name__ == "__main__":
    main()
