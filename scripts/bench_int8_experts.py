"""A/B of MoE decode: int8_experts_cpu.matmul_ids on the int8 stacks against today's float kernels
(matmul_cpu.pack + matmul_cpu.matmul_experts), Qwen3-30B-A3B's expert shapes, 8 slots, one token.

    python scripts/bench_int8_experts.py [--experts 128] [--rounds 5] [--formats q8_0 q4_0 q4_k q6_k]

Stacks: gate|up fused per expert (1536 x 2048) and down (2048 x 768), random file bytes (sane
fp16 scales). Each call routes the token to 8 distinct experts drawn afresh (the same draws for
both paths), so with 128 experts the weights come mostly from DRAM, as in decoding. Old and new
alternate call by call in one process; the figures are the fastest call and the median call.
GB/s counts the file bytes of the 8 experts touched (the same for both; new/old > 1: the int8
path is faster). x's preparation is timed with each path (quantized once, or permuted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's quant/, not an installed one

import numba  # noqa: E402
import numpy as np  # noqa: E402
from bench_int8 import cpu_names, random_raw  # noqa: E402  (scripts/ is on sys.path as the script's folder)
from gguf import GGMLQuantizationType as T  # noqa: E402

from quant.kernels import int8_cpu, int8_k_cpu, matmul_cpu  # noqa: E402
from quant.kernels.int8_experts_cpu import matmul_ids  # noqa: E402
from quant.qtensor import QTensor  # noqa: E402

SHAPES = {"gate|up": (1536, 2048), "down": (2048, 768)}  # rows, k of one expert
SLOTS = 8


def timings(old, new, draws: list[np.ndarray], rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per call of old and new, alternating call by call over the draws."""
    t = np.empty((2, rounds * len(draws)))
    n = 0
    for _ in range(rounds):
        for ids in draws:
            for i, fn in enumerate((old, new)):
                t0 = time.perf_counter()
                fn(ids)
                t[i, n] = time.perf_counter() - t0
            n += 1
    return t[0], t[1]


def bench(t: T, rows: int, k: int, n_experts: int, rounds: int, rng) -> str:
    w = random_raw(t, n_experts * rows, k, rng)
    w = QTensor("w", t, rows, k, w.raw, n_experts)
    old_w = matmul_cpu.pack(w)
    new_w = (int8_k_cpu if t in (T.Q4_K, T.Q6_K) else int8_cpu).pack(w)
    x = rng.standard_normal((1, k)).astype(np.float32)
    xi = np.zeros(SLOTS, np.int64)
    draws = [rng.choice(n_experts, SLOTS, replace=False).astype(np.int64) for _ in range(32)]

    def old(ids):
        return matmul_cpu.matmul_experts(x, old_w, ids, xi)

    def new(ids):
        return matmul_ids(x, new_w, ids, xi)

    a, b = old(draws[0]), new(draws[0])  # compiled, and a check that both compute the same product
    drift = np.linalg.norm(a - b) / np.linalg.norm(a)
    if drift > 0.02:
        raise SystemExit(f"{t.name} {rows}x{k}: int8 and float results differ by {drift:.3f}")
    to, tn = timings(old, new, draws, rounds)
    gb = SLOTS * w.raw.nbytes / n_experts / 1e9
    fast, med = (to.min(), tn.min()), (np.median(to), np.median(tn))
    return (f"{t.name:5s} {rows:>5}x{k:<5} old {fast[0] * 1e6:7.0f} us ({gb / fast[0]:5.1f} GB/s), median "
            f"{med[0] * 1e6:7.0f}   new {fast[1] * 1e6:7.0f} us ({gb / fast[1]:5.1f} GB/s), median "
            f"{med[1] * 1e6:7.0f}   new/old {fast[0] / fast[1]:4.2f} (median {med[0] / med[1]:4.2f})   "
            f"drift {drift:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_k", "q6_k"])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    a = ap.parse_args()
    print(cpu_names())
    numba.set_num_threads(a.threads)
    print(f"numba {numba.__version__}, {a.threads} thread(s), {a.experts} experts, {SLOTS} slots; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    for fmt in a.formats:
        for name, (rows, k) in SHAPES.items():
            print(f"{name:8s}", bench(T[fmt.upper()], rows, k, a.experts, a.rounds, rng), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
