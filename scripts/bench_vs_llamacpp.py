"""Our engine against llama.cpp on the same files, same threads, runs alternating.

    python scripts/bench_vs_llamacpp.py [--shapes 0.6b 1.7b] [--types q8_0 q4_0 q4_k_m] [--rounds 3]
                                        [--threads 2] [-p 128] [-n 64] [--install-llama-cpp]

Builds random BF16 checkpoints with the exact Qwen3 shapes in --workdir (once) and quantizes
them with `qwen3cli quantize` (the K-quant presets we do not write yet with llama.cpp's
quantizer from our BF16 file). Then, per file, runs `qwen3cli bench --json` and the same pp/tg
tests in llama.cpp (llama-cpp-python, a separate process each time) alternately, --rounds
times, and prints tokens/s (mean of the rounds), our/llama.cpp ratios and peak RSS.
llama-cpp-python is not a test requirement (it compiles llama.cpp, 15-20 minutes on 2 cores):
--install-llama-cpp pip-installs it when missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quantize import SHAPES, write_checkpoint  # noqa: E402

LLAMA = r"""
import json, resource, sys, time
import numpy as np, llama_cpp
path, p, n, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=p + n + 8, n_threads=t, n_threads_batch=t, n_batch=512, verbose=False)
load = time.perf_counter() - t0
ids = [int(x) for x in np.random.default_rng(0).integers(0, 151936, p)]
llm.eval(ids[:8]); llm.reset()
t0 = time.perf_counter(); llm.eval(ids); pp = p / (time.perf_counter() - t0)
llm.reset(); llm.eval(ids[:1])
t0 = time.perf_counter()
for _ in range(n):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
tg = n / (time.perf_counter() - t0)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"pp": pp, "tg": tg, "load_s": load,
                  "peak_rss_mb": (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}))
"""


def ours(path: Path, p: int, n: int, t: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "bench", str(path), "-p", str(p), "-n", str(n), "-r", "1",
                        "--threads", str(t), "--json"], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    res = {x["test"][:2]: x["tokens_per_s"] for x in d["results"]}
    return {"pp": res["pp"], "tg": res["tg"], "load_s": d["load_s"], "peak_rss_mb": d["peak_rss_mb"]}


def llama(path: Path, p: int, n: int, t: int) -> dict:
    r = subprocess.run([sys.executable, "-c", LLAMA, str(path), str(p), str(n), str(t)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


LLAMA_FTYPES = {"q5_1": 9, "q3_k_m": 12, "q2_k": 10}  # types we do not write


def make_file(src: Path, out: Path, t: str, baseline: bool) -> None:
    """Our quantize for the types it writes; K-quants through llama.cpp's quantizer (from our BF16)."""
    if t not in LLAMA_FTYPES:
        subprocess.run([sys.executable, "-m", "qwen3cli", "quantize", str(src), "-o", str(out), "-t", t],
                       check=True, capture_output=True)
        return
    if not baseline:
        sys.exit(f"{t}: made with llama.cpp's quantizer, which needs llama-cpp-python")
    bf16 = out.with_name(out.stem.rsplit("-", 1)[0] + "-bf16.gguf")
    if not bf16.exists():
        make_file(src, bf16, "bf16", baseline)
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[t]
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {bf16} to {t}")


def have_llama_cpp(install: bool) -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        if not install:
            return False
    print("installing llama-cpp-python (compiles llama.cpp; 15-20 minutes on 2 cores)...", flush=True)
    return subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"]).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3bench"))
    ap.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b"], choices=list(SHAPES))
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--install-llama-cpp", action="store_true")
    a = ap.parse_args()
    baseline = have_llama_cpp(a.install_llama_cpp)
    if not baseline:
        print("llama-cpp-python is not installed (--install-llama-cpp installs it): our numbers only")
    rows = []
    for shape in a.shapes:
        src = a.workdir / f"Qwen3-{shape.upper()}-random"
        if not (src / "model.safetensors").exists():
            write_checkpoint(src, SHAPES[shape])
        for t in a.types:
            f = a.workdir / f"qwen3-{shape}-{t}.gguf"
            if not f.exists():
                make_file(src, f, t, baseline)
            runs = {"ours": [], "llama.cpp": []}
            for _ in range(a.rounds):  # alternate, so drifts in machine load hit both alike
                runs["ours"].append(ours(f, a.p, a.n, a.threads))
                if baseline:
                    runs["llama.cpp"].append(llama(f, a.p, a.n, a.threads))
            rows.append((shape, t, runs))
            print(f"done {shape} {t}", file=sys.stderr, flush=True)

    def mean(rs, k):
        return statistics.fmean(r[k] for r in rs) if rs else float("nan")

    print(f"\n{a.threads} threads, pp{a.p} / tg{a.n}, mean of {a.rounds} alternating rounds (tokens/s)")
    print(f"{'model':<14}{'ours pp':>10}{'llama pp':>10}{'ratio':>8}{'ours tg':>10}{'llama tg':>10}{'ratio':>8}"
          f"{'ours RSS':>10}{'llama RSS':>11}")
    for shape, t, r in rows:
        o, ll = r["ours"], r["llama.cpp"]
        print(f"{shape + ' ' + t:<14}{mean(o, 'pp'):>10.1f}{mean(ll, 'pp'):>10.1f}{mean(o, 'pp') / mean(ll, 'pp'):>7.2f}x"
              f"{mean(o, 'tg'):>10.1f}{mean(ll, 'tg'):>10.1f}{mean(o, 'tg') / mean(ll, 'tg'):>7.2f}x"
              f"{mean(o, 'peak_rss_mb'):>8.0f} MB{mean(ll, 'peak_rss_mb'):>8.0f} MB")


if __name__ == "__main__":
    main()
