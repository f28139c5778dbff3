"""`qwen3cli info FILE`: what a GGUF file holds."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import app, count_text, out, print_fields, size_text, user_errors


@app.command()
@user_errors
def info(file: Path = typer.Argument(..., help="A GGUF file (any part of a split one)."),
         as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table.")) -> None:
    """Show a GGUF file's architecture, hyperparameters, tokenizer and tensor types."""
    from ..io.info import read_info

    i = read_info(file)
    if as_json:
        import json
        from dataclasses import asdict

        d = {**asdict(i), "path": str(i.path), "type_counts": dict(i.type_counts),
             "hparams": dict(i.hparams), "tokenizer": dict(i.tokenizer)}
        print(json.dumps(d, ensure_ascii=False, default=str))
        return
    rows = [
        ("file", f"{i.path}  ({size_text(i.size)})"),
        ("name", str(i.name)),
        ("architecture", i.architecture),
        ("file type", str(i.file_type)),
        ("parameters", f"{count_text(i.n_params)}  ({8 * i.data_bytes / max(i.n_params, 1):.2f} bits per weight)"),
        ("embeddings", "tied" if i.tied_embeddings else "untied"),
    ]
    rows += [(label, f"{value:g}" if isinstance(value, float) else str(value)) for label, value in i.hparams]
    rows += [(f"tokenizer {label}", str(value)) for label, value in i.tokenizer]
    rows.append(("chat template", "yes" if i.has_chat_template else "no"))
    rows.append(("tensors", f"{i.n_tensors}: " + ", ".join(f"{k} {v}" for k, v in sorted(i.type_counts.items()))))
    print_fields(out, rows)
