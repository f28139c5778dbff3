"""The library's load (loading.open_engine), drawn: a bar while a model downloads or converts,
its warnings and notes as lines, a status while the GPU compiles, a line when numba compiles."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .base import err, pause_gc, print_warnings


def prestart(model: str | None) -> None:
    """Where MODEL is a GGUF file, open it and start its tokenizer's parse now, at the top of a
    command (io/early.py); the collector pauses until the command calls base.resume_gc."""
    from ..io.early import prestart as start

    pause_gc()
    start(model)


def open_engine(model: str, ctx: int | None, quant: str, device: str = "auto", exact: bool = False,
                cache_type: str | None = None, seen: set[str] | None = None):
    """loading.open_engine with the CLI's hooks; the same arguments. seen: notes already shown
    by this command (a command that loads two models shares it, so a line shows once)."""
    from ..runtime.loading import open_engine as load_engine

    compile_watch()  # before the load: packing the weights is where a first run compiles
    with LoadView(seen) as view:
        return load_engine(model, ctx, quant, device, exact, cache_type, hooks=view.hooks())


class LoadView:
    """One load's display. The bar starts only if the load reports progress (a download or a
    conversion; a GGUF file opens too fast for one), and stops before anything else is shown:
    rich's live displays must not nest."""

    def __init__(self, seen: set[str] | None = None):
        self._seen = seen if seen is not None else set()
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._status = None

    def hooks(self):
        from ..runtime.loading import LoadHooks

        return LoadHooks(progress=self._progress, warning=self._warning, note=self._note, stage=self._stage)

    def _progress(self, what: str, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TimeRemainingColumn(), console=err, transient=True)
            self._bar.start()
        if what not in self._tasks:
            self._tasks[what] = self._bar.add_task(what, total=total)
        self._bar.update(self._tasks[what], completed=done, total=total)

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _warning(self, line: str) -> None:
        self._end_bar()
        print_warnings([line])

    def _note(self, line: str) -> None:
        self._end_bar()
        if line in self._seen:  # eval and --check load two models: the same fallback line once
            return
        self._seen.add(line)
        err.print(f"[dim]{escape(line)}[/dim]", highlight=False)

    def _stage(self, text: str | None) -> None:
        self._end_bar()
        if self._status is not None:
            self._status.stop()
            self._status = None
        if text is not None:
            self._status = err.status(f"{escape(text)}…")
            self._status.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._end_bar()
        self._stage(None)


_WATCH = None


def compile_watch():
    """The process's CompileWatch: one line on a terminal when numba first compiles, which a
    run with a warm cache never shows, whatever layouts its file uses. A line, not a live
    status: compiles can start under another live display (eval's, chat's), and rich's nested
    lives recursed without end when the outer one stopped first."""
    global _WATCH
    if _WATCH is None:
        from ..model.compiling import CompileWatch

        said = []

        def started() -> None:
            if err.is_terminal and not said:
                said.append(True)
                err.print("[dim]compiling kernels (first run only, about a minute)…[/dim]", highlight=False)

        _WATCH = CompileWatch(started).install()
    return _WATCH
