"""scripts/bench_vs_llamacpp.py's bookkeeping, without a model: our bench's JSON becomes the same
per-run lists as the llama side's, and a table figure is the median over every round's runs."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

_path = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_llamacpp.py"
_spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", _path)
bvl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bvl)


def _our_json(pp_runs, tg_runs):
    """What `qwen3cli bench --json` prints (qwen3cli/cli/bench.py), with the fields this script reads."""
    results = []
    for test, runs in (("pp128", pp_runs), ("tg64", tg_runs)):
        if runs:
            results.append({"test": test, "tokens": int(test[2:]), "depth": 0, "tokens_per_s": float(np.mean(runs)),
                            "std": float(np.std(runs)), "runs": runs})
    return json.dumps({"model": "m", "load_s": 0.5, "peak_rss_mb": 700.0, "results": results})


def test_parse_ours_keeps_every_run():
    rng = np.random.default_rng(0)
    pp, tg = list(rng.uniform(100, 600, 3)), list(rng.uniform(10, 90, 5))
    d = bvl.parse_ours(_our_json(pp, tg))
    assert d["pp"] == pp and d["tg"] == tg
    assert d["load_s"] == 0.5 and d["peak_rss_mb"] == 700.0


def test_parse_ours_missing_test_is_empty():
    d = bvl.parse_ours(_our_json([], [42.0, 44.0]))
    assert d["pp"] == [] and math.isnan(bvl.median([d], "pp"))
    assert bvl.median([d], "tg") == 43.0


def test_median_pools_runs_over_rounds():
    rng = np.random.default_rng(1)
    rounds = [{"pp": list(rng.uniform(1, 100, 3)), "peak_rss_mb": float(rng.uniform(500, 900))} for _ in range(4)]
    rounds[2]["pp"][0] = 1e6  # one wild run moves a mean, not the median
    every = [v for r in rounds for v in r["pp"]]
    assert bvl.median(rounds, "pp") == np.median(every)
    assert bvl.median(rounds, "peak_rss_mb") == np.median([r["peak_rss_mb"] for r in rounds])
    assert math.isnan(bvl.median(rounds, "tg"))
    assert math.isnan(bvl.median([], "pp"))
