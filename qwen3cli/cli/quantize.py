"""`qwen3cli quantize SRC -o OUT`: a Hugging Face checkpoint to a GGUF file llama.cpp loads."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from ..errors import OutputError
from .options import Threads, set_threads
from .base import UsageError, app, count_text, err, out, print_fields, print_warnings, printable, size_text, user_errors


class QuantType(str, Enum):
    q8_0 = "q8_0"
    q4_0 = "q4_0"
    q5_0 = "q5_0"
    q4_k_m = "q4_k_m"
    q4_k_s = "q4_k_s"
    q5_k_m = "q5_k_m"
    q6_k = "q6_k"
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"


@app.command()
@user_errors
def quantize(
    source: str = typer.Argument(..., metavar="SRC", help="Hugging Face model directory (config.json, *.safetensors, "
                                 "tokenizer), a BF16/F16/F32 GGUF file, or a hub repo id (downloaded first)."),
    output: Path = typer.Option(None, "-o", "--output", help="The GGUF file to write."),
    type: QuantType = typer.Option(QuantType.q8_0, "--type", help="Tensor type of the weight matrices."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each tensor's planned type and size; write nothing."),
    check: bool = typer.Option(False, "--check", help="Afterwards, compare the file with the checkpoint on a short "
                                                      "text (perplexity, KL divergence, top-1 agreement)."),
    imatrix: str = typer.Option(None, "--imatrix", metavar="FILE", help="llama.cpp importance matrix (llama-imatrix's GGUF or "
                                                          ".dat file) to weight the quantization error, as "
                                                          "llama-quantize --imatrix does."),
    split_max_size: str = typer.Option(None, "--split-max-size", metavar="SIZE",
                                       help="Write parts of at most SIZE of tensor data (e.g. 50G, 500M) as "
                                            "llama-gguf-split does: OUTPUT-00001-of-0000N.gguf, ..."),
    threads: Threads = None,
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="Quantize an already-quantized GGUF again (adds a second rounding "
                                               "error), as llama-quantize --allow-requantize."),
) -> None:
    """Convert and quantize a Qwen3 / Qwen3-MoE checkpoint (or a BF16/F16/F32 GGUF) to a GGUF file llama.cpp loads."""
    from quant.gguf_split import parse_size

    from ..io import convert

    set_threads(threads)
    max_bytes = None
    if split_max_size is not None:
        try:
            max_bytes = parse_size(split_max_size)
        except ValueError as e:
            raise UsageError(f"--split-max-size: {e}") from None
    src = _source(source)
    if dry_run:
        return _print_plan(convert.plan_source(src, type.value, imatrix, allow_requantize))
    if output is None:
        raise OutputError("missing --output (-o): the GGUF file to write")
    convert.check_output(output, force)
    p = convert.plan_source(src, type.value, imatrix, allow_requantize)
    print_warnings(p.warnings)
    _warn_imatrix_missing(p)
    bytes_per_elem = p.input_bytes / max(p.n_params, 1)
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[tensors]}"), DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    n = len(p.tensors)
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("quantizing", total=p.input_bytes, tensors=f"0/{n} tensors")
        done_names: list[str] = []

        def progress(name: str, n_elements: int) -> None:
            if not done_names or done_names[-1] != name:
                done_names.append(name)
            bar.update(task, advance=n_elements * bytes_per_elem, tensors=f"{len(done_names)}/{n} tensors")

        s = convert.write(p, output, force=force, progress=progress, split_max_size=max_bytes)
        bar.update(task, completed=p.input_bytes, tensors=f"{n}/{n} tensors")

    print_fields(err, _summary_rows(src, p, s))
    if check:
        from ..runtime.evaluate import evaluate, sample_text
        from .load import open_engine

        seen: set[str] = set()
        model, ref = open_engine(str(s.out), 256, "q8_0", seen=seen), open_engine(str(src), 256, "bf16", seen=seen)
        with err.status("checking against the checkpoint…"):
            res = evaluate(model, ref, sample_text(), 256)
        print_warnings(res.warnings)
        err.print(f"check: {res.line()}", highlight=False, soft_wrap=True)


def _source(source: str) -> Path:
    """The directory or file to quantize: a repo id (not a path here) is downloaded first."""
    from ..io import hub
    from .load import LoadView

    p = Path(source).expanduser()
    if os.path.lexists(p) or not hub.REPO_ID.match(source):
        return p
    with LoadView() as view:
        return hub.fetch(source, view.hooks().progress)


def _summary_rows(src, p, s) -> list[tuple[str, str]]:
    rows = [
        ("input", f"{src}  ({size_text(s.input_bytes)})"),
        ("output", f"{s.out}  ({size_text(s.output_bytes)}" + (f" in {s.parts} parts)" if s.parts > 1 else ")")),
        ("parameters", f"{count_text(s.n_params)}  ({s.bits_per_weight:.2f} bits per weight)"),
        ("tensor types", ", ".join(f"{k} {v}" for k, v in sorted(s.type_counts.items()))),
    ]
    if p.imatrix is not None:
        rows.append(("imatrix", _imatrix_line(p)))
    rows.append(("time", f"{s.seconds:.1f} s"))
    return rows


def _imatrix_line(p) -> str:
    missing, n = p.imatrix_missing()
    return f"{p.imatrix.path} covers {n - len(missing)} of {n} quantized tensors"


def _warn_imatrix_missing(p) -> None:
    if p.imatrix is None:
        return
    missing, _ = p.imatrix_missing()
    if missing:  # llama-quantize says "did not find weights for ..." and goes on unweighted
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        err.print(f"[yellow]warning:[/yellow] the imatrix has no data for {escape(printable(', '.join(missing[:3])))}"
                  f"{more}; quantized without it", highlight=False, soft_wrap=True)


def _print_plan(p) -> None:
    print_warnings(p.warnings)
    t = Table(box=None, padding=(0, 2))
    for c, j in (("tensor", "left"), ("shape", "left"), ("type", "left"), ("size", "right")):
        t.add_column(c, justify=j, overflow="fold")
    for x in p.tensors:
        t.add_row(Text(printable(x.name)), " x ".join(map(str, x.shape)), x.type.name, size_text(x.nbytes))
    out.print(t)
    total = sum(x.nbytes for x in p.tensors)
    out.print(f"{len(p.tensors)} tensors, {count_text(p.n_params)} parameters, {size_text(total)} of tensor data "
              f"({8 * total / max(p.n_params, 1):.2f} bits per weight); nothing written", highlight=False)
    if p.imatrix is not None:
        out.print(f"imatrix: {printable(_imatrix_line(p))}", highlight=False, soft_wrap=True, markup=False)
        _warn_imatrix_missing(p)
