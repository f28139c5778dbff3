"""`qwen3cli quantize` and `info` end to end, and every bad input: one line, exit 1, no file left."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from checkpoints import make_checkpoint, write_safetensors
from qwen3cli.io import convert
from qwen3cli.cli import app


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in stderr


def leftovers(d):
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def good(tmp_path):
    d, _ = make_checkpoint(tmp_path / "model", moe=True, tied=False, shards=2, layers=1)
    return d


def test_quantize_then_info(good, tmp_path):
    out = tmp_path / "o" / "m.gguf"
    out.parent.mkdir()
    code, _, err = run("quantize", good, "-o", out, "--type", "q4_0")
    assert code == 0, err
    assert "Q4_0" in err and "bits per weight" in err
    assert leftovers(out.parent) == ["m.gguf"]
    code, stdout, _ = run("info", out)
    assert code == 0
    for fact in ("qwen3moe", "Q4_0", "151936", "151387", "151645 <|im_end|>", "chat template", "yes", "experts"):
        assert fact in stdout, fact


def test_refuses_to_overwrite_without_force(good, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, _, err = run("quantize", good, "-o", out)
    assert code == 1
    one_line_error(err, str(out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    code, _, err = run("quantize", good, "-o", out, "--force")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"


def _break(d, how):
    """Damage checkpoint directory d in one way; returns the file the error must name."""
    shard = sorted(d.glob("*.safetensors"))[0]
    index = d / "model.safetensors.index.json"
    if how == "no config":
        (d / "config.json").unlink()
        return d / "config.json"
    if how == "bad config json":
        (d / "config.json").write_text("{ not json")
        return d / "config.json"
    if how == "unsupported architecture":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
        return d / "config.json"
    if how == "missing key":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["num_attention_heads"]
        (d / "config.json").write_text(json.dumps(cfg))
        return d / "config.json"
    if how == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        return shard
    if how == "corrupt header":
        data = bytearray(shard.read_bytes())
        data[8:20] = b"!!!!!!!!!!!!"
        shard.write_bytes(bytes(data))
        return shard
    if how == "missing shard":
        shard.unlink()
        return index
    m = json.loads(index.read_text())["weight_map"]
    names = [n for n, f in m.items() if f == shard.name]
    rng = np.random.default_rng(0)
    tensors = {}
    from checkpoints import stored  # noqa: F401  (values do not matter here)
    from qwen3cli.io.checkpoint import read_safetensors_header

    refs = read_safetensors_header(shard)
    for n in names:
        tensors[n] = rng.standard_normal(refs[n].shape).astype(np.float32)
    victim = next(n for n in names if "q_proj" in n or "experts.1.up_proj" in n)
    if how == "missing tensor":
        del tensors[victim]
    elif how in ("extra tensor", "stray expert"):
        extra = ("model.layers.0.self_attn.rotary_extra.weight" if how == "extra tensor"
                 else "model.layers.0.mlp.experts.9.gate_proj.weight")  # the model has 4 experts
        tensors[extra] = np.zeros((64, 64), np.float32)
        m[extra] = shard.name
        index.write_text(json.dumps({"weight_map": m}))
    elif how == "misshaped tensor":
        tensors[victim] = tensors[victim][:, :-1]
    elif how == "nan weights":
        tensors[victim][0, 0] = np.nan
    write_safetensors(shard, tensors, "bf16")
    return shard if how != "missing tensor" else d


BREAKAGES = {
    "no config": "not found", "bad config json": "not valid JSON",
    "unsupported architecture": "unsupported architecture LlamaForCausalLM",
    "missing key": "missing 'num_attention_heads'", "truncated shard": "truncated",
    "corrupt header": "corrupt", "missing shard": "is missing", "missing tensor": "missing tensor",
    "extra tensor": "unexpected tensor 'model.layers.0.self_attn.rotary_extra.weight'",
    "stray expert": "unexpected tensor 'model.layers.0.mlp.experts.9.gate_proj.weight'",
    "misshaped tensor": "has shape", "nan weights": "NaN",
}


@pytest.mark.parametrize("how", list(BREAKAGES))
def test_bad_checkpoints(good, tmp_path, how):
    named = _break(good, how)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = run("quantize", good, "-o", outdir / "m.gguf")
    assert code == 1
    one_line_error(err, str(named), BREAKAGES[how])
    assert leftovers(outdir) == []


def test_missing_tokenizer(good, tmp_path):
    (good / "tokenizer.json").unlink()
    code, _, err = run("quantize", good, "-o", tmp_path / "m.gguf")
    assert code == 1
    one_line_error(err, str(good / "tokenizer.json"), "not found")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_source_and_output_paths(good, tmp_path):
    cases = [
        ((tmp_path / "nope", tmp_path / "a.gguf"), "no such directory"),
        ((good / "config.json", tmp_path / "a.gguf"), "not a directory"),
        ((good, tmp_path / "missing" / "a.gguf"), "does not exist"),
        ((good, tmp_path), "is a directory"),
    ]
    for (src, out), msg in cases:
        code, _, err = run("quantize", src, "-o", out)
        assert code == 1, msg
        one_line_error(err, msg)
    assert leftovers(tmp_path) == ["model"]


def test_interrupt_leaves_nothing(good, tmp_path, monkeypatch):
    calls = []

    def boom(*a):
        calls.append(a)
        if len(calls) == 5:
            raise KeyboardInterrupt

    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert.quantize(good, out / "m.gguf", "q8_0", progress=boom)
    assert leftovers(out) == []
    # the CLI turns it into exit 130, still without files
    monkeypatch.setattr(convert, "check_output", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = run("quantize", good, "-o", out / "m.gguf")
    assert code == 130 and "interrupted" in err and leftovers(out) == []


def test_info_on_bad_files(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    code, _, err = run("info", p)
    assert code == 1
    one_line_error(err, str(p))
    code, _, err = run("info", tmp_path / "missing.gguf")
    assert code == 1
    one_line_error(err, "missing.gguf", "cannot read")


def test_console_script_end_to_end(good, tmp_path):
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "quantize", str(good), "-o", str(out), "--type", "f16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "quantize", str(good), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {out}: already exists (use --force to overwrite)"]


def test_dry_run_prints_the_plan_and_writes_nothing(good, tmp_path):
    before = leftovers(tmp_path)
    code, out, err = run("quantize", good, "--type", "q4_0", "--dry-run")
    assert code == 0, err
    assert "blk.0.ffn_gate_exps.weight" in out and "Q4_0" in out and "output.weight" in out
    assert "nothing written" in out and leftovers(tmp_path) == before
    code, _, err = run("quantize", good)  # without --dry-run an output is required
    assert code == 1 and "--output" in err


def test_imatrix_option(good, tmp_path):
    from checkpoints import imatrix_for, write_imatrix_dat

    im = imatrix_for(convert.plan(good, "q4_0"), tmp_path / "m.imatrix", skip=("blk.0.attn_k.weight",))
    code, out, err = run("quantize", good, "--type", "q4_0", "--imatrix", im, "--dry-run")
    assert code == 0, err
    assert "covers 8 of 9 quantized tensors" in out
    assert "no data for blk.0.attn_k.weight" in err and "error" not in err
    dest = tmp_path / "m.gguf"
    code, _, err = run("quantize", good, "--type", "q4_0", "--imatrix", im, "-o", dest)
    assert code == 0 and "covers 8 of 9" in err and dest.exists()
    # bad files: one line naming the file and the problem, nothing written
    bad = {"garbage.dat": b"\x00\x01" * 40, "empty.dat": b""}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    wrong = write_imatrix_dat(tmp_path / "wrong.dat", {"blk.0.attn_q.weight": (np.ones(32), 1)})
    for path, needle in [(tmp_path / "garbage.dat", "neither a GGUF nor"), (tmp_path / "empty.dat", "empty"),
                         (tmp_path / "missing.dat", "cannot read"), (wrong, "32 importance values"),
                         (good / "config.json", "neither a GGUF nor")]:
        out2 = tmp_path / "x.gguf"
        code, _, err = run("quantize", good, "--type", "q4_0", "--imatrix", path, "-o", out2)
        assert code == 1
        one_line_error(err, str(path), needle)
        assert not out2.exists()


def test_summary_keeps_long_paths_at_80_columns(good, tmp_path):
    """Off a terminal rich lays tables out in 80 columns; no path may be cut to '...'."""
    import io
    import re

    from rich.console import Console

    from qwen3cli.cli.base import err, print_fields

    assert err.width == 80  # conftest pins it: the test means what it says on any machine
    deep = tmp_path / ("d" * 40)
    dest = deep / ("model-" + "x" * max(0, 150 - len(str(deep)) - 12) + ".gguf")
    assert len(str(dest)) >= 150
    deep.mkdir(parents=True)
    code, _, stderr = run("quantize", good, "--type", "q8_0", "-o", dest)
    assert code == 0 and dest.exists(), stderr
    assert "..." not in stderr and "…" not in stderr
    lines = {ln.split()[0]: ln for ln in stderr.splitlines() if ln.strip()}
    assert str(dest) in lines["output"] and str(good) in lines["input"]
    code, stdout, _ = run("info", dest)
    assert code == 0 and str(dest) in stdout

    # on a real 80-column terminal the grid folds the path instead of cutting it
    buf = io.StringIO()
    print_fields(Console(file=buf, force_terminal=True, width=80, color_system=None),
                 [("output", f"{dest}  (1 MB)"), ("name", "[/oops] not markup")])
    text = buf.getvalue()
    assert all(len(ln) <= 80 for ln in text.splitlines()) and len(text.splitlines()) > 2
    assert str(dest) in re.sub(r"\s+", "", text)
    assert "[/oops] not markup" in text


def test_help_does_not_load_the_engine():
    """`qwen3cli --help` and the command table stay light (0.6 s -> 0.2 s): the engine, numba,
    numpy and the chat UI load when a command runs, not when the CLI is imported."""
    code = ("import sys, qwen3cli.cli; heavy = ('numba', 'numpy', 'prompt_toolkit', 'qwen3cli.runtime.conversation', "
            "'qwen3cli.runtime.engine', 'tokenizers'); print([m for m in heavy if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "chat" in r.stdout and "quantize" in r.stdout


def test_the_cli_draws_the_load_hooks_one_live_display_at_a_time(monkeypatch):
    """The bar, the warnings and the GPU status of a load (loading.open_engine's hooks): rich
    allows one live display at a time, so the bar stops before a line or a status, and a failed
    load leaves none running."""
    import io

    from rich.console import Console

    from qwen3cli.runtime import loading
    from qwen3cli.cli import base, load
    from qwen3cli.errors import Qwen3CliError

    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr(base, "err", console)
    monkeypatch.setattr(load, "err", console)
    lives = []

    def fake_open_engine(model, ctx, quant, device, exact, cache_type, hooks):
        hooks.progress("downloading", 10, 100)
        lives.append(len(console._live_stack))
        hooks.warning("left out [b]x[/b]")
        lives.append(len(console._live_stack))
        hooks.stage(loading.GPU_STAGE)
        lives.append(len(console._live_stack))
        hooks.note("4 GB on [the GPU]")
        raise Qwen3CliError("out of GPU memory")

    monkeypatch.setattr(loading, "open_engine", fake_open_engine)
    with pytest.raises(Qwen3CliError):
        load.open_engine("model.gguf", None, "q8_0", "cuda")
    assert lives == [1, 0, 1] and console._live_stack == []
    text = console.file.getvalue()
    assert "warning: left out [b]x[/b]" in text and "4 GB on [the GPU]" in text


def test_a_command_loading_two_models_shows_a_note_once(monkeypatch):
    import io

    from rich.console import Console

    from qwen3cli.runtime import loading
    from qwen3cli.cli import load

    console = Console(file=io.StringIO(), width=80, color_system=None)
    monkeypatch.setattr(load, "err", console)
    monkeypatch.setattr(loading, "open_engine", lambda *a, hooks: hooks.note("running on the CPU: no CUDA GPU found"))
    seen: set[str] = set()
    load.open_engine("a.gguf", None, "q8_0", seen=seen)
    load.open_engine("b.gguf", None, "q8_0", seen=seen)  # eval's reference, quantize --check's checkpoint
    load.open_engine("c.gguf", None, "q8_0")  # another command: shown again
    assert console.file.getvalue().count("running on the CPU") == 2


def test_help_shows_no_bool_values_and_names_arguments_in_capitals():
    from qwen3cli.cli import app

    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, name
        flags = [ln for ln in r.stdout.splitlines() if "<bool>" in ln and "--help" not in ln]  # typer's own row
        assert not flags, (name, flags)
        usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
        assert usage == usage.replace(usage.split("[OPTIONS]")[-1], usage.split("[OPTIONS]")[-1].upper()), usage
