"""Decode tokens/s with the KV cache already `--depth` positions deep, per cache type.

The cache is filled with random keys and values (no prefill to wait for): a decode step's
attention then reads `depth` rows of every layer and head, which is what the cache type
changes. Prints one line per type: tok/s, the cache's bytes at this context.

    python scripts/bench_kv_cache.py FILE.gguf --depth 4096 -n 16 --types f32 f16 q8_0
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qwen3cli.io.loader import load
from qwen3cli.model.forward import Model, kv_cache_nbytes


def fill(cache, depth: int, rng) -> None:
    L, H, _, D = cache.k.shape
    for li in range(L):
        k = rng.standard_normal((H, depth, D), dtype=np.float32)
        cache.write(li, 0, k, k)
    cache.n = depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("-n", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    w = load(args.file).weights
    models = {t: Model(w, ctx=args.depth + args.n + 2, cache_type=t) for t in args.types}
    rng = np.random.default_rng(0)
    best = {t: 0.0 for t in args.types}
    for _ in range(args.rounds):  # alternate types, so that a busy machine hurts them alike
        for t, m in models.items():
            cache = m.new_cache()
            fill(cache, args.depth, rng)
            m.forward([1], cache)  # warm
            t0 = time.perf_counter()
            for i in range(args.n):
                m.forward([2 + i], cache)
            best[t] = max(best[t], args.n / (time.perf_counter() - t0))
            del cache
    for t, m in models.items():
        nbytes = kv_cache_nbytes(m.args, m.ctx, t)
        print(f"{t:5s} depth {args.depth}: {best[t]:7.2f} tok/s  cache {nbytes / 1e6:8.1f} MB at ctx {m.ctx}")


if __name__ == "__main__":
    main()
