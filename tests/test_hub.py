"""Repo ids through a local fake Hugging Face cache (never the network): GGUF repos by tag,
checkpoint repos quantized once and cached, offline misses as one-line errors."""

import os
import shutil
import subprocess
import sys

import pytest

from qwen3cli.errors import ConfigError
from qwen3cli.io import hub
from qwen3cli.io.loader import load

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_repo(cache, repo, files):
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, gguf_model):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("QWEN3CLI_CACHE", str(tmp_path / "ours"))
    q8, hf_dir = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    q4, _ = gguf_model("q4_0", dtype="f32", std=0.05, peaked=True)
    fake_repo(cache, "Qwen/Qwen3-Tiny-GGUF", {"Qwen3-Tiny-Q8_0.gguf": q8, "Qwen3-Tiny-Q4_0.gguf": q4})
    fake_repo(cache, "Qwen/Qwen3-Tiny", {p.name: p for p in hf_dir.iterdir()})
    return cache, tmp_path / "ours"


def test_gguf_repo_by_tag(offline_cache):
    assert hub.resolve("Qwen/Qwen3-Tiny-GGUF:Q4_0").name == "Qwen3-Tiny-Q4_0.gguf"
    assert hub.resolve("Qwen/Qwen3-Tiny-GGUF:q8_0").name == "Qwen3-Tiny-Q8_0.gguf"
    assert hub.resolve("Qwen/Qwen3-Tiny-GGUF").name == "Qwen3-Tiny-Q8_0.gguf"  # preferred without a tag
    with pytest.raises(ConfigError, match="no GGUF file for 'Q5_K_M'"):
        hub.resolve("Qwen/Qwen3-Tiny-GGUF:Q5_K_M")


def test_checkpoint_repo_is_quantized_once(offline_cache):
    _, ours = offline_cache
    seen = []
    path = hub.resolve("Qwen/Qwen3-Tiny", "q4_0", progress=lambda what, done, total: seen.append(what))
    assert path.parent == ours and path.name.endswith("--q4_0.gguf") and seen
    mtime = path.stat().st_mtime_ns
    assert hub.resolve("Qwen/Qwen3-Tiny", "q4_0") == path and path.stat().st_mtime_ns == mtime  # cached
    m = load("Qwen/Qwen3-Tiny", quant="q4_0")
    assert m.weights.layers[0].q.type.name == "Q4_0"


def test_offline_misses_and_typos(offline_cache):
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.resolve("Qwen/Qwen3-Nope")
    for typo in ("model.gguf", "./dir/x", "just-a-word"):
        with pytest.raises(ConfigError, match="no such file or directory"):
            load(typo)


def test_cli_uses_env_offline_cache(offline_cache, tmp_path):
    cache, ours = offline_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "QWEN3CLI_CACHE": str(ours)}
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "run", "Qwen/Qwen3-Tiny-GGUF:Q4_0", "hi", "-n", "3",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qwen3cli", "run", "Qwen/Qwen3-Missing", "hi"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: Qwen/Qwen3-Missing: not in the local")
    assert len(r.stderr.strip().splitlines()) == 1
