"""`qwen3cli eval MODEL --ref REF`: perplexity, KL divergence and top-1 agreement on a text."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from quant.files import read_text

from .base import UsageError, app, err, out, print_warnings, user_errors
from .load import open_engine
from .options import Exact, Model, Threads, set_threads

MAX_TEXT = 64 << 20  # bytes: hours of scoring on a CPU already


@app.command(name="eval")
@user_errors
def eval_(
    model: Model,
    ref: str = typer.Option(..., "--ref", help="The reference: the unquantized model (GGUF, HF directory or repo id)."),
    text: Path = typer.Option(None, "--text", help="A UTF-8 text file (default: a sample shipped with qwen3cli)."),
    ctx: int = typer.Option(256, "--ctx", "--ctx-size", "-c", help="Tokens per chunk; the second half of each is scored."),
    ref_quant: str = typer.Option("bf16", "--ref-quant", help="Type an HF directory or repo reference is loaded as."),
    threads: Threads = None,
    exact: Exact = False,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Compare MODEL with REF on a text, like llama-perplexity --kl-divergence."""
    from dataclasses import asdict

    from ..runtime.evaluate import evaluate, sample_text

    if ctx < 2:  # half of each chunk is scored
        raise UsageError(f"--ctx must be at least 2, got {ctx}")
    if text is not None:
        body = read_text(text, MAX_TEXT, "text file")
    else:
        body = sample_text()
    set_threads(threads)
    seen: set[str] = set()
    m = open_engine(model, max(ctx, 8), "q8_0", exact=exact, seen=seen)
    r = open_engine(ref, max(ctx, 8), ref_quant, seen=seen)
    with err.status("evaluating…"):
        res = evaluate(m, r, body, ctx)
    print_warnings(res.warnings)
    if as_json:
        out.print_json(json.dumps(asdict(res)))
    else:
        out.print(res.line(), highlight=False, soft_wrap=True)
