"""The process around the app: signals, logging levels, and click's errors as one line."""

from __future__ import annotations

import logging
import os
import signal

import typer
from rich.markup import escape

from .base import app, err, own_process, printable


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


def process_main() -> None:
    """main() as the whole life of a process (the console script, `python -m qwen3cli`): its
    exit skips the interpreter's teardown, which freed every object of the engine, numba and
    the tokenizer one by one: 0.36 s of CPU after a `run` had printed its answer (a 0.6B
    model, one thread). Output is flushed, threads that are not daemons (a cache being
    written) are joined and exit handlers run first, as in a normal exit. Code that calls
    main() itself (tests, an embedding program) keeps the normal SystemExit."""
    own_process()
    # numpy starts OpenBLAS's thread pool on import and its worker spins ~0.1 s of CPU on the
    # other core; quant.kernels pins that BLAS to one thread anyway (threads.py), so a process
    # of ours has no use for the pool. numpy is not imported yet here; a value set by the user wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    _exit_now(code)


def _exit_now(code) -> None:
    import atexit
    import sys
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # as sys.exit: a message, printed, means failure
        print(code, file=sys.stderr)
        code = 1
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing left to say
            pass
    os._exit(code & 0xFF)


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
