"""The qwen3cli command line: parses, calls the library, renders with rich.

Typed errors from the library become one red line on stderr and exit code 1;
Ctrl-C is exit 130. Nothing below this layer prints.
"""

from __future__ import annotations

import logging
import signal
from enum import Enum
from functools import wraps
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import USER_ERRORS, OutputError
from .safe_text import printable  # noqa: F401  (the cli_* modules take it from here)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run Qwen3 models locally; quantize checkpoints to llama.cpp-compatible GGUF.",
)
out = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn library errors into one red line and exit 1; Ctrl-C into exit 130."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            err.print(f"[red]error:[/red] {escape(printable(e))}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


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


def print_fields(console: Console, rows: list[tuple[str, str]]) -> None:
    """Label/value lines that never lose text: a folding grid on a terminal, plain lines elsewhere.

    Off a terminal rich assumes 80 columns and would cut a long path with "..." in a table cell;
    a log or a pipe gets whole lines instead, aligned but never wrapped.
    """
    if console.is_terminal:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold", no_wrap=True)
        t.add_column(overflow="fold")
        for label, value in rows:
            t.add_row(Text(printable(label)), Text(printable(value)))
        console.print(t, highlight=False)
        return
    w = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        console.print(f"{label:<{w}}  {printable(value)}", markup=False, highlight=False, soft_wrap=True)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@app.command()
@user_errors
def quantize(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer)."),
    output: Path = typer.Option(None, "-o", "--output", help="The GGUF file to write."),
    type: QuantType = typer.Option(QuantType.q8_0, "--type", "-t", help="Tensor type of the weight matrices."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUTPUT if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each tensor's planned type and size; write nothing."),
    check: bool = typer.Option(False, "--check", help="Afterwards, compare the file with the checkpoint on a short "
                                                      "text (perplexity, KL divergence, top-1 agreement)."),
    imatrix: str = typer.Option(None, "--imatrix", metavar="FILE", help="llama.cpp importance matrix (llama-imatrix's GGUF or "
                                                          ".dat file) to weight the quantization error, as "
                                                          "llama-quantize --imatrix does."),
) -> None:
    """Convert and quantize a Qwen3 / Qwen3-MoE checkpoint to a GGUF file llama.cpp loads."""
    from . import convert

    if dry_run:
        return _print_plan(convert.plan(src, type.value, imatrix))
    if output is None:
        raise OutputError("missing --output (-o): the GGUF file to write")
    convert.check_output(output, force)
    p = convert.plan(src, type.value, imatrix)
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

        s = convert.write(p, output, force=force, progress=progress)
        bar.update(task, completed=p.input_bytes, tensors=f"{n}/{n} tensors")

    print_fields(err, _summary_rows(src, p, s))
    if check:
        from .cli_run import open_engine
        from .evaluate import evaluate, sample_text

        model, ref = open_engine(str(s.out), 256, "q8_0"), open_engine(str(src), 256, "bf16")
        with err.status("checking against the checkpoint…"):
            res = evaluate(model, ref, sample_text(), 256)
        err.print(f"check: {res.line()}", highlight=False, soft_wrap=True)


def _summary_rows(src, p, s) -> list[tuple[str, str]]:
    rows = [
        ("input", f"{src}  ({_size(s.input_bytes)})"),
        ("output", f"{s.out}  ({_size(s.output_bytes)})"),
        ("parameters", f"{_count(s.n_params)}  ({s.bits_per_weight:.2f} bits per weight)"),
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


def print_warnings(lines: list[str]) -> None:
    """The library's warnings (optional inputs it left out), one yellow line each."""
    for line in lines:
        err.print(f"[yellow]warning:[/yellow] {escape(printable(line))}", highlight=False, soft_wrap=True)


def _print_plan(p) -> None:
    print_warnings(p.warnings)
    t = Table(box=None, padding=(0, 2))
    for c, j in (("tensor", "left"), ("shape", "left"), ("type", "left"), ("size", "right")):
        t.add_column(c, justify=j, overflow="fold")
    for x in p.tensors:
        t.add_row(Text(printable(x.name)), " x ".join(map(str, x.shape)), x.type.name, _size(x.nbytes))
    out.print(t)
    total = sum(x.nbytes for x in p.tensors)
    out.print(f"{len(p.tensors)} tensors, {_count(p.n_params)} parameters, {_size(total)} of tensor data "
              f"({8 * total / max(p.n_params, 1):.2f} bits per weight); nothing written", highlight=False)
    if p.imatrix is not None:
        out.print(f"imatrix: {printable(_imatrix_line(p))}", highlight=False, soft_wrap=True, markup=False)
        _warn_imatrix_missing(p)


@app.command()
@user_errors
def info(file: Path = typer.Argument(..., help="A GGUF file.")) -> None:
    """Show a GGUF file's architecture, hyperparameters, tokenizer and tensor types."""
    from .info import read_info

    i = read_info(file)
    rows = [
        ("file", f"{i.path}  ({_size(i.size)})"),
        ("name", str(i.name)),
        ("architecture", i.architecture),
        ("file type", str(i.file_type)),
        ("parameters", f"{_count(i.n_params)}  ({8 * i.data_bytes / max(i.n_params, 1):.2f} bits per weight)"),
        ("embeddings", "tied" if i.tied_embeddings else "untied"),
    ]
    rows += [(label, f"{value:g}" if isinstance(value, float) else str(value)) for label, value in i.hparams]
    rows += [(f"tokenizer {label}", str(value)) for label, value in i.tokenizer]
    rows.append(("chat template", "yes" if i.has_chat_template else "no"))
    rows.append(("tensors", f"{i.n_tensors}: " + ", ".join(f"{k} {v}" for k, v in sorted(i.type_counts.items()))))
    print_fields(out, rows)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        out.print(f"qwen3cli {__version__}")
        raise typer.Exit()


from . import cli_bench, cli_chat, cli_eval, cli_run, cli_serve  # noqa: E402,F401  (register the commands)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every cleanup (temporary files,
    the terminal's state) runs as it does for Ctrl-C; not an Exception, so nothing swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main() -> None:
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _terminate)
    try:
        _main()
    except Terminated as t:
        raise SystemExit(128 + t.signum) from None


def _click_exceptions():
    try:  # recent typer vendors its own click
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _main() -> None:
    logging.getLogger("gguf").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry chatter; failures reach us as errors
    ex = _click_exceptions()
    try:
        rv = app(standalone_mode=False)
    except ex.NoArgsIsHelpError as e:
        e.show()  # a bare command: its help, as before
        raise SystemExit(e.exit_code) from None
    except ex.ClickException as e:
        # a usage mistake is one line like every other error (typer would draw a box), exit 2
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
        msg = " ".join(e.format_message().split())
        err.print(f"[red]error:[/red] {escape(printable(msg + hint))}", highlight=False, soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        err.print("[yellow]interrupted[/yellow]")
        raise SystemExit(130) from None
    raise SystemExit(rv if isinstance(rv, int) else 0)
