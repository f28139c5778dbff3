"""Prefill products: the int8 GEMM (quant/kernels/int8_gemm_cpu.py, over int8_cpu's /
int8_k_cpu's / int8_q5_cpu's layouts) against today's float path (matmul_cpu.pack + matmul_cpu.matmul, which
dequantizes tiles of W into single-threaded BLAS on each prefill thread, as the engine runs it),
on Qwen3-0.6B's fused shapes.

    python scripts/bench_int8_gemm.py [--rounds 3] [--n 128 512] [--threads 2] [--formats q8_0 q4_0 q4_k q6_k q5_k q5_0] [--asm] [--vnni]

Both are timed as a model calls them (the int8 path quantizes x inside), old and new
alternating call by call; each figure is the fastest call (shared cores: a call that lost its
core carries a scheduler quantum, the minimum does not). With --threads 1 the clock is the
thread's CPU time (steady on a loaded machine; both paths run on the calling thread then).
GOPS = 2 n rows k / s for both.
--asm counts the instructions of each GEMM kernel's innermost loop (compiled afresh: numba
does not disassemble cached code). --vnni times the int8 GEMM's generic tiles (vpmaddubsw) as
"old" against its AVX512-VNNI ones (vpdpbusd) instead of the float path; with --asm it counts
the VNNI kernels' loop.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
if "--asm" in sys.argv:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_int8_gemm_")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from bench_int8 import cpu_names, random_raw  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from quant.kernels import int8_cpu, int8_gemm_cpu, int8_k_cpu, int8_q5_cpu, matmul_cpu  # noqa: E402

# Qwen3-0.6B: q|k|v fused, o, gate|up fused, down (rows, k)
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
KERNELS = {T.Q8_0: "_mm_q8_0", T.Q4_0: "_mm_q4_0", T.Q4_K: "_mm_q4_k", T.Q6_K: "_mm_q6_k",
           T.Q5_K: "_mm_q4_k", T.Q5_0: "_mm_q5_0"}  # Q5_K: Q4_K's kernel, its fifth-bit unpack


def pack(w):
    """w in its int8 layout."""
    t = w.type
    return (int8_k_cpu if t in (T.Q4_K, T.Q6_K) else int8_q5_cpu if t in (T.Q5_K, T.Q5_0) else int8_cpu).pack(w)


def best_pair(old, new, rounds: int) -> tuple[float, float]:
    # one thread: this thread's CPU time (both paths then run on it), which a process that
    # takes the core away does not inflate; more threads: wall time
    clock = time.thread_time if numba.get_num_threads() == 1 else time.perf_counter
    best = [np.inf, np.inf]
    for _ in range(rounds):
        for i, fn in enumerate((old, new)):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best[0], best[1]


def bench(t: T, rows: int, k: int, n: int, rounds: int, rng, vnni: bool = False) -> tuple[float, str]:
    w = random_raw(t, rows, k, rng)
    new_w = pack(w)
    x = rng.standard_normal((n, k)).astype(np.float32)
    o1, o2 = np.empty((n, rows), np.float32), np.empty((n, rows), np.float32)
    if vnni:
        names = ("generic", "vnni", "vnni/generic")
        old_fn = lambda: int8_gemm_cpu.matmul(x, new_w, o1, vnni=False)  # noqa: E731
        new_fn = lambda: int8_gemm_cpu.matmul(x, new_w, o2, vnni=True)  # noqa: E731
    else:
        names = ("float", "int8", "int8/float")
        old_w = matmul_cpu.pack(w)
        old_fn = lambda: matmul_cpu.matmul(x, old_w, o1)  # noqa: E731
        new_fn = lambda: int8_gemm_cpu.matmul(x, new_w, o2)  # noqa: E731
    best_pair(old_fn, new_fn, 1)
    old, new = best_pair(old_fn, new_fn, rounds)
    ops = 2 * n * rows * k / 1e9
    return old / new, (f"{t.name:5s} {rows:>5}x{k:<5} n {n:4d}  {names[0]} {old * 1e3:7.2f} ms {ops / old:6.1f} GOPS   "
                       f"{names[1]} {new * 1e3:7.2f} ms {ops / new:6.1f} GOPS   {names[2]} speed {old / new:5.2f}x")


def inner_loop_counts(t: T, vnni: bool) -> Counter:
    """Instruction mnemonics of the kernel's innermost loop: the basic block that jumps back
    to its own label, with the most vpdpwssd / vpmaddwd / vpmaddubsw."""
    k = 1024
    w = random_raw(t, 4, k, np.random.default_rng(0))
    p = pack(w)
    int8_gemm_cpu.matmul(np.ones((4, k), np.float32), p, np.empty((4, 4), np.float32), vnni=vnni)
    fn = getattr(int8_gemm_cpu, KERNELS[t])
    best = Counter()
    for text in fn.inspect_asm().values():
        for m in re.finditer(r"^(\.?LBB\w+):.*?\n(.*?)(?=^\.?LBB\w+:|\Z)", text, re.S | re.M):
            lines = [ln.split() for ln in m.group(2).splitlines()
                     if ln.startswith("\t") and not ln.strip().startswith(".")]
            back = [j for j, ln in enumerate(lines) if ln and ln[0].startswith("j") and ln[-1] == m.group(1)]
            if not back:
                continue
            c = Counter(ln[0] for ln in lines[:back[0] + 1] if ln)
            key = lambda c: c["vpmaddubsw"] + c["vpdpwssd"] + c["vpmaddwd"] + c["vpdpbusd"]  # noqa: E731
            if key(c) > key(best):
                best = c
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_k", "q6_k", "q5_k", "q5_0"])
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's, as the engine)")
    ap.add_argument("--asm", action="store_true")
    ap.add_argument("--vnni", action="store_true", help="generic tiles against VNNI ones (not float against int8)")
    a = ap.parse_args()
    if a.threads:
        numba.set_num_threads(a.threads)  # prefill's BLAS threads follow it (threads.parts)
    print(cpu_names())
    print(f"numba {numba.__version__} threads {numba.get_num_threads()}, numpy {np.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    for fmt in a.formats:
        t = T[fmt.upper()]
        if a.asm:
            c = inner_loop_counts(t, a.vnni)
            print(f"asm {t.name} hot loop ({sum(c.values())} instructions): "
                  + ", ".join(f"{m} x{v}" for m, v in c.most_common(14)))
            continue
        ratios = []
        for n in a.n:
            for rows, k in SHAPES:
                r, line = bench(t, rows, k, n, a.rounds, rng, a.vnni)
                ratios.append(r)
                print(line, flush=True)
        what = "vnni/generic" if a.vnni else "int8/float"
        print(f"{t.name}: geometric mean {what} speed {np.exp(np.mean(np.log(ratios))):.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
