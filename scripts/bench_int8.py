"""A/B of the int8-activation decode kernels (quant/kernels/int8_cpu.py, int8_k_cpu.py,
int8_q5_cpu.py) against today's float kernels (matmul_cpu.matmul on its packed layout; for
Q5_K / Q5_0 that is int8 with a float32 scale and offset per 32), one row of x, Qwen3-0.6B and
1.7B shapes.

    python scripts/bench_int8.py [--rounds 7] [--formats q8_0 q4_0 q4_k q6_k q5_k q5_0] [--asm]
    python scripts/bench_int8.py --formats q5_k --shapes 0.6B --threads 2

Both paths are timed as a model calls them (x's preparation included: the int8 path quantizes
x, the 4-bit float path permutes it), in one process, old and new alternating call by call,
2 threads then 1; each figure is the fastest call of all rounds. Weights are cycled through
enough copies to exceed the L3 (about 96 MB of file bytes per shape), so they come from DRAM
as in decoding. GB/s
counts the file's bytes of the matrix (the same for both; new/old > 1: the int8 path is
faster). --asm prints the widening multiply-adds in the new kernels of --formats (compiled
afresh: numba does not disassemble cached code).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--asm" in sys.argv:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_int8_")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from llvmlite import binding as llvm  # noqa: E402

from quant.formats import FORMATS  # noqa: E402
from quant.kernels import int8_cpu, int8_k_cpu, int8_q5_cpu, matmul_cpu  # noqa: E402
from quant.qtensor import QTensor  # noqa: E402

SHAPES = {"0.6B": [(1024, 1024), (3072, 1024), (1024, 3072), (151936, 1024)],
          "1.7B": [(2048, 2048), (6144, 2048), (2048, 6144)]}
COLD_BYTES = 96 << 20
HALVES = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208], T.Q5_K: [0, 2], T.Q5_0: [0]}  # fp16 scales
MODULES = {T.Q8_0: int8_cpu, T.Q4_0: int8_cpu, T.Q4_K: int8_k_cpu, T.Q6_K: int8_k_cpu,
           T.Q5_K: int8_q5_cpu, T.Q5_0: int8_q5_cpu}
KERNELS = {T.Q8_0: "_mv_q8_0", T.Q4_0: "_mv_q4_0", T.Q4_K: "_mv_q4_k", T.Q6_K: "_mv_q6_k",
           T.Q5_K: "_mv_q5_k", T.Q5_0: "_mv_q5_0"}
INSNS = ("vpdpbusd", "vpdpwssd", "vpmaddubsw", "vpmaddwd", "vpmovsxbw", "vpmovzxbw", "vcvtph2ps",
         "vgf2p8affineqb", "vpternlogq", "vpternlogd", "vpmulld")


def cpu_names() -> str:
    model = "?"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model} | numba/LLVM CPU name: {llvm.get_host_cpu_name()} | cores: {os.cpu_count()}"


def random_raw(t: T, rows: int, k: int, rng) -> QTensor:
    """File bytes with every quant value and sane fp16 scales (quantizing 150M floats is slow)."""
    f = FORMATS[t]
    raw = rng.integers(0, 256, (rows, k // f.block_size, f.type_size), dtype=np.uint8)
    for o in HALVES[t]:
        h = (rng.standard_normal((rows, k // f.block_size, 1)) * 0.01).astype(np.float16)
        raw[:, :, o:o + 2] = h.view(np.uint8)
    return QTensor("w", t, rows, k, raw.reshape(rows, -1))


def best_pair(old, new, n_copies: int, rounds: int) -> tuple[float, float]:
    """Fastest single call of old and of new, alternating call by call: on shared cores a call
    that lost its core to another process takes a scheduler quantum (4-8 ms), a batch mean
    would carry that, the minimum does not."""
    calls = max(4, n_copies)
    best = [np.inf, np.inf]
    for _ in range(rounds):
        for c in range(calls):
            for i, fn in enumerate((old, new)):
                t0 = time.perf_counter()
                fn(c % n_copies)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def bench(t: T, rows: int, k: int, threads: int, rounds: int, rng) -> str:
    w = random_raw(t, rows, k, rng)
    n = max(1, min(64, COLD_BYTES // w.nbytes))
    raws = [w.raw] + [w.raw.copy() for _ in range(n - 1)]
    ws = [QTensor("w", t, rows, k, r) for r in raws]
    mod = MODULES[t]
    olds = [matmul_cpu.pack(q) for q in ws]
    news = [mod.pack(q) for q in ws]
    x = rng.standard_normal(k).astype(np.float32)
    x2, o1, o2 = x[None], np.empty((1, rows), np.float32), np.empty(rows, np.float32)
    numba.set_num_threads(threads)
    old, new = best_pair(lambda i: matmul_cpu.matmul(x2, olds[i], o1), lambda i: mod.matvec(x, news[i], o2), n, 1)
    old, new = best_pair(lambda i: matmul_cpu.matmul(x2, olds[i], o1), lambda i: mod.matvec(x, news[i], o2), n, rounds)
    gb = w.nbytes / 1e9
    return (f"{t.name:5s} {rows:>6}x{k:<5} thr {threads}  old {old * 1e6:8.1f} us {gb / old:6.1f} GB/s   "
            f"new {new * 1e6:8.1f} us {gb / new:6.1f} GB/s   new/old {old / new:5.2f}   ({n} copies)")


def asm_counts(formats: list[T]) -> None:
    x = np.ones(1024, np.float32)
    for t in formats:
        mod = MODULES[t]
        fn = getattr(mod, KERNELS[t])
        mod.matvec(x, mod.pack(QTensor.from_f32("w", np.ones((4, 1024), np.float32), t)))
        text = "\n".join(fn.inspect_asm().values())
        counts = {i: sum(ln.split()[0] == i for ln in text.splitlines() if ln.strip()) for i in INSNS}
        print(f"asm {fn.py_func.__name__}: " + ", ".join(f"{i} x{c}" for i, c in counts.items() if c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_k", "q6_k", "q5_k", "q5_0"])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--asm", action="store_true")
    a = ap.parse_args()
    print(cpu_names())
    print(f"numba {numba.__version__}, numpy {np.__version__}; load average at start {os.getloadavg()[0]:.2f}")
    if a.asm:
        asm_counts([T[f.upper()] for f in a.formats])
    rng = np.random.default_rng(0)
    for threads in a.threads:
        for model in a.shapes:
            shapes = SHAPES[model]
            print(f"-- Qwen3-{model} shapes, {threads} thread(s)")
            for fmt in a.formats:
                for rows, k in shapes:
                    print(bench(T[fmt.upper()], rows, k, threads, a.rounds, rng), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
