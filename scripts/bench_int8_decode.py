"""Decode speed with QWEN3CLI_INT8=1 (int8 activations) against without, runs alternating.

    python scripts/bench_int8_decode.py [--types q8_0 q4_0 q4_k_m] [--rounds 3] [-n 32]
                                        [--workdir /tmp/qwen3bench]

Builds a random Qwen3-0.6B-shaped BF16 checkpoint in --workdir (once) and quantizes it with
`qwen3cli quantize`; then per file runs `qwen3cli bench FILE -p 0 -n N -r 3 --json` with the
flag off and on, alternately, --rounds times (a separate process each: the flag is read at
import), and prints decode tokens/s (mean of the rounds) and the on/off ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quantize import SHAPES, write_checkpoint  # noqa: E402


def tg(path: Path, n: int, int8: bool) -> float:
    env = dict(os.environ, QWEN3CLI_INT8="1" if int8 else "0")
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "bench", str(path), "-p", "0", "-n", str(n), "-r", "3",
                        "--json"], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return next(x["tokens_per_s"] for x in json.loads(r.stdout)["results"] if x["test"].startswith("tg"))


def cpu() -> str:
    import numba
    from llvmlite import binding

    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                 platform.processor())
    return f"{model}; numba/LLVM CPU: {numba.config.CPU_NAME or binding.get_host_cpu_name()}; {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3bench"))
    ap.add_argument("--build-only", action="store_true", help="Make the files, measure nothing.")
    a = ap.parse_args()
    src = a.workdir / "Qwen3-0.6B-random"
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, SHAPES["0.6b"])
    files = {t: a.workdir / f"qwen3-0.6b-{t}.gguf" for t in a.types}
    for t, f in files.items():
        if not f.exists():
            subprocess.run([sys.executable, "-m", "qwen3cli", "quantize", str(src), "-o", str(f), "-t", t],
                           check=True, capture_output=True, cwd=ROOT)
    if a.build_only:
        return
    print(cpu())
    for t, f in files.items():
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for on in (False, True):
                runs[on].append(tg(f, a.n, on))
        off, on = statistics.mean(runs[False]), statistics.mean(runs[True])
        print(f"{t:7s} tg{a.n}  float {off:6.2f} tok/s  int8 {on:6.2f} tok/s  int8/float {on / off:.2f}"
              f"  (rounds: {' '.join(f'{x:.1f}' for x in runs[False])} | {' '.join(f'{x:.1f}' for x in runs[True])})",
              flush=True)


if __name__ == "__main__":
    main()
