"""The CLI's root: the typer app, its consoles and the helpers every command shares.

A leaf: it imports no command module, so that any command module can import it alone.
Typed errors from the library become one red line on stderr and exit code 1; Ctrl-C is exit
130. Only the CLI prints.
"""

from __future__ import annotations

import gc
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..errors import USER_ERRORS, Qwen3CliError
from ..safe_text import printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run Qwen3 models locally; quantize checkpoints to llama.cpp-compatible GGUF.",
)
out = Console()
err = Console(stderr=True)


_whole_process = False  # process_main (entry.py) runs this process, which ends in os._exit
_kept: list = []
_gc_paused = False


def own_process() -> None:
    """process_main runs the process: what follows may hold memory and the collector for the
    process's life. A caller of main() itself (tests, an embedding program) is left as it was."""
    global _whole_process
    _whole_process = True


def keep_until_exit(obj) -> None:
    """Hold obj until the process ends. An engine freed when its command returned unmapped its
    weights and KV cache first (~20 ms of a `run`, after the answer); os._exit leaves that to
    the kernel's teardown of the whole process."""
    if _whole_process:
        _kept.append(obj)


def pause_gc() -> None:
    """Stop the cyclic collector until resume_gc. A start allocates ~100k objects that live as
    long as the process (modules, numba's types, the engine) and next to no garbage, yet the
    collections it set off walked them all: 50-90 ms of a warm `run`'s start (two full ones),
    6 ms with the pause from prestart on."""
    global _gc_paused
    if _whole_process and gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """The start is over: its objects go to the collector's permanent generation (gc.freeze),
    which later collections do not walk, and collecting resumes. The few cycles that died
    during the start are frozen with them (a full run's start collected ~1,300 objects)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


class UsageError(Qwen3CliError):
    """A flag's value the command cannot use: one red line, as the library's errors."""


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


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def count_text(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        out.print(f"qwen3cli {__version__}")
        raise typer.Exit()


def print_warnings(lines: list[str]) -> None:
    """The library's warnings (optional inputs it left out), one yellow line each."""
    for line in lines:
        err.print(f"[yellow]warning:[/yellow] {escape(printable(line))}", highlight=False, soft_wrap=True)


def tidy_help(app: typer.Typer) -> None:
    """Help as a CLI user reads it: a flag shows no `<bool>` value column, and an argument
    without its own metavar is named in capitals (MODEL, not typer's `{model}`). Set once on
    every registered command's parameters, so no command has to remember."""
    import inspect
    import typing

    for command in app.registered_commands:
        for name, p in inspect.signature(command.callback, eval_str=True).parameters.items():
            ann, info = p.annotation, p.default
            if typing.get_origin(ann) is typing.Annotated:
                ann, info = typing.get_args(ann)[0], typing.get_args(ann)[1]
            if getattr(info, "metavar", "") is not None:
                continue
            if isinstance(info, typer.models.ArgumentInfo):
                info.metavar = name.upper()
            elif ann in (bool, typing.Optional[bool]):
                info.metavar = ""
