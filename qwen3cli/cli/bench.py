"""`qwen3cli bench MODEL`: prefill and decode tokens/s, load time and peak memory."""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table
from rich.text import Text

from .base import UsageError, app, out, printable, user_errors
from .load import open_engine
from .options import Cache, Device, Exact, Model, Quant, Threads, cache_value, set_threads


@app.command()
@user_errors
def bench(
    model: Model,
    prompt: str = typer.Option("128", "-p", "--prompt", metavar="N[,N...]",
                               help="Prompt tokens for the prefill test; a list sweeps, as llama-bench (0: skip)."),
    gen: str = typer.Option("64", "-n", "--gen", metavar="N[,N...]", help="Tokens for the decode test (0: skip)."),
    reps: int = typer.Option(3, "-r", "--reps", help="Repetitions of each test (after one warm-up)."),
    depth: str = typer.Option("0", "-d", "--depth", metavar="N[,N...]",
                              help="Tokens already in the context when each test starts (llama-bench's -d)."),
    threads: Threads = None,
    ctx: int = typer.Option(None, "--ctx", "--ctx-size", "-c", help="Context the KV cache is made for (default: what the tests use)."),
    quant: Quant = "q8_0",
    device: Device = "auto",
    exact: Exact = False,
    cache: Cache = None,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure prefill and decode speed, like llama-bench."""
    import numba

    from ..runtime.bench import Context, peak_rss_mb, run_bench

    ps, ns, ds = _counts(prompt, "-p"), _counts(gen, "-n"), _counts(depth, "-d")
    if reps < 1 or not any(ps + ns):
        raise UsageError("-p, -n and -d must be >= 0 (-p and -n not all 0) and -r >= 1")
    need = max(ds) + max(max(ps), 1) + max(ns) + 1
    if ctx is not None and ctx < need:
        raise UsageError(f"--ctx must be at least {need} for -d {depth} -p {prompt} -n {gen}, got {ctx}")
    set_threads(threads)
    t0 = time.perf_counter()
    engine = open_engine(model, ctx or need, quant, device, exact, cache_type=cache_value(cache))
    load_s = time.perf_counter() - t0
    results, depths, fills = [], [], {}
    for d in ds:  # llama-bench's order: every prefill test, then every decode test, per depth
        context = Context(d)  # filled once for this depth's tests, then let go
        for p in (p for p in ps if p):
            results += run_bench(engine, p, 0, reps, d, context)
            depths.append(d)
        for n in (n for n in ns if n):
            results += run_bench(engine, 0, n, reps, d, context)
            depths.append(d)
        if d:
            fills[d] = context.fill_s
    info = {"model": engine.loaded.name, "source": engine.loaded.source, "device": engine.model.device,
            "ctx": engine.ctx, "depth": ds[0] if len(ds) == 1 else ds, "cache_type": engine.model.cache_type,
            "threads": numba.get_num_threads(),
            "load_s": round(load_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "weights_mb": round(engine.model.w.nbytes / 1e6, 1), "params": _params(engine), "exact": exact,
            "fill_s": {str(d): round(s, 3) for d, s in fills.items()}}
    if as_json:
        out.print_json(json.dumps({**info, "results": [
            {"test": r.test, "tokens": r.tokens, "depth": d, "tokens_per_s": round(r.mean, 2), "std": round(r.std, 2),
             "runs": [round(x, 2) for x in r.runs]} for r, d in zip(results, depths)]}))
        return
    where = "CUDA" if info["device"] == "cuda" else "CPU"
    filled = "".join(f" · {d} tokens of context in {s:.1f} s" for d, s in fills.items())
    out.print(f"KV cache {info['cache_type']} · load {load_s:.2f} s · peak RSS {info['peak_rss_mb']:.0f} MB{filled}",
              highlight=False, markup=False)
    t = Table()  # llama-bench's columns
    for c in ("model", "size", "params", "backend", "threads", "test", "t/s"):
        t.add_column(c, justify="left" if c in ("model", "backend") else "right")
    for r in results:
        t.add_row(Text(printable(info["model"])), f"{info['weights_mb'] / 1024:.2f} GiB" if info["weights_mb"] >= 1024
                  else f"{info['weights_mb']:.0f} MiB", _label(info["params"]), where,
                  str(info["threads"]) if where == "CPU" else "-", r.test, f"{r.mean:.2f} ± {r.std:.2f}")
    out.print(t)


def _counts(text: str, flag: str) -> list[int]:
    """'128,512' -> [128, 512]: llama-bench's comma lists."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{flag} takes whole numbers >= 0, comma-separated (e.g. 128,512), got {text!r}")
    return values


def _params(engine) -> int:
    import math

    from ..model.weights import expected_shapes

    tied = engine.args.tie_word_embeddings
    return sum(math.prod(s) for n, s in expected_shapes(engine.args).items() if n != "output.weight" or not tied)


def _label(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
