"""`qwen3cli chat MODEL`: the command. The terminal UI (prompt_toolkit, rich) and the
conversation are imported when it runs, so that `qwen3cli --help` and the other commands do
not pay for them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .base import UsageError, app, err, keep_until_exit, printable, resume_gc, user_errors
from .load import open_engine, prestart
from .options import (Cache, Ctx, Device, Exact, MinP, OptionalModel, Presence, Quant, Repeat, Seed, System, Temp,
                      ThinkingBudget, ThinkingDisplay, Threads, TopK, TopP, cache_value, model_or_default,
                      set_threads, user_sampling)


def __getattr__(name: str):
    """The UI's names (ChatUI, make_prompt_session, ...) stay importable from here, loaded on use."""
    from . import chat_ui

    try:
        return getattr(chat_ui, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


@app.command()
@user_errors
def chat(
    model: OptionalModel = None,
    system: System = None,
    think: bool = typer.Option(None, "--think/--no-think", help="Start with thinking on or off (default: the model's)."),
    thinking_display: ThinkingDisplay = "show",
    thinking_budget: ThinkingBudget = None,
    ctx: Ctx = None,
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", help="Longest reply in tokens."),
    temp: Temp = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    presence_penalty: Presence = None,
    repeat_penalty: Repeat = None,
    seed: Seed = None,
    threads: Threads = None,
    quant: Quant = "q8_0",
    device: Device = "auto",
    exact: Exact = False,
    cache: Cache = None,
    load_file: Path = typer.Option(None, "--load", help="Resume a chat saved with /save."),
    markdown: bool = typer.Option(False, "--markdown", help="Render finished answers as Markdown."),
) -> None:
    """Chat with a model. /help inside lists the commands."""
    prestart(model)  # before the imports below, which take numba's ~0.3 s
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from .chat_ui import DISPLAYS, ChatUI, make_prompt_session
    from ..runtime.conversation import ChatSettings, Conversation
    from ..runtime.running import registered

    if thinking_display not in DISPLAYS:
        raise UsageError(f"--thinking must be one of {', '.join(DISPLAYS)}, got {thinking_display!r}")
    for name, v in (("--ctx", ctx), ("--max-tokens", max_tokens), ("--thinking-budget", thinking_budget)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    sampling, seed = user_sampling(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                   presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, seed=seed)
    set_threads(threads)
    model = model_or_default(model)
    engine = open_engine(model, ctx, quant, device, exact, cache_type=cache_value(cache))
    keep_until_exit(engine)
    resume_gc()
    conv = Conversation(engine, ChatSettings(system=system, think=think, thinking_budget=thinking_budget,
                                             max_tokens=max_tokens, seed=seed, sampling=sampling))
    if load_file is not None:
        # what this command line says wins over what the file saved
        for warning in conv.load(load_file, keep=conv.settings):
            err.print(Text(f"warning: {printable(warning)}", style="yellow"))
        err.print(Text(f"loaded {len(conv.messages)} messages from {printable(str(load_file))} "
                       f"({conv.context_used} tokens of context)", style="dim"))
    console = Console(highlight=False)
    ui = ChatUI(conv, console, make_prompt_session(), display=thinking_display, markdown=markdown)
    note = {"always": "this model always thinks", "never": "this model never thinks"}.get(engine.mode, "")
    gpu = "GPU · " if engine.model.device == "cuda" else ""
    err.print(f"[dim]{escape(printable(engine.loaded.name))} · {gpu}context {engine.ctx} · {note + ' · ' if note else ''}"
              "/help for commands, Ctrl-D to exit[/dim]")
    with registered("chat", model, engine.ctx, engine.model.device):  # `qwen3cli ps` lists it meanwhile
        ui.loop()
