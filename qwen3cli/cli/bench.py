"""`qwen3cli bench MODEL`: prefill and decode tokens/s, load time and peak memory."""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table

from .base import UsageError, app, out, printable, user_errors
from .load import open_engine
from .options import Cache, Device, Exact, Model, Quant, Threads, cache_value, set_threads


@app.command()
@user_errors
def bench(
    model: Model,
    prompt: int = typer.Option(128, "-p", "--prompt", help="Prompt tokens for the prefill test (0: skip)."),
    gen: int = typer.Option(64, "-n", "--gen", help="Tokens for the decode test (0: skip)."),
    reps: int = typer.Option(3, "-r", "--reps", help="Repetitions of each test (after one warm-up)."),
    depth: int = typer.Option(0, "-d", "--depth", help="Tokens already in the context when each test starts "
                                                      "(llama-bench's -d)."),
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

    from ..bench import peak_rss_mb, run_bench

    if prompt < 0 or gen < 0 or reps < 1 or prompt + gen == 0 or depth < 0:
        raise UsageError("-p, -n and -d must be >= 0 (-p and -n not both 0) and -r >= 1")
    need = depth + max(prompt, 1) + gen + 1
    if ctx is not None and ctx < need:
        raise UsageError(f"--ctx must be at least {need} for -d {depth} -p {prompt} -n {gen}, got {ctx}")
    set_threads(threads)
    t0 = time.perf_counter()
    engine = open_engine(model, ctx or need, quant, device, exact, cache_type=cache_value(cache))
    load_s = time.perf_counter() - t0
    results = run_bench(engine, prompt, gen, reps, depth)
    info = {"model": engine.loaded.name, "source": engine.loaded.source, "device": engine.model.device,
            "ctx": engine.ctx, "depth": depth, "cache_type": engine.model.cache_type,
            "threads": numba.get_num_threads(),
            "load_s": round(load_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "weights_mb": round(engine.model.w.nbytes / 1e6, 1), "exact": exact}
    if as_json:
        out.print_json(json.dumps({**info, "results": [
            {"test": r.test, "tokens": r.tokens, "tokens_per_s": round(r.mean, 2), "std": round(r.std, 2),
             "runs": [round(x, 2) for x in r.runs]} for r in results]}))
        return
    where = "GPU" if info["device"] == "cuda" else f"{info['threads']} threads"
    out.print(f"{printable(info['model'])} · {where} · weights {info['weights_mb']:.0f} MB · "
              f"KV cache {info['cache_type']} · load {load_s:.2f} s · peak RSS {info['peak_rss_mb']:.0f} MB", highlight=False, markup=False)
    t = Table()
    for c in ("test", "tokens/s", "±"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(r.test, f"{r.mean:.2f}", f"{r.std:.2f}")
    out.print(t)
