"""Our engine against llama.cpp on the same files, same threads, runs alternating.

    python scripts/bench_vs_llamacpp.py [--shapes 0.6b 1.7b 30b-a3b] [--moe-layers 4]
        [--types q8_0 q4_0 q4_k_m q5_k_m q6_k] [--tests pp128/tg64 pp512/tg128] [--rounds 3]
        [--reps 3] [--threads 2] [--cache-type q8_0] [--depth 0 4096 16384] [--ctx 32768]
        [--no-first] [--install-llama-cpp]

Builds random BF16 checkpoints with the exact Qwen3 shapes in --workdir (once; 30b-a3b is
Qwen3-30B-A3B with only --moe-layers of its 48 layers) and quantizes them with `qwen3cli
quantize`, or, for the types it does not write, with llama.cpp's quantizer from our BF16 file.
Then, per file and round, alternately: `qwen3cli bench --json` and the same pp/tg test in
llama.cpp (llama-cpp-python, a separate process each time) for each --tests pair, and the start
to first token of both: the wall time of `qwen3cli run FILE "Hello" -n 1` and of a process
that imports llama_cpp, loads the file and evaluates the same chat prompt (both at --ctx 4096).
Prints the host CPU, tokens/s (the median of every timed run: --rounds processes of --reps runs
each, after one warm-up run per process, on both sides), our/llama.cpp ratios, peak RSS and the
first-token times (medians of the rounds). --cache-type goes to both (ours: --cache-type;
llama.cpp: type_k/type_v, with flash attention for a quantized cache, which llama.cpp needs for
the V cache). --depth D runs each test after D tokens of context, as llama-bench's -d (both
sides fill it once and cut back to it before every run); --ctx sets both engines' context, for
peak RSS at a long context.
llama-cpp-python is not a test requirement (it compiles llama.cpp, 15-20 minutes on 2 cores):
--install-llama-cpp pip-installs it when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quantize import SHAPES, write_checkpoint  # noqa: E402

FIRST_CTX = 4096
HELLO = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"

# argv: path threads cache_type ("" for the default) then the mode's own
LLAMA_COMMON = r"""
import json, resource, sys, time
t_start = time.perf_counter()
import numpy as np, llama_cpp
path, t, kv = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kw = {}
if kv:
    kw["type_k"] = kw["type_v"] = getattr(llama_cpp, "GGML_TYPE_" + kv.upper())
    kw["flash_attn"] = kv.lower() not in ("f32", "f16", "bf16")
def load(n_ctx):
    return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=t, n_threads_batch=t, n_batch=512, verbose=False, **kw)
def peak_mb():
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    return (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
"""

LLAMA_BENCH = LLAMA_COMMON + r"""
p, n, reps, d, n_ctx = (int(x) for x in sys.argv[4:9])
t0 = time.perf_counter()
llm = load(n_ctx or p + n + d + 8)
load_s = time.perf_counter() - t0
ids = [int(x) for x in np.random.default_rng(0).integers(0, 151936, d + max(p, 8))]
context, ids = ids[:d], ids[d:]
n_vocab = llm.n_vocab()
fill_s = None
if d:  # llama-bench's -d: the context filled once; eval() drops every cached token past n_tokens
    llm.reset(); t0 = time.perf_counter(); llm.eval(context); fill_s = time.perf_counter() - t0
def last_argmax():  # the logits of the last token evaluated (scores is not kept without logits_all)
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
pp, tg = [], []
# as `qwen3cli bench`: each test runs once as a warm-up, then reps timed times; every prefill, then every decode
for r in range(reps + 1 if p else 0):
    llm.n_tokens = d
    t0 = time.perf_counter(); llm.eval(ids[:p]); s = p / (time.perf_counter() - t0)
    if r:
        pp.append(s)
for r in range(reps + 1 if n else 0):
    llm.n_tokens = d; llm.eval(ids[:1])
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([last_argmax()])
    s = n / (time.perf_counter() - t0)
    if r:
        tg.append(s)
print(json.dumps({"pp": pp, "tg": tg, "load_s": load_s, "peak_rss_mb": peak_mb(),
                  **({"fill_s": fill_s} if d else {})}))
"""

LLAMA_FIRST = LLAMA_COMMON + r"""
llm = load(int(sys.argv[4]))
llm.eval(llm.tokenize(sys.argv[5].encode(), add_bos=False, special=True))
int(np.argmax(llm.scores[llm.n_tokens - 1]))
print(json.dumps({"in_process_s": time.perf_counter() - t_start, "peak_rss_mb": peak_mb()}))
"""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == -signal.SIGILL:  # seen with a native llama.cpp build on a VM that lists AMX but traps it
        sys.exit(f"{' '.join(cmd[:4])} ... died of an illegal instruction: its build uses one this CPU refuses "
                 "(AMX in some VMs: reinstall llama-cpp-python with CMAKE_ARGS=\"-DGGML_NATIVE=ON "
                 "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile "
                 "-mno-amx-int8 -mno-amx-bf16'\")")
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r


def ours(path: Path, p: int, n: int, t: int, kv: str | None, reps: int, d: int = 0, ctx: int = 0) -> dict:
    kv_flag = ["--cache-type", kv] if kv else []
    ctx_flag = ["--ctx", str(ctx)] if ctx else []
    r = _run([sys.executable, "-m", "qwen3cli", "bench", str(path), "-p", str(p), "-n", str(n), "-r", str(reps),
              "-d", str(d), "--threads", str(t), "--json", *kv_flag, *ctx_flag])
    return parse_ours(r.stdout)


def parse_ours(text: str) -> dict:
    """`qwen3cli bench --json` -> the llama side's shape: every timed run's tokens/s per kind (pp, tg)."""
    d = json.loads(text)
    runs: dict[str, list[float]] = {"pp": [], "tg": []}
    for x in d["results"]:
        runs[x["test"][:2]] += x["runs"]
    fills = d.get("fill_s") or {}  # seconds to fill the context to the depth (one depth per call here)
    return {**runs, "load_s": d["load_s"], "peak_rss_mb": d["peak_rss_mb"], **({"fill_s": max(fills.values())} if fills else {})}


def llama(path: Path, p: int, n: int, t: int, kv: str | None, reps: int, d: int = 0, ctx: int = 0) -> dict:
    r = _run([sys.executable, "-c", LLAMA_BENCH, str(path), str(t), kv or "", str(p), str(n), str(reps), str(d),
              str(ctx)])
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(results: list[dict], key: str) -> float:
    """The median over every round's value(s) of key (a list of timed runs, or one number); nan if none."""
    vals = [v for r in results if key in r for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return statistics.median(vals) if vals else float("nan")


def first_token(path: Path, t: int, kv: str | None, baseline: bool) -> dict:
    """Start to first token, wall time of a whole process, ours then llama.cpp's."""
    kv_flag = ["--cache-type", kv] if kv else []
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "qwen3cli", "run", str(path), "Hello", "-n", "1", "--ctx", str(FIRST_CTX),
          "--threads", str(t), *kv_flag])
    res = {"ours_s": time.perf_counter() - t0}
    if baseline:
        t0 = time.perf_counter()
        r = _run([sys.executable, "-c", LLAMA_FIRST, str(path), str(t), kv or "", str(FIRST_CTX), HELLO])
        res["llama_s"] = time.perf_counter() - t0
        res["llama_in_process_s"] = json.loads(r.stdout.strip().splitlines()[-1])["in_process_s"]
    return res


def our_types() -> set[str]:
    from quant.policy import FILE_TYPES

    return set(FILE_TYPES)


def make_file(src: Path, out: Path, t: str, baseline: bool) -> None:
    """Our quantize for the types it writes; others through llama.cpp's quantizer (from our BF16)."""
    if t in our_types():
        _run([sys.executable, "-m", "qwen3cli", "quantize", str(src), "-o", str(out), "--type", t])
        return
    if not baseline:
        sys.exit(f"{t}: made with llama.cpp's quantizer, which needs llama-cpp-python")
    bf16 = out.with_name(out.stem.rsplit("-", 1)[0] + "-bf16.gguf")
    if not bf16.exists():
        make_file(src, bf16, "bf16", baseline)
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t.upper()}", None)
    if ftype is None:
        sys.exit(f"{t}: neither qwen3cli nor llama.cpp's quantizer knows this type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
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


def host_cpu() -> str:
    name = "unknown CPU"
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # numba compiles for NUMBA_CPU_NAME where set (e.g. haswell, to stand in for an AVX2-only host):
    # a table made so must say so, not name the host's target
    target = os.environ.get("NUMBA_CPU_NAME")
    ours = f"; ours compiled for NUMBA_CPU_NAME={target}" if target else ""
    try:
        import llvmlite.binding as llvm

        return f"{name} (LLVM target: {llvm.get_host_cpu_name()}{ours})"
    except Exception:  # llvmlite is numba's; a broken install only loses the target name
        return name + (f" ({ours[2:]})" if ours else "")


def parse_test(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"pp(\d+)/tg(\d+)", s)
    if not m or int(m[1]) + int(m[2]) == 0:
        raise argparse.ArgumentTypeError(f"{s!r}: want ppN/tgM, e.g. pp128/tg64")
    return int(m[1]), int(m[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3bench"))
    ap.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b", "30b-a3b"], choices=list(SHAPES))
    ap.add_argument("--moe-layers", type=int, default=4, help="layers of the MoE shapes (Qwen3-30B-A3B has 48)")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"])
    ap.add_argument("--tests", nargs="+", type=parse_test, default=[(128, 64), (512, 128)], metavar="ppN/tgM")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each test per process, after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-type", help="KV cache type for both engines (e.g. q8_0); default: each one's own")
    ap.add_argument("--depth", nargs="+", type=int, default=[0], metavar="D",
                    help="tokens already in the context before each test (llama-bench's -d)")
    ap.add_argument("--ctx", type=int, default=0,
                    help="context both engines allocate (default: just what the test needs); peak RSS at long contexts")
    ap.add_argument("--no-first", action="store_true", help="skip the start-to-first-token runs")
    ap.add_argument("--install-llama-cpp", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="only write the checkpoints and files (for a later quiet run)")
    a = ap.parse_args()
    baseline = have_llama_cpp(a.install_llama_cpp)
    if not baseline:
        print("llama-cpp-python is not installed (--install-llama-cpp installs it): our numbers only")
    rows, firsts = [], []
    for shape in a.shapes:
        c = dict(SHAPES[shape])
        if "experts" in c:
            c["layers"] = min(a.moe_layers, c["layers"])
            shape = f"{shape}-{c['layers']}l"
        src = a.workdir / f"Qwen3-{shape.upper()}-random"
        if not (src / "model.safetensors").exists():
            write_checkpoint(src, c)
        for t in a.types:
            f = a.workdir / f"qwen3-{shape}-{t}.gguf"
            if not f.exists():
                make_file(src, f, t, baseline)
            if a.prepare:
                continue
            runs = {(p, n, d): {"ours": [], "llama.cpp": []} for d in a.depth for p, n in a.tests}
            first = []
            for _ in range(a.rounds):  # alternate, so drifts in machine load hit both alike
                for (p, n, d), r in runs.items():
                    r["ours"].append(ours(f, p, n, a.threads, a.cache_type, a.reps, d, a.ctx))
                    if baseline:
                        r["llama.cpp"].append(llama(f, p, n, a.threads, a.cache_type, a.reps, d, a.ctx))
                if not a.no_first:
                    first.append(first_token(f, a.threads, a.cache_type, baseline))
            rows += [(shape, t, p, n, d, r) for (p, n, d), r in runs.items()]
            if first:
                firsts.append((shape, t, first))
            print(f"done {shape} {t}", file=sys.stderr, flush=True)
    if not a.prepare:
        report(rows, firsts, a)


def report(rows, firsts, a) -> None:
    def ratio(x, y):
        return f"{x / y:>7.2f}x" if y == y and y else f"{'-':>8}"

    print(f"\nhost: {host_cpu()}")
    kv = f", KV cache {a.cache_type}" if a.cache_type else ""
    kv += f", ctx {a.ctx}" if a.ctx else ""
    print(f"{a.threads} threads{kv}, median of {a.rounds} alternating rounds x {a.reps} runs (tokens/s; "
          "ratio ours/llama.cpp, > 1 is faster)")
    print(f"{'model':<20}{'test':>19}{'ours pp':>9}{'llama pp':>10}{'ratio':>8}{'ours tg':>9}{'llama tg':>10}"
          f"{'ratio':>8}{'ours RSS':>10}{'llama RSS':>11}")
    for shape, t, p, n, d, r in rows:
        o, ll = r["ours"], r["llama.cpp"]
        test = f"pp{p}/tg{n}" + (f" @ d{d}" if d else "")
        if d:  # the fill is a prefill of d tokens from an empty context
            fill = f"   fill d{d}: {median(o, 'fill_s'):.1f} s / {median(ll, 'fill_s'):.1f} s"
        print(f"{shape + ' ' + t:<20}{test:>19}{median(o, 'pp'):>9.1f}{median(ll, 'pp'):>10.1f}"
              f"{ratio(median(o, 'pp'), median(ll, 'pp'))}{median(o, 'tg'):>9.1f}{median(ll, 'tg'):>10.1f}"
              f"{ratio(median(o, 'tg'), median(ll, 'tg'))}"
              f"{median(o, 'peak_rss_mb'):>7.0f} MB{median(ll, 'peak_rss_mb'):>8.0f} MB" + (fill if d else ""))
    if not firsts:
        return
    print(f"\nstart to first token (s, whole process, --ctx {FIRST_CTX}; ratio ours/llama.cpp, > 1 is slower; "
          "llama in-process: import + load + eval)")
    print(f"{'model':<20}{'ours':>8}{'llama':>8}{'ratio':>8}{'llama in-process':>18}")
    for shape, t, f in firsts:
        o, ll = median(f, "ours_s"), median(f, "llama_s")
        print(f"{shape + ' ' + t:<20}{o:>8.2f}{ll:>8.2f}{ratio(o, ll)}{median(f, 'llama_in_process_s'):>18.2f}")


if __name__ == "__main__":
    main()
