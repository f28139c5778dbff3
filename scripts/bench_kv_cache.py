"""Decode tokens/s with the KV cache already `--depth` positions deep, per cache type.

The cache is filled with random keys and values (no prefill to wait for): a decode step's
attention then reads `depth` rows of every layer and head, which is what the cache type
changes. Prints one line per type: tok/s, the cache's bytes at this context.

    python scripts/bench_kv_cache.py FILE.gguf --depth 4096 -n 16 --types f32 f16 q8_0

--attention times decode attention alone (attention_cpu.attend_rows, one layer, one row, no
model file): milliseconds per layer per cache type, at each depth and thread count, medians of
rounds that alternate the types so that other load on the machine hurts them alike.

    python scripts/bench_kv_cache.py --attention --depths 512 4096 16384 --threads 1 2 --heads 16 8 128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qwen3cli.io.loader import load
from qwen3cli.model.forward import Model, kv_cache_nbytes
from qwen3cli.model.kv_cache import KVCache
from qwen3cli.model.rope import Rope


def fill(cache, depth: int, rng) -> None:
    L, H, _, D = cache.k.shape
    for li in range(L):
        k = rng.standard_normal((H, depth, D), dtype=np.float32)
        cache.write(li, 0, k, k)
    cache.n = depth


def attention_args(cache_type: str, depth: int, Hq: int, Hkv: int, D: int, seed: int = 0) -> tuple:
    """attend_rows' arguments for one row at position `depth` of a one-layer cache holding
    `depth` random keys and values before it."""
    rng = np.random.default_rng(seed)
    qn, kn = (rng.uniform(0.5, 1.5, D).astype(np.float32) for _ in range(2))
    cache = KVCache.pooled(1, 1, Hkv, depth + 1, D, cache_type)[0]
    keys = (rng.standard_normal((Hkv, depth, D)) * rng.uniform(0.1, 4, (1, depth, 1))).astype(np.float32)
    cache.write(0, 0, keys, rng.standard_normal((Hkv, depth, D)).astype(np.float32))
    q, k, v = (rng.standard_normal((1, H * D)).astype(np.float32) * 2 for H in (Hq, Hkv, Hkv))
    cos, sin = Rope(1.0 / (10000.0 ** (np.arange(0, D, 2) / D)), 1.0).cos_sin(np.arange(depth, depth + 1))
    out = np.empty((1, Hq * D), np.float32)
    return (q, k, v, qn, kn, np.float32(1e-6), cos, sin, *cache.pool, 0, np.full(1, cache.slot, np.int64),
            np.full(1, depth, np.int64), out)


def bench_attention(args) -> None:
    import numba

    from quant.kernels.attention_cpu import attend_rows

    Hq, Hkv, D = args.heads
    for depth in args.depths:
        calls = {t: attention_args(t, depth, Hq, Hkv, D) for t in args.types}
        reps = max(3, 40000 // depth)
        for nt in args.threads:
            numba.set_num_threads(nt)
            got = {t: [] for t in args.types}
            for t, a in calls.items():
                attend_rows(*a)  # compile / warm
            for _ in range(args.rounds):
                for t, a in calls.items():
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        attend_rows(*a)
                    got[t].append((time.perf_counter() - t0) / reps)
            print(f"depth {depth:6d} threads {nt}: "
                  + "  ".join(f"{t} {np.median(v) * 1e3:7.3f} ms" for t, v in got.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--attention", action="store_true", help="time decode attention alone, per layer (no file)")
    ap.add_argument("--depths", type=int, nargs="+", default=[512, 4096, 16384], help="with --attention")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="with --attention")
    ap.add_argument("--heads", type=int, nargs=3, default=[16, 8, 128], metavar=("HQ", "HKV", "D"),
                    help="with --attention: query heads, KV heads, head dim (default: Qwen3 0.6B's)")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("-n", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, help="default 2, with --attention 5")
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    if args.attention:
        args.rounds = args.rounds or 5
        bench_attention(args)
        return
    if not args.file:
        ap.error("a GGUF file, or --attention")
    args.rounds = args.rounds or 2
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
