"""The Python API: load a model, generate (whole or streamed), chat over several turns, quantize.

    from qwen3cli import load, generate, stream_generate, Chat, quantize

    model = load("model.gguf")                      # a GGUF file, a checkpoint directory or a repo id
    reply = generate(model, "Why is the sky blue?", think=False, max_tokens=200)
    print(reply.text, reply.usage.completion_tokens, reply.timings.decode_tokens_per_s)

    stream = stream_generate(model, [{"role": "user", "content": "Hi"}])
    for chunk in stream:                            # chunk.thinking: part of the thinking or the answer
        print(chunk.text, end="")
    print(stream.reply.finish_reason)

    replies = batch_generate(model, ["2 + 2?", "3 + 3?"], think=False)  # decoded together

    chat = Chat(model, system="Be brief.")         # earlier turns' KV cache is reused
    chat.send("Name a prime.").text; chat.send("Another one? /no_think").text

Sampling values left out take the model's defaults for the turn's mode (Qwen's thinking or
non-thinking values, then the file's own keys where they apply: Engine.sampling). Everything
raises the library's typed errors (qwen3cli.errors.Qwen3CliError and its subclasses); nothing
prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import Qwen3CliError
from .runtime.conversation import ChatSettings, Conversation, Notice
from .runtime.batch import Request
from .runtime.batch import batch_generate as _batch
from .runtime.engine import Engine
from .runtime.generation import Done, Token
from .runtime.generation import generate as _events
from .runtime.loading import LoadHooks, open_engine
from .sampler import Overrides, Sampler, SamplingError, SamplingParams
from .text.grammar import Grammar

Messages = str | list[dict[str, Any]]
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty", "seed")


class APIUsageError(Qwen3CliError):
    """An argument the API cannot take (an unknown sampling name, a value out of range)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # thinking included
    thinking_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    prefill_s: float
    decode_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Reply:
    text: str  # the answer
    thinking: str  # the thinking, without its tags ('' when the turn did not think)
    finish_reason: str  # stop | length | context_full, + "_in_thinking" when cut inside the thinking
    usage: Usage
    timings: Timings
    notices: tuple[str, ...] = ()  # e.g. a Chat dropping its oldest turns to fit the context


@dataclass(frozen=True)
class Chunk:
    text: str
    thinking: bool  # part of the thinking (True) or of the answer
    token: int


class Stream:
    """The chunks of a reply as they are generated; `reply` once they are all read. Stopping
    early (break, close()) stops generating; `reply` is then None."""

    def __init__(self, events: Iterator[Token | Done | Notice]):
        self._events = events
        self._think: list[str] = []
        self._answer: list[str] = []
        self._notices: list[str] = []
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[Chunk]:
        for ev in self._events:
            if isinstance(ev, Notice):
                self._notices.append(ev.text)
            elif isinstance(ev, Done):
                self.reply = _reply("".join(self._think), "".join(self._answer), ev, self._notices)
            else:
                (self._think if ev.thinking else self._answer).append(ev.text)
                if ev.text:
                    yield Chunk(ev.text, ev.thinking, ev.id)

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


def _reply(thinking: str, answer: str, done: Done, notices=()) -> Reply:
    return Reply(answer.strip(), thinking.strip("\n"), done.finish_reason,
                 Usage(done.prompt_tokens, done.completion_tokens, done.thinking_tokens, done.cached_tokens),
                 Timings(done.prefill_s, done.decode_s, done.prefill_tps, done.decode_tps), tuple(notices))


def _overrides(sampling: dict[str, Any]) -> Overrides:
    """The sampling arguments given, checked against the sampler's ranges under their own names."""
    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise APIUsageError(f"unknown sampling argument {unknown[0]!r}; the API takes {', '.join(SAMPLING)}")
    over = Overrides(**{k: v for k, v in sampling.items() if v is not None})
    try:
        replace(SamplingParams(), **over.given()).validate(names={k: k for k in SAMPLING})
    except SamplingError as e:
        raise APIUsageError(str(e)) from None
    return over


def load(source: str | Path, *, ctx: int | None = None, device: str = "auto", quant: str | None = None,
         cache_type: str | None = None, threads: int | None = None, exact: bool = False,
         progress: Callable[[str, int, int], None] | None = None) -> Engine:
    """Load a model: a GGUF file (any part of a split one), a Hugging Face checkpoint directory
    (converted in memory to `quant`, default q8_0) or a hub repo id (`Qwen/Qwen3-0.6B-GGUF:Q8_0`).

    ctx: context in tokens (default: the model's, at most 8192); device: auto, cpu or cuda;
    cache_type: the KV cache's f32, f16 or q8_0 (default: f16); threads: CPU threads
    for the kernels (default: all); exact: float activations, the reference numerics, instead
    of llama.cpp's 8-bit ones; progress(what, done, total): downloads and conversions."""
    if threads is not None:
        set_threads(threads)
    return open_engine(str(source), ctx, quant or "q8_0", device, exact, cache_type, LoadHooks(progress=progress))


def set_threads(n: int) -> None:
    """The number of CPU threads the kernels use (at most what the process started with)."""
    import numba

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise APIUsageError(f"threads must be a whole number, at least 1, got {n!r}")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _messages(prompt: Messages, system: str | None) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise APIUsageError("the prompt must be a string or a list of {'role': ..., 'content': ...} messages")
    return ([{"role": "system", "content": system}] if system is not None else []) + list(prompt)


def stream_generate(model: Engine, prompt: Messages, *, think: bool | None = None, max_tokens: int | None = None,
                    thinking_budget: int | None = None, system: str | None = None, tools: list | None = None,
                    schema: dict | str | None = None, grammar: str | None = None, **sampling: Any) -> Stream:
    """Generate a reply to `prompt` (a user message, or a list of chat messages), chunk by chunk.

    think: thinking on or off (None: the model's default); max_tokens: tokens generated at
    most, thinking included (None: until the context is full); thinking_budget: thinking
    tokens after which the thinking is closed and the answer starts; schema: a JSON schema
    (dict or JSON text) the answer must validate against; grammar: a grammar in llguidance's
    Lark syntax the answer must follow (either; the thinking stays free); sampling:
    temperature, top_p, top_k, min_p, presence_penalty, repeat_penalty, seed."""
    r = _request(model, prompt, think, max_tokens, thinking_budget, system, tools, sampling, schema, grammar)
    return Stream(_events(model.model, model.tokenizer, r.ids, r.sampler, stop_ids=r.stop_ids,
                          max_tokens=r.max_tokens, opened=r.opened, thinking_budget=r.thinking_budget,
                          constraint=r.constraint, thinks=r.thinks))


def _request(model: Engine, prompt: Messages, think, max_tokens, thinking_budget, system, tools, sampling,
             schema=None, grammar=None) -> Request:
    for name, v in (("max_tokens", max_tokens), ("thinking_budget", thinking_budget)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise APIUsageError(f"{name} must be a whole number, at least 1, got {v!r}")
    over = _overrides(sampling)
    if schema is not None and grammar is not None:
        raise APIUsageError("give schema or grammar, not both")
    shape = Grammar.json_schema(schema, "schema") if schema is not None else \
        Grammar.lark(grammar, "grammar") if grammar is not None else None
    p = model.prompt(_messages(prompt, system), enable_thinking=think, tools=tools)
    matcher = shape and shape.matcher(model.tokenizer, model.loaded.stop_ids, model.args.vocab_size)
    return Request(p.ids, Sampler(model.sampling(p.thinks, over)), model.loaded.stop_ids, max_tokens, p.opened,
                   thinking_budget if p.thinks else None, matcher, p.thinks)


def generate(model: Engine, prompt: Messages, **kw: Any) -> Reply:
    """The whole reply to `prompt`; takes stream_generate's arguments."""
    stream = stream_generate(model, prompt, **kw)
    for _ in stream:
        pass
    return stream.reply


def batch_generate(model: Engine, prompts: list[Messages], *, think: bool | None = None,
                   max_tokens: int | None = None, thinking_budget: int | None = None, system: str | None = None,
                   tools: list | None = None, schema: dict | str | None = None, grammar: str | None = None,
                   parallel: int | None = None, **sampling: Any) -> list[Reply]:
    """The replies to several prompts, generated together: their decode steps run as one
    batched pass (the weights read once for all), `parallel` at a time (default: all, in
    passes of up to 8). Each reply is the one generate() gives for its prompt alone (greedy,
    or seeded sampling); takes generate's arguments, applied to every prompt."""
    if not isinstance(prompts, list) or not prompts:
        raise APIUsageError("prompts must be a non-empty list of prompts")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise APIUsageError(f"parallel must be a whole number, at least 1, got {parallel!r}")
    reqs = [_request(model, p, think, max_tokens, thinking_budget, system, tools, sampling, schema, grammar)
            for p in prompts]
    replies = []
    for events in _batch(model.model, model.tokenizer, reqs, parallel):
        stream = Stream(iter(events))
        for _ in stream:
            pass
        replies.append(stream.reply)
    return replies


class Chat:
    """A conversation: each `send` adds a user message and the reply; the KV cache of the
    earlier turns is reused; the oldest turns are dropped when the context fills (the reply's
    notices say so). A message ending in /think or /no_think switches thinking for that turn."""

    def __init__(self, model: Engine, *, system: str | None = None, think: bool | None = None,
                 thinking_budget: int | None = None, max_tokens: int | None = None, **sampling: Any):
        over = _overrides(sampling)
        values = {k: v for k, v in over.given().items() if k != "seed"}
        self._c = Conversation(model, ChatSettings(system=system, think=think, thinking_budget=thinking_budget,
                                                   max_tokens=max_tokens, seed=over.seed, sampling=values))

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The history: user and assistant messages (an assistant's thinking under "thinking")."""
        return self._c.messages

    @property
    def context_used(self) -> int:
        return self._c.context_used

    def stream(self, text: str) -> Stream:
        return Stream(self._c.send(text))

    def send(self, text: str) -> Reply:
        s = self.stream(text)
        for _ in s:
            pass
        return s.reply

    def undo(self) -> bool:
        """Forget the last exchange; False when there is none."""
        return self._c.undo()

    def reset(self) -> None:
        self._c.reset()

    def save(self, path: str | Path) -> Path:
        return self._c.save(path)

    def load(self, path: str | Path) -> list[str]:
        """Resume a saved chat (this model's settings file, or one `chat /save` wrote); returns warnings."""
        return self._c.load(path)


def quantize(src: str | Path, dst: str | Path, type: str = "q8_0", *, imatrix: str | Path | None = None,
             force: bool = False, split_max_size: int | None = None, allow_requantize: bool = False,
             progress: Callable[[str, int], None] | None = None):
    """Quantize a checkpoint directory, a BF16/F16/F32 GGUF file or a hub repo id to a GGUF
    file llama.cpp loads (type: q8_0, q4_0, q4_k_m, q5_k_m, q6_k, ... as `qwen3cli quantize`
    lists). Returns a summary (out, sizes, bits per weight, seconds). The file appears only
    when complete; split_max_size (bytes) writes llama-gguf-split's parts."""
    from .io import convert, hub

    p = Path(src).expanduser()
    if not p.exists() and hub.REPO_ID.match(str(src)):
        p = hub.fetch(str(src))
    return convert.quantize(p, dst, type, force=force, progress=progress, imatrix=imatrix,
                            split_max_size=split_max_size, allow_requantize=allow_requantize)
