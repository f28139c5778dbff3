"""`qwen3cli pull / list / ps / rm / show`: the models on this machine, as ollama manages its own."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .base import app, err, out, print_fields, printable, size_text, user_errors
from .options import Quant


@app.command()
@user_errors
def pull(
    model: str = typer.Argument(..., metavar="REPO[:TAG]", help="A hub repo id (hf.co/OWNER/REPO:TAG works too); "
                                                                "TAG picks a GGUF file by its type, e.g. Q4_K_M."),
    quant: Quant = "q8_0",
) -> None:
    """Download a model into the Hugging Face cache (resumed if cut off).

    A checkpoint repo is converted to --quant once, as run would on first use."""
    from ..io import hub
    from .load import LoadView

    with LoadView() as view:
        path = hub.resolve(model, quant, view.hooks().progress)
    err.print(f"ready: {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command("list")
@user_errors
def list_models(as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table.")) -> None:
    """List the models this machine can run without a download.

    GGUF files and checkpoints in the Hugging Face cache, and checkpoints converted by qwen3cli."""
    from ..io.models import cached_models

    models = cached_models()
    if as_json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "type": m.type, "size": m.size, "path": str(m.path)}
                          for m in models], ensure_ascii=False))
        return
    if not models:
        err.print("no models yet: `qwen3cli pull REPO[:TAG]` downloads one (or `run` a repo id)")
        return
    t = Table(box=None, padding=(0, 2))
    for c, j in (("NAME", "left"), ("TYPE", "left"), ("SIZE", "right"), ("KIND", "left")):
        t.add_column(c, justify=j, no_wrap=True)  # names are copied into commands: never broken
    t.add_column("WHERE", overflow="fold")
    for m in models:
        t.add_row(Text(printable(m.name)), m.type or "", size_text(m.size), m.kind, Text(printable(str(m.path))))
    out.print(t)


@app.command("ps")
@user_errors
def processes(as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table.")) -> None:
    """List the models loaded now: running `serve` and `chat` processes of this user."""
    import os
    import time
    from pathlib import Path

    from ..runtime.running import running

    found = running()
    if as_json:
        print(json.dumps([{"pid": r.pid, "kind": r.kind, "model": r.model, "ctx": r.ctx, "device": r.device,
                           "url": r.url, "started": r.started, "rss": r.rss} for r in found], ensure_ascii=False))
        return
    if not found:
        err.print("no models loaded: `qwen3cli serve` and `qwen3cli chat` show here while they run")
        return
    t = Table(box=None, padding=(0, 2))
    t.add_column("MODEL", no_wrap=True)  # a file by its name, as serve's model id; --json has the path
    for c, j in (("PID", "right"), ("KIND", "left"), ("DEVICE", "left"), ("CONTEXT", "right"),
                 ("MEMORY", "right"), ("UP", "right")):
        t.add_column(c, justify=j, no_wrap=True, min_width=len(c))
    t.add_column("URL", overflow="fold")
    now = time.time()
    for r in found:
        t.add_row(Text(printable(Path(r.model).name if os.sep in r.model else r.model)), str(r.pid), r.kind, "GPU" if r.device == "cuda" else "CPU", str(r.ctx),
                  "" if r.rss is None else size_text(r.rss), _since(now - r.started), Text(printable(r.url or "")))
    out.print(t, width=None if out.is_terminal else 1000)  # a pipe gets whole lines, not rich's 80 columns


def _since(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


@app.command("rm")
@user_errors
def remove(model: str = typer.Argument(..., help="A name as `qwen3cli list` shows it, or a repo id (all its files)."),
           ) -> None:
    """Delete a cached model's files (the blobs no other snapshot uses)."""
    from ..io.models import remove as remove_model

    for m in remove_model(model):
        err.print(f"deleted {escape(m.name)} ({size_text(m.size)})", highlight=False)


@app.command()
@user_errors
def show(
    model: str = typer.Argument(..., help="A GGUF file, a cached name or a repo id."),
    template: bool = typer.Option(False, "--template", help="Print the chat template."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Show a model's summary, thinking mode and default sampling per mode.

    With --template, its chat template too."""
    from ..io.show import describe

    d = describe(model)
    if as_json:
        print(json.dumps(d.as_dict(template), ensure_ascii=False))
        return
    rows = [("file", f"{d.info.path}  ({size_text(d.info.size)})"), ("name", str(d.info.name)),
            ("architecture", d.info.architecture), ("file type", str(d.info.file_type)),
            ("thinking", d.thinking_mode + ("" if d.template_source == "file" else " (built-in template)"))]
    for mode, params in d.sampling.items():
        rows.append((f"sampling ({mode})", ", ".join(f"{k} {v:g}" for k, v in params.items())))
    print_fields(out, rows)
    if template:
        out.print(d.template, markup=False, highlight=False, soft_wrap=True)
