"""The CUDA backend against the CPU path on the same GGUF file: logit parity and tokens/s.

    python scripts/bench_gpu.py FILE.gguf [FILE2.gguf ...] [-p 128] [-n 64] [--reps 2] [--cache-type f16]

Per file: the last-token logits of a 32-token prompt and of 16 greedy decode steps on both
backends, each with a KV cache of --cache-type (max |difference| over the logit range,
argmax agreement), then prefill (-p tokens) and decode (-n tokens) speed of each, and the
ratio GPU / CPU. Random-weight files with the
real shapes come from `python scripts/bench_quantize.py --shapes 0.6b 1.7b --types q8_0`.
On a lent GPU machine (no network there) numba-cuda and its CUDA wheels travel in .whl; see
the device tool's README. Also run `QWEN3CLI_TEST_GPU=1 python -m pytest -q tests/test_cuda.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parity(cpu, gpu, vocab: int) -> tuple[float, float]:
    ids = [int(t) for t in np.random.default_rng(1).integers(0, vocab, 32)]
    cc, gc = cpu.new_cache(), gpu.new_cache()
    a, b = cpu.forward(ids, cc), gpu.forward(ids, gc)
    worst, agree = 0.0, []
    for _ in range(16):
        worst = max(worst, float(np.abs(a - b).max() / (a.max() - a.min())))
        agree.append(int(np.argmax(a)) == int(np.argmax(b)))
        tok = int(np.argmax(a))  # both follow the CPU's tokens
        a, b = cpu.forward([tok], cc), gpu.forward([tok], gc)
    return worst, float(np.mean(agree))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache-type", default=None, choices=("f32", "f16", "q8_0"), help="both backends' (default f16)")
    a = ap.parse_args()

    from qwen3cli.io.loader import load
    from qwen3cli.model.forward import Model
    from qwen3cli.runtime.bench import run_bench

    rows = []
    for f in a.files:
        loaded = load(f)
        ctx = a.p + a.n + 64
        t0 = time.perf_counter()
        gpu = Model(loaded.weights, ctx, backend="cuda", cache_type=a.cache_type)
        up = time.perf_counter() - t0
        cpu = Model(loaded.weights, ctx, cache_type=a.cache_type)
        worst, agree = parity(cpu, gpu, loaded.args.vocab_size)
        speed = {}
        for name, m in (("cpu", cpu), ("cuda", gpu)):
            res = run_bench(SimpleNamespace(model=m, args=loaded.args), a.p, a.n, a.reps)
            speed[name] = [r.mean for r in res]
        rows.append((Path(f).name, up, worst, agree, speed))
        print(f"{Path(f).name}: upload+compile {up:.1f} s, logits max|diff|/range {worst:.2e}, "
              f"argmax agreement {agree:.0%}; pp{a.p} cpu {speed['cpu'][0]:.1f} cuda {speed['cuda'][0]:.1f} tok/s, "
              f"tg{a.n} cpu {speed['cpu'][1]:.1f} cuda {speed['cuda'][1]:.1f} tok/s", flush=True)
    print(f"\n{'file':32} {'pp cpu':>8} {'pp gpu':>8} {'ratio':>7} {'tg cpu':>8} {'tg gpu':>8} {'ratio':>7}")
    for name, _, _, _, s in rows:
        (pc, tc), (pg, tg) = s["cpu"], s["cuda"]
        print(f"{name:32} {pc:8.1f} {pg:8.1f} {pg / pc:6.2f}x {tc:8.1f} {tg:8.1f} {tg / tc:6.2f}x")


if __name__ == "__main__":
    main()
