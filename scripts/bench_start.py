"""Where start to first token goes (issue 14): CPU time (user, sys) and page faults per stage,
and what each numba cache load costs, for one GGUF file; resident memory after each stage.

    python scripts/bench_start.py FILE [--rounds 3] [--loads] [-p 512]

Stages, each in a fresh interpreter (as `qwen3cli run` starts): import (the CLI and the
kernels' modules, numba itself), load (header, tokenizer), engine (the repack into the
kernels' layouts, and numba's first cache load, which initialises its CPU target; the
tokenizer's parse runs beside it on a thread), prefill of the chat-templated "Hello" (or, with
-p N, of bench -p N's tokens in an N-token context: where bench's peak RSS is reached), one
decode step. RSS is split into anonymous memory and file pages (mapped weights, libraries).
Run it with NUMBA_NUM_THREADS=1 on a shared machine: the OpenMP workers spin at every parallel
region's barrier while the other core is taken, which counts as CPU time and can double it.
`--loads` lists every kernel loaded from numba's cache with its CPU time (numba.core.caching
is patched in the child only).
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
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
stages, last = [], None
mem = []
def status():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return {k: int(f[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM") if k in f}
def mark(name):
    global last
    if name:
        mem.append((name, status()))
    r = resource.getrusage(resource.RUSAGE_SELF)
    now = (r.ru_utime, r.ru_stime, r.ru_minflt, time.perf_counter())
    if last is not None:
        stages.append((name, *[a - b for a, b in zip(now, last)]))
    last = now
mark(None)
import numba.core.caching as caching
loads, orig = [], caching.Cache.load_overload
def timed(self, sig, target_context):
    c = time.process_time(); r = orig(self, sig, target_context)
    loads.append((self._name, time.process_time() - c, r is not None))
    return r
caching.Cache.load_overload = timed
import qwen3cli.cli, qwen3cli.runtime.generation  # noqa
from qwen3cli.runtime.engine import Engine
from qwen3cli.io.loader import load
mark("import")
loaded = load(sys.argv[1]); mark("load")
n = int(sys.argv[3])
e = Engine(loaded, n + 2 if n else None); mark("engine")
if n:  # bench -p n's prompt: pseudo-random ids
    import numpy as np
    ids = [int(t) for t in np.random.default_rng(0).integers(0, e.args.vocab_size, n)]
else:
    ids = e.prompt([{"role": "user", "content": "Hello"}]).ids
c = e.model.ops.new_cache(e.ctx)
e.model.forward(ids, c); mark("prefill")
e.model.forward([1], c); mark("decode")
print(json.dumps({"stages": stages, "loads": loads, "mem": mem}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loads", action="store_true", help="list each numba cache load")
    ap.add_argument("-p", "--prompt", type=int, default=0,
                    help="prefill this many pseudo-random tokens (bench -p's) in a context of that size, "
                         "not the templated Hello")
    a = ap.parse_args()
    runs = []
    for _ in range(a.rounds):
        out = subprocess.run([sys.executable, "-c", CHILD, a.file, str(ROOT), str(a.prompt)], capture_output=True, text=True,
                             check=True, env=os.environ)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{Path(a.file).name}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}, "
          f"{a.rounds} fresh processes: user / sys s, minor faults (k), wall s")
    for i, r in enumerate(runs):
        cols = [f"{n} {u:.2f}/{s:.2f} {f / 1000:.0f}k {w:.2f}" for n, u, s, f, w in r["stages"]]
        total = sum(u + s for _, u, s, _, _ in r["stages"])
        print(f"  run {i + 1}: " + "  ".join(cols) + f"  | cpu {total:.2f}")
    print("  memory after each stage (last run), MB: RSS (anon + file), peak so far")
    for name, m in runs[-1]["mem"]:
        print(f"    {name:8s} {m['VmRSS']:5d} ({m['RssAnon']} + {m['RssFile']}), peak {m['VmHWM']}")
    if a.loads:
        for name, t, hit in runs[-1]["loads"]:
            print(f"  {name:60s} {t * 1000:6.1f} ms{'' if hit else '  (miss: compiled)'}")


if __name__ == "__main__":
    main()
