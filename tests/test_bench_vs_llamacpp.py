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


def test_parse_ours_keeps_the_fill_time_at_depth():
    d = json.loads(_our_json([300.0], [40.0]))
    d["fill_s"] = {"4096": 21.5}
    assert bvl.parse_ours(json.dumps(d))["fill_s"] == 21.5
    assert "fill_s" not in bvl.parse_ours(_our_json([300.0], [40.0]))  # no depth, no fill


def test_depth_and_ctx_reach_both_commands(monkeypatch):
    seen = []
    monkeypatch.setattr(bvl, "_run", lambda cmd: seen.append(cmd) or type("R", (), {"stdout": _our_json([1.0], [])})())
    bvl.ours(Path("m.gguf"), 512, 0, 2, None, 1, d=4096, ctx=32768)
    assert seen[-1][seen[-1].index("-d") + 1] == "4096" and seen[-1][seen[-1].index("--ctx") + 1] == "32768"
    monkeypatch.setattr(bvl, "_run", lambda cmd: seen.append(cmd) or type("R", (), {"stdout": '{"pp": [], "tg": []}'})())
    bvl.llama(Path("m.gguf"), 512, 0, 2, "q8_0", 1, d=4096, ctx=32768)
    assert seen[-1][-2:] == ["4096", "32768"] and seen[-1][3:6] == ["m.gguf", "2", "q8_0"]


def test_the_commands_it_runs_parse_with_our_cli(monkeypatch):
    """Each command line the script builds for qwen3cli is one our CLI accepts (quantize's -t once
    became its threads, and --prepare on a fresh workdir failed on every file)."""
    import click
    import typer

    from qwen3cli.cli.entry import app

    seen = []
    monkeypatch.setattr(bvl, "_run", lambda cmd: seen.append(cmd) or type("R", (), {"stdout": _our_json([1.0], [])})())
    bvl.make_file(Path("src"), Path("out.gguf"), "q4_k_m", baseline=False)
    bvl.ours(Path("m.gguf"), 128, 64, 2, "q8_0", 3, d=0, ctx=4096)
    bvl.first_token(Path("m.gguf"), 2, "q8_0", baseline=False)
    root = typer.main.get_command(app)
    for cmd in seen:
        assert cmd[1:3] == ["-m", "qwen3cli"]
        sub = root.commands[cmd[3]]
        try:
            sub.make_context(cmd[3], list(cmd[4:]))
        except (click.UsageError, ValueError) as e:  # typer 0.29 checks types with pydantic
            raise AssertionError(f"{' '.join(cmd[3:])}: {e}") from None
    assert [c[3] for c in seen] == ["quantize", "bench", "run"]


def test_host_line_names_a_numba_target_that_is_not_the_hosts(monkeypatch):
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    assert "NUMBA_CPU_NAME" not in bvl.host_cpu()
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    assert "ours compiled for NUMBA_CPU_NAME=haswell" in bvl.host_cpu()
