"""Prefill and decode speed of a loaded engine, like llama-bench's pp / tg tests.

Prompt tokens are fixed pseudo-random ids (the speed does not depend on them); decode feeds
back the argmax so the work is that of real generation. Each test runs `reps` times after one
warm-up; results carry the mean and standard deviation of tokens/s.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine


@dataclass
class BenchResult:
    test: str  # "pp128" / "tg64"
    tokens: int
    runs: list[float] = field(default_factory=list)  # tokens/s of each repetition

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs) if self.runs else 0.0

    @property
    def std(self) -> float:
        return statistics.stdev(self.runs) if len(self.runs) > 1 else 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, since ru_maxrss survives exec and
    would report a big parent's peak for a process it started."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 20) if sys.platform == "darwin" else kb / 1024


@dataclass
class Context:
    """A context filled to `depth` tokens, kept between run_bench calls at that depth, and how
    long the fill took (a prefill of `depth` tokens from empty: the long-prompt figure)."""
    depth: int = 0
    cache: object = None
    fill_s: float = 0.0


def run_bench(engine: Engine, prompt: int = 128, gen: int = 64, reps: int = 3, depth: int = 0,
              context: Context | None = None) -> list[BenchResult]:
    """pp / tg tests; with depth, both run after `depth` tokens already in the cache (llama-bench's
    -d): the context is filled once and cut back to it before every run. Pass the same `context`
    to the calls at one depth to fill it once for all of them."""
    m = engine.model
    m.settle()  # a first run's packed-cache write would share the cores with the timed runs
    ids = [int(t) for t in np.random.default_rng(0).integers(0, engine.args.vocab_size, max(prompt, 1) + depth)]
    ids, head = ids[depth:], ids[:depth]
    at = f" @ d{depth}" if depth else ""
    if context is None or context.depth != depth:
        context = Context(depth)

    def fresh():
        if not depth:
            return m.new_cache()
        if context.cache is None:
            context.cache = m.new_cache()
            t0 = time.perf_counter()
            m.forward(head, context.cache)
            context.fill_s = time.perf_counter() - t0
        context.cache.truncate(depth)
        return context.cache

    results = []
    if prompt:
        pp = BenchResult(f"pp{prompt}{at}", prompt)  # ids has `prompt` tokens here
        for r in range(reps + 1):
            cache = fresh()
            t0 = time.perf_counter()
            m.forward(ids, cache)
            if r:  # the first is the warm-up
                pp.runs.append(prompt / (time.perf_counter() - t0))
        results.append(pp)
    if gen:
        tg = BenchResult(f"tg{gen}{at}", gen)
        for r in range(reps + 1):
            cache = fresh()
            logits = m.forward(ids[:1], cache)
            t0 = time.perf_counter()
            for _ in range(gen):
                logits = m.forward([int(np.argmax(logits))], cache)
            if r:
                tg.runs.append(gen / (time.perf_counter() - t0))
        results.append(tg)
    return results
