"""`eval`: perplexity, KL divergence and top-1 agreement of a model against a reference."""

import json

import pytest
from typer.testing import CliRunner

from qwen3cli.cli import app
from qwen3cli.io.loader import load
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.evaluate import EvalError, evaluate, sample_text

KW = dict(dtype="f32", std=0.05, peaked=True, hidden=256, ffn=512, heads=8, head_dim=32)


@pytest.fixture(scope="module")
def pair(gguf_model):
    f32, _ = gguf_model("f32", **KW)
    q4, _ = gguf_model("q4_0", **KW)
    return Engine(load(f32), ctx=64), Engine(load(q4), ctx=64)


def test_model_against_itself_is_exact(pair):
    ref, _ = pair
    r = evaluate(ref, ref, sample_text(), ctx=64)
    assert r.kl_mean == 0 and r.kl_p99 == 0 and r.top1 == 1 and r.ppl == r.ref_ppl
    assert r.tokens == (len(ref.tokenizer.encode(sample_text()).ids) // 64) * 31


def test_q4_against_f32_diverges(pair):
    ref, q4 = pair
    r = evaluate(q4, ref, sample_text(), ctx=64)
    assert r.kl_mean > 0 and r.kl_p99 >= r.kl_mean and 0 < r.top1 <= 1 and r.ppl != r.ref_ppl


def test_unrelated_models_are_said_to_be(pair, gguf_model):
    ref, q4 = pair
    assert evaluate(q4, ref, sample_text(), ctx=64).warnings == []  # a quantization of its reference
    other, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)  # another shape, the same tokenizer
    r = evaluate(Engine(load(other), ctx=64), ref, sample_text(), ctx=64)
    assert len(r.warnings) == 1 and "different models (hidden size 64 vs 256, heads 4 vs 8)" in r.warnings[0]
    same_shape, _ = gguf_model("q8_0", **{**KW, "seed": 9})  # the same shape, other weights
    r = evaluate(Engine(load(same_shape), ctx=64), ref, sample_text(), ctx=64)
    assert r.top1 < 0.3 and "top-1 agreement is only" in r.warnings[0]


def test_text_too_short(pair):
    ref, _ = pair
    with pytest.raises(EvalError, match="at least one chunk"):
        evaluate(ref, ref, "too short", ctx=64)


def test_cli_eval_and_quantize_check(gguf_model, tmp_path):
    f32, src = gguf_model("f32", **KW)
    r = CliRunner().invoke(app, ["eval", str(f32), "--ref", str(f32), "--ctx", "64", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["kl_mean"] == 0
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--type", "q4_k_m", "--check"])
    assert r.exit_code == 0, r.stderr
    assert "check: PPL" in r.stderr and "KL mean" in r.stderr
    r = CliRunner().invoke(app, ["eval", str(f32), "--ref", str(f32), "--text", str(tmp_path / "none.txt")])
    assert r.exit_code == 1 and "none.txt" in r.stderr
