"""Model management (issue 15, part 3) over a fake Hugging Face cache: list shows what run takes,
rm deletes only what the model uses, show tells the thinking mode and sampling, hf.co/ names work."""

import json

import pytest

from qwen3cli.io import hub, models

from test_cli import one_line_error, run
from test_hub import fake_repo, offline_cache  # noqa: F401  (a fixture)


def test_list_names_run(offline_cache):  # noqa: F811
    _, ours = offline_cache
    hub.resolve("Qwen/Qwen3-Tiny", "q4_0")  # a converted checkpoint in our cache
    code, stdout, err = run("list", "--json")
    assert code == 0, err
    got = {m["name"]: m for m in json.loads(stdout)}
    assert set(got) == {"Qwen/Qwen3-Tiny-GGUF:Q8_0", "Qwen/Qwen3-Tiny-GGUF:Q4_0", "Qwen/Qwen3-Tiny",
                        "Qwen/Qwen3-Tiny --quant q4_0"}
    assert got["Qwen/Qwen3-Tiny-GGUF:Q4_0"]["type"] == "Q4_0" and got["Qwen/Qwen3-Tiny"]["kind"] == "checkpoint"
    for name, m in got.items():  # every listed name runs without a download
        if m["kind"] == "gguf":
            assert hub.resolve(name) == models.find(name)[0].path
    assert got["Qwen/Qwen3-Tiny-GGUF:Q8_0"]["size"] > got["Qwen/Qwen3-Tiny-GGUF:Q4_0"]["size"] > 0
    code, stdout, _ = run("list")
    assert code == 0 and "Qwen/Qwen3-Tiny-GGUF:Q8_0" in stdout


def test_rm_deletes_one_file_and_keeps_shared_blobs(offline_cache):  # noqa: F811
    cache, _ = offline_cache
    before = set(p.name for p in cache.rglob("blobs/*"))
    code, _, err = run("rm", "hf.co/Qwen/Qwen3-Tiny-GGUF:Q4_0")
    assert code == 0 and "deleted Qwen/Qwen3-Tiny-GGUF:Q4_0" in err, err
    names = {m.name for m in models.cached_models()}
    assert "Qwen/Qwen3-Tiny-GGUF:Q4_0" not in names and "Qwen/Qwen3-Tiny-GGUF:Q8_0" in names
    assert hub.resolve("Qwen/Qwen3-Tiny-GGUF:Q8_0").is_file()
    assert set(p.name for p in cache.rglob("blobs/*")) <= before
    code, _, err = run("rm", "Qwen/Nothing-Here")
    assert code == 1
    one_line_error(err, "Qwen/Nothing-Here: no such model in the caches")


def test_show_tells_mode_sampling_and_template(offline_cache, gguf_model):  # noqa: F811
    code, stdout, err = run("show", "Qwen/Qwen3-Tiny-GGUF:Q8_0", "--json", "--template")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["thinking_mode"] == "hybrid" and d["template_source"] == "file" and "enable_thinking" in d["template"]
    # Qwen's recommended values per mode (QWEN3_FACTS.md), the file having no sampling keys
    assert d["sampling"]["thinking"]["temperature"] == pytest.approx(0.6)
    assert d["sampling"]["non-thinking"]["temperature"] == pytest.approx(0.7)
    assert d["sampling"]["non-thinking"]["top_p"] == pytest.approx(0.8)
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    code, stdout, err = run("show", path)
    assert code == 0 and "hybrid" in stdout and "sampling (thinking)" in stdout, err


def test_pull_and_hf_co_names(offline_cache):  # noqa: F811
    code, _, err = run("pull", "hf.co/Qwen/Qwen3-Tiny-GGUF:Q4_0")
    assert code == 0 and "Qwen3-Tiny-Q4_0.gguf" in err, err
    assert hub.resolve("https://huggingface.co/Qwen/Qwen3-Tiny-GGUF:Q8_0").name == "Qwen3-Tiny-Q8_0.gguf"
    code, _, err = run("pull", "Qwen/Not-Cached")
    assert code == 1
    one_line_error(err, "Qwen/Not-Cached")


def test_info_json(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    code, stdout, err = run("info", path, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["architecture"] == "qwen3" and d["file_type"] == "Q8_0" and d["n_tensors"] > 0


def test_no_model_means_the_default_one_said_once(offline_cache, gguf_model):  # noqa: F811
    from typer.testing import CliRunner

    from qwen3cli.cli import app

    cache, _ = offline_cache
    q8, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    fake_repo(cache, "Qwen/Qwen3-0.6B-GGUF", {"Qwen3-0.6B-Q8_0.gguf": q8})
    (tmp := cache.parent / "q.txt").write_text("Add them.")
    for args in (["run", "What is 2+2?"], ["run", "-f", str(tmp), "What is 2+2?"]):
        r = CliRunner().invoke(app, [*args, "-n", "2", "--no-think", "--json"])
        assert r.exit_code == 0, r.stderr
        assert r.stderr.count("no MODEL given: using Qwen/Qwen3-0.6B-GGUF:Q8_0") == 1
        assert json.loads(r.stdout)["prompt_tokens"] > 5
    r = CliRunner().invoke(app, ["run", "Qwen/Qwen3-Tiny-GGUF:Q8_0", "hi", "-n", "1", "--json"])  # a model named
    assert r.exit_code == 0 and "no MODEL given" not in r.stderr


def test_a_checkpoint_directory_is_converted_once(ckpt, tmp_path, monkeypatch):
    import os

    from qwen3cli.io.loader import load

    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "conv"))
    src, _ = ckpt(dtype="f32", std=0.05)
    first = load(src, quant="q4_0")
    assert any("converted" in n and "once" in n for n in first.notes) and first.source == str(src)
    files = list((tmp_path / "conv" / "local").glob("*.gguf"))
    assert len(files) == 1 and files[0].name.endswith("--q4_0.gguf")
    mtime = files[0].stat().st_mtime_ns
    again = load(src, quant="q4_0")
    assert again.notes == [] and files[0].stat().st_mtime_ns == mtime
    assert again.weights.layers[0].q.type.name == "Q4_0"
    assert any(m.name.startswith("local:") and m.type == "Q4_0" for m in models.cached_models())
    monkeypatch.setenv("QWEN3CLI_CACHE", "/proc/no-such-dir")  # unwritable: converted in memory, as before
    assert load(src, quant="q4_0").weights.layers[0].q.type.name == "Q4_0"
    os.utime(src / "config.json")  # an edited checkpoint is converted again
    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "conv"))
    load(src, quant="q4_0")
    assert len(list((tmp_path / "conv" / "local").glob("*.gguf"))) == 2
