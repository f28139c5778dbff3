"""`qwen3cli run MODEL "prompt"`: one prompt, the answer streamed to stdout.

stdout carries only the answer (clean for pipes); thinking goes to stderr, dimmed, or
nowhere with --hide-thinking. --json prints one object at the end instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .base import UsageError, app, err, keep_until_exit, resume_gc, user_errors
from .load import open_engine, prestart
from .options import (Cache, Ctx, Device, Exact, MinP, OptionalModel, Presence, Quant, Repeat, Seed, System, Temp,
                      THINKING_DISPLAYS, ThinkingBudget, ThinkingDisplay, Threads, TopK, TopP, cache_value,
                      looks_like_model, mode_note, model_or_default, set_threads, user_sampling)

MAX_PROMPT_BYTES = 64 << 20  # a 128K-token context holds well under 1 MB of text: this is only a bound


def read_prompt(prompt: str | None, file: Path | None = None) -> str:
    """The prompt: the argument, then the file's text (-f, as llama-cli's), then what stdin pipes."""
    from quant.files import InputFileError, read_text

    text_file = None
    if file is not None:
        try:
            text_file = read_text(file, MAX_PROMPT_BYTES, "prompt file")
        except InputFileError as e:
            raise UsageError(str(e)) from None
    piped = None
    if sys.stdin is not None and not sys.stdin.isatty():
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream (tests): it is already decoded
            piped = sys.stdin.read(MAX_PROMPT_BYTES + 1)
            raw = piped.encode("utf-8", "surrogatepass")
        else:
            raw = stream.read(MAX_PROMPT_BYTES + 1)
        if len(raw) > MAX_PROMPT_BYTES:
            raise UsageError(f"stdin: more than {MAX_PROMPT_BYTES >> 20} MB of prompt")
        try:
            piped = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin: not UTF-8 text (byte {e.start})") from None
    parts = [p for p in (prompt, text_file, piped) if p and p.strip()]
    if not parts:
        raise UsageError("no prompt: give one as an argument or pipe it on stdin")
    return "\n\n".join(parts)


def answer_grammar(json_schema: Path | None, grammar: Path | None):
    """The grammar of run's --json-schema or --grammar file, checked (a bad one is the file's error)."""
    if json_schema is None and grammar is None:
        return None
    if json_schema is not None and grammar is not None:
        raise UsageError("give --json-schema or --grammar, not both")
    from ..text.grammar import Grammar

    path = json_schema or grammar
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return Grammar.json_schema(text, str(path)) if json_schema else Grammar.lark(text, str(path))


@app.command()
@user_errors
def run(
    model: OptionalModel = None,
    prompt: str = typer.Argument(None, help="The prompt; read from stdin when piped (both are joined)."),
    file: Path = typer.Option(None, "--file", "-f", help="Read the prompt (or more of it) from FILE, as llama-cli -f."),
    think: bool = typer.Option(None, "--think/--no-think", help="Thinking on or off (default: the model's)."),
    thinking_display: ThinkingDisplay = "show",
    show_thinking: bool = typer.Option(None, "--show-thinking/--hide-thinking", hidden=True,
                                       help="--thinking show / hide, as before."),
    thinking_budget: ThinkingBudget = None,
    system: System = None,
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", help="Stop after this many tokens (default: the context)."),
    ctx: Ctx = None,
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, thinking, finish_reason, counts, timings."),
    json_schema: Path = typer.Option(None, "--json-schema", metavar="FILE",
                                     help="The answer is JSON that validates against the schema in FILE "
                                          "(thinking stays free)."),
    grammar: Path = typer.Option(None, "--grammar", metavar="FILE",
                                 help="The answer follows the grammar in FILE (llguidance's Lark syntax)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speeds to stderr at the end."),
) -> None:
    """Answer one prompt and exit."""
    import time

    prestart(model)  # before the imports below, which take numba's ~0.3 s
    from ..runtime.generation import Done, generate
    from ..model.forward import ContextFull
    from ..sampler import Overrides, Sampler

    t_start = time.perf_counter()
    if thinking_display not in THINKING_DISPLAYS:
        raise UsageError(f"--thinking must be one of {', '.join(THINKING_DISPLAYS)}, got {thinking_display!r}")
    if show_thinking is not None:  # the older spelling
        thinking_display = "show" if show_thinking else "hide"
    for name, v in (("--ctx", ctx), ("--max-tokens", max_tokens), ("--thinking-budget", thinking_budget)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    user, seed = user_sampling(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                               presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, seed=seed)
    if model is not None and prompt is None and not looks_like_model(model):  # `run "a question"`
        model, prompt = None, model
    text = read_prompt(prompt, file)
    shape = answer_grammar(json_schema, grammar)  # checked before the model loads
    model = model_or_default(model)
    set_threads(threads)
    engine = open_engine(model, ctx, quant, device, exact, cache_type=cache_value(cache))
    keep_until_exit(engine)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    p = engine.prompt(messages, enable_thinking=think)
    note = mode_note(engine, think)
    if note:
        err.print(f"[dim]{note}[/dim]", highlight=False)
    if len(p.ids) >= engine.ctx:
        raise ContextFull(f"the prompt has {len(p.ids)} tokens but the context holds {engine.ctx}; "
                          "raise --ctx or shorten the prompt")
    try:
        params = engine.sampling(p.thinks, Overrides(seed=seed, **user))
    except ValueError as e:
        raise UsageError(str(e)) from None

    answer, thinking, done, first_token_s = [], [], None, None
    in_think_display = False
    for ev in generate(engine.model, engine.tokenizer, p.ids, Sampler(params), stop_ids=engine.loaded.stop_ids,
                       max_tokens=max_tokens, opened=p.opened,
                       thinking_budget=thinking_budget if p.thinks else None, thinks=p.thinks,
                       constraint=shape and shape.matcher(engine.tokenizer, engine.loaded.stop_ids,
                                                          engine.args.vocab_size)):
        if isinstance(ev, Done):
            done = ev
            break
        if first_token_s is None:
            first_token_s = time.perf_counter() - t_start
            resume_gc()
        (thinking if ev.thinking else answer).append(ev.text)
        if as_json or not ev.text:
            continue
        if ev.thinking:
            if thinking_display == "show":
                in_think_display = True
                err.print(ev.text, end="", style="dim", highlight=False, markup=False, soft_wrap=True)
        else:
            if in_think_display:
                err.print()
                in_think_display = False
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    total_s = time.perf_counter() - t_start
    answer_text, thinking_text = "".join(answer), "".join(thinking).strip("\n")
    if as_json:
        print(json.dumps({
            "answer": answer_text, "thinking": thinking_text, "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "thinking_tokens": done.thinking_tokens, "device": engine.model.device,
            "timings": {"time_to_first_token_s": round(first_token_s or total_s, 4), "prefill_s": round(done.prefill_s, 4),
                        "decode_s": round(done.decode_s, 4), "prefill_tokens_per_s": round(done.prefill_tps, 2),
                        "decode_tokens_per_s": round(done.decode_tps, 2), "total_s": round(total_s, 4)},
        }, ensure_ascii=False))
        return
    if in_think_display:
        err.print()
    if thinking_display == "collapse" and done.thinking_tokens:
        hit = ", budget hit" if done.budget_hit else ""
        err.print(f"[dim](thought for {done.thinking_tokens} tokens{hit}; --thinking show streams it)[/dim]",
                  highlight=False)
    if answer_text and not answer_text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if done.finish_reason != "stop":
        where = " inside the thinking, before any answer" if done.finish_reason.endswith("_in_thinking") else ""
        why = "--max-tokens" if done.finish_reason.startswith("length") else "the context size (--ctx)"
        err.print(f"[yellow]stopped at {why}{where}[/yellow]")
    if verbose:
        err.print(f"[dim]prompt {done.prompt_tokens} tokens, {done.prefill_tps:.1f} tok/s; "
                  f"generated {done.completion_tokens} tokens, {done.decode_tps:.1f} tok/s; "
                  f"first token after {first_token_s or total_s:.2f} s[/dim]")
