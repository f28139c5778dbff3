"""Where a run's resident memory goes, stage by stage (Linux only).

    python scripts/rss_stages.py FILE [FILE...] [-p 512] [-n 128] [--ops]

One fresh process per file (a stage's figures must not carry another file's pages), doing
what `qwen3cli bench FILE -p P -n N -r 1` does. For each stage: resident memory after it
(VmRSS, and its anonymous / file-backed split) and the peak during it (VmHWM, reset before
the stage through /proc/self/clear_refs). Stages: imports (numpy, numba, the kernels),
load+engine (map the file, start the tokenizer, repack the weights), tokenizer (waited for),
pp (warm-up and measured prefill), tg (the same for decode). Then the packed weights against
the file's tensor bytes per type. --ops adds, per backend call of the prefills, the most it
raised the RSS during the call and what it kept (which step makes the peak). tracemalloc is no use here: numpy's large buffers and
numba's are not traced reliably, and file pages are not allocations at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in KEYS:
            d[k] = int(v.split()[0]) / 1024
    return d
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
rows = []
def stage(name):
    s = status()
    rows.append({"stage": name, "rss": s["VmRSS"], "anon": s["RssAnon"], "file": s["RssFile"], "peak": s["VmHWM"]})
    reset_peak()
reset_peak()
path, p, n, want_ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
import numpy as np
stage("python+numpy")
import numba
from quant.kernels import matmul_cpu
stage("numba+kernels")
from qwen3cli.runtime.loading import open_engine
engine = open_engine(path, p + n + 1)  # bench's context for -p P -n N
loaded = engine.loaded
stage("load+engine")
loaded.tokenizer
stage("tokenizer")
from qwen3cli.runtime.bench import run_bench
m = engine.model
peaks = {}
if want_ops:  # the rise of the peak over each backend call, on the warm-up prefill
    ops = m.ops
    for name in ("embed", "rms_norm", "matmul", "attention", "residual", "ffn", "to_host", "mlp", "silu_mul"):
        f = getattr(ops, name)
        def wrap(*a, _f=f, _n=name, **k):
            before = status()["VmRSS"]
            reset_peak()
            r = _f(*a, **k)
            after = status()
            peaks[_n] = max(peaks.get(_n, (0, 0)), (after["VmHWM"] - before, after["VmRSS"] - before))
            return r
        setattr(ops, name, wrap)
run_bench(engine, p, 0, 1)
stage(f"pp{p} x2")
if n:
    run_bench(engine, 0, n, 1)
    stage(f"tg{n} x2")
from quant.qtensor import QTensor
from collections import defaultdict
file_b, packed_b = defaultdict(int), defaultdict(int)
g = loaded._keep
for t in g.tensors.values():
    file_b[t.type_name] += t.nbytes
def walk(x):
    if x is None or isinstance(x, np.ndarray):
        return [] if x is None else [("F32", x.nbytes)]
    return [(x.type.name, x.nbytes)]
w = m.w
items = [w.output, w.output_norm] + ([] if w.token_embd is w.output else [w.token_embd])
for ly in w.layers:
    items += [v for v in vars(ly).values()]
seen = set()
for it in items:
    if id(it) in seen or it is None or not hasattr(it, "nbytes"):
        continue
    seen.add(id(it))
    for tname, nb in walk(it):
        packed_b[tname] += nb
print(json.dumps({"rows": rows, "ops": peaks, "file": dict(file_b), "packed": dict(packed_b),
                  "hwm_total": max(r["peak"] for r in rows)}))
"""


def measure(path: str, p: int, n: int, ops: bool) -> dict:
    # --ops: large buffers straight from mmap, so a freed one leaves the RSS (glibc would keep
    # it in the heap) and a call's rise is what it needs, not what the heap lacked
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if ops else None
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(p), str(n), "1" if ops else "0"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"{path}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for f in a.files:
        d = measure(f, a.p, a.n, a.ops)
        if a.json:
            print(json.dumps({"file": f, **d}))
            continue
        print(f"\n{Path(f).name}: peak {d['hwm_total']:.0f} MB")
        print(f"{'stage':<16}{'rss':>8}{'anon':>8}{'file':>8}{'peak':>8}   (MB; peak = VmHWM during the stage)")
        for r in d["rows"]:
            print(f"{r['stage']:<16}{r['rss']:>8.0f}{r['anon']:>8.0f}{r['file']:>8.0f}{r['peak']:>8.0f}")
        for t in sorted(set(d["file"]) | set(d["packed"])):
            fb, pb = d["file"].get(t, 0) / 1e6, d["packed"].get(t, 0) / 1e6
            print(f"  {t:<6} file {fb:8.1f} MB  packed {pb:8.1f} MB" + (f"  ({pb / fb:.3f}x)" if fb else ""))
        if d["ops"]:
            print("  per call, MB above the RSS before it (peak during, kept after): " +
                  ", ".join(f"{k} {v[0]:.0f}/{v[1]:.0f}" for k, v in sorted(d["ops"].items(), key=lambda kv: -kv[1][0])))


if __name__ == "__main__":
    main()
