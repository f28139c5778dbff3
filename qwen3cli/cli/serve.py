"""`qwen3cli serve MODEL`: the OpenAI-compatible server (the logic lives in qwen3cli/serve/)."""

from __future__ import annotations

import threading
from pathlib import Path

import typer
from rich.markup import escape

from .base import UsageError, app, err, printable, user_errors
from .load import open_engine
from .options import (Cache, looks_like_model, Ctx, Device, Exact, OptionalModel, Quant, Temp, Threads, TopK, TopP, cache_value,
                      model_or_default, set_threads, user_sampling)


def model_id(model: str) -> str:
    """What clients send as `model`: a file's name without .gguf, a directory's name, or the repo id."""
    p = Path(model)
    if p.is_file():
        return p.name[:-5] if p.name.endswith(".gguf") else p.name
    return p.resolve().name if p.is_dir() else model


@app.command()
@user_errors
def serve(
    model: OptionalModel = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    api_key: str = typer.Option(None, "--api-key", envvar="QWEN3CLI_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    alias: str = typer.Option(None, "--alias", help="The model id clients use (default: the file's name)."),
    cors_origin: list[str] = typer.Option(
        None, "--cors-origin", metavar="ORIGIN",
        help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the server; repeatable; "
             "'*' for any page. Default: none."),
    ctx: Ctx = None,
    threads: Threads = None,
    quant: Quant = "q8_0",
    device: Device = "auto",
    exact: Exact = False,
    cache: Cache = None,
    think: bool = typer.Option(None, "--think/--no-think", help="Thinking for requests that do not say (default: "
                                                                 "the model's)."),
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = None,
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", help="Longest reply for chat requests that do not "
                                                                    "set max_tokens."),
    reasoning_budget: int = typer.Option(None, "--reasoning-budget", "--thinking-budget",
                                         help="Thinking tokens for requests that set no thinking_budget or "
                                              "reasoning_effort (as llama-server's; 0: no thinking)."),
    parallel: int = typer.Option(4, "--parallel", "-np",
                                 help="Requests generated together, their decode steps batched; more wait in "
                                      "arrival order. Each has a KV cache of the whole --ctx (as ollama's), "
                                      "checked to fit at start; pages are used as tokens fill them."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each request to stderr."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models)."""
    from ..serve import make_server
    from ..serve.protocol import Sampling
    from ..serve.worker import Defaults
    from ..runtime.running import registered
    from ..serve.guard import is_loopback, valid_origin

    if not 1 <= parallel <= 64:
        raise UsageError(f"--parallel must be between 1 and 64, got {parallel}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    if ctx is not None and ctx < 1:
        raise UsageError(f"--ctx must be at least 1, got {ctx}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    for o in cors_origin or []:
        if not valid_origin(o):
            raise UsageError(f"--cors-origin takes scheme://host[:port] or '*', got {o!r}")
    for name, v in (("--max-tokens", max_tokens), ("--reasoning-budget", reasoning_budget)):
        if v is not None and v < (1 if name == "--max-tokens" else 0):
            raise UsageError(f"{name} must be at least {1 if name == '--max-tokens' else 0}, got {v}")
    sampling, _ = user_sampling(temperature=temp, top_p=top_p, top_k=top_k)
    if reasoning_budget == 0:  # llama-server's meaning: no thinking
        think, reasoning_budget = False if think is None else think, None
    defaults = Defaults(Sampling(**sampling), think, max_tokens, reasoning_budget)
    set_threads(threads)
    model = model_or_default(model)
    if not looks_like_model(model):  # a typo fails before the port is taken
        raise UsageError(f"{model}: no such file or directory")
    name = alias or model_id(model)
    log = (lambda line: err.print(line, style="dim", highlight=False, markup=False)) if verbose else None
    try:  # bind before loading: a port in use fails at once, and clients can poll /health meanwhile
        server = make_server(None, host, port, model_id=name, api_key=api_key, log=log,
                             cors_origins=cors_origin or (), defaults=defaults, parallel=parallel)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not is_loopback(host) and api_key is None:
        err.print("[yellow]listening beyond this machine without --api-key: anyone who can reach it can use it[/yellow]")
    if "*" in (cors_origin or []) and api_key is None:
        err.print("[yellow]--cors-origin '*' without --api-key: any web page you visit can use the server[/yellow]")
    thread = threading.Thread(target=server.serve_forever, name="qwen3cli-http", daemon=True)
    thread.start()
    try:
        engine = open_engine(model, ctx, quant, device, exact, cache_type=cache_value(cache))
        server.ready(engine, defaults)
        with registered("serve", model, engine.ctx, engine.model.device, url=server.url):  # listed by `ps`
            err.print(f"serving [bold]{escape(printable(name))}[/bold] at {server.url} (context {engine.ctx} tokens, "
                      f"{parallel} at once, {'GPU' if engine.model.device == 'cuda' else 'CPU'}); Ctrl-C stops",
                      highlight=False)
            while thread.is_alive():
                thread.join(0.5)  # the main thread stays free for Ctrl-C
    finally:
        server.shutdown()
        server.server_close()
