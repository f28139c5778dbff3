"""Decode and prefill speed of our engine against llama.cpp on the same GGUF, same threads.

    python scripts/bench_quantize.py --types q8_0      # makes /tmp/qwen3bench/qwen3-0.6b-q8_0.gguf
    python scripts/bench_run.py [--model FILE] [--prompt 128] [--gen 32] [--threads 2]

Prints tokens/s for a prompt of --prompt tokens (prefill, one batch) and --gen greedy decode
steps, for us and, when llama-cpp-python is installed, for llama.cpp in the same run, with the
ratio ours / llama.cpp (> 1: we are faster). Also the time from starting `qwen3cli run` to
its first token (a fresh process, numba cache warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ours(path: str, prompt: list[int], gen: int, threads: int) -> tuple[float, float]:
    import numba

    from qwen3cli.io.loader import load
    from qwen3cli.model.forward import Model

    numba.set_num_threads(threads)
    model = Model(load(path).weights, ctx=len(prompt) + gen + 8)
    model.forward(prompt[:4], model.new_cache())  # compile / warm
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(gen):
        logits = model.forward([int(np.argmax(logits))], cache)
    return len(prompt) / prefill, gen / (time.perf_counter() - t0)


def llama(path: str, prompt: list[int], gen: int, threads: int) -> tuple[float, float] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(path, n_ctx=len(prompt) + gen + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    llm.eval(prompt[:4])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return len(prompt) / prefill, gen / (time.perf_counter() - t0)


def first_token(path: str, threads: int) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "run", path, "Hello", "-n", "1", "--json", "--no-think",
                        "--threads", str(threads)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return min(wall, json.loads(r.stdout)["timings"]["time_to_first_token_s"] + 0.0) if r.stdout else wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/qwen3bench/qwen3-0.6b-q8_0.gguf")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if not Path(a.model).is_file():
        sys.exit(f"{a.model}: not found (make it with scripts/bench_quantize.py)")
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 150000, a.prompt)]
    t = first_token(a.model, a.threads)
    print(f"model {a.model}, prompt {a.prompt} tokens, {a.gen} decode steps, {a.threads} threads")
    print(f"qwen3cli run: first token {t:.2f} s after start (process start, load, template, prefill)")
    o = ours(a.model, prompt, a.gen, a.threads)
    print(f"ours      prefill {o[0]:8.1f} tok/s   decode {o[1]:6.1f} tok/s")
    ll = llama(a.model, prompt, a.gen, a.threads)
    if ll is None:
        print("llama.cpp: llama-cpp-python not installed, no baseline")
        return
    print(f"llama.cpp prefill {ll[0]:8.1f} tok/s   decode {ll[1]:6.1f} tok/s")
    print(f"ratio     prefill {o[0] / ll[0]:8.2f}x        decode {o[1] / ll[1]:6.2f}x   (ours / llama.cpp)")


if __name__ == "__main__":
    main()
