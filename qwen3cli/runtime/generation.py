"""Generation as a generator of events, so front ends only render.

`generate()` prefills the prompt, then samples token by token, yielding a Token event per
token (its text delta, whether it belongs to the thinking) and one Done event with the finish
reason, the counts and the speeds. Thinking is split from the answer on the `<think>` /
`</think>` token ids, also when the opening tag came from the prompt (Thinking-2507).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import Qwen3CliError
from ..model.forward import Model
from ..model.kv_cache import KVCache
from ..sampler import Sampler, TokenLogprob, log_softmax, token_logprob
from ..text.tokenizer import StreamDecoder

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Qwen's recipe for a thinking budget: when it is spent, say so in the thinking and close it.
BUDGET_NOTE = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"


class NonFiniteLogits(Qwen3CliError):
    """The forward pass produced NaN or infinite logits: corrupt (or wrongly typed) weights."""


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the printable delta ('' for the think tags and stop tokens)
    thinking: bool
    # asked for with Generation(logprobs=): of the model's own distribution, before the
    # penalties, temperature, filters and grammar mask (OpenAI's definition)
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens' log-probabilities, each given the tokens before it (the first has
    none: nothing predicts it). Comes before a request's first Token when it asked for them."""
    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | context_full, with "_in_thinking" when cut inside the thinking
    prompt_tokens: int
    completion_tokens: int
    thinking_tokens: int
    prefill_s: float
    decode_s: float
    budget_hit: bool = False  # the thinking budget closed the thinking
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache (not prefilled)

    @property
    def prefill_tps(self) -> float:
        """Tokens computed per second: those reused from the cache took no time."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s and self.completion_tokens > 1 else 0.0


Event = Token | PromptLogprobs | Done


def starts_in_thinking(prompt_text: str) -> bool:
    """The generation prompt opened a think block the model is expected to continue."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


class Generation:
    """One sequence's token loop after its prefill, a step at a time: `step(logits)` picks the
    next token from the last one's logits and returns its events; `next` is then the token to
    run through the model (None once finished, the last event a Done). generate() drives one;
    the batcher (batch.py) drives many through one forward pass per step."""

    def __init__(self, tokenizer, sampler: Sampler, *, stop_ids: frozenset[int], max_tokens: int | None = None,
                 opened: bool = False, thinking_budget: int | None = None, prompt_tokens: int = 0,
                 cached_tokens: int = 0, prefill_s: float = 0.0, source: str = "the model",
                 constraint=None, thinks: bool = False, logprobs: int | None = None):
        """constraint: a grammar.Matcher the answer must follow; thinking stays free (a thinking
        turn's first token may be <think> instead, and the grammar starts after </think>).
        logprobs: each Token carries its log-probability and this many top alternatives."""
        self.tokenizer, self.sampler, self.stop_ids = tokenizer, sampler, stop_ids
        self.max_tokens, self.thinking_budget = max_tokens, thinking_budget
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        self.prefill_s, self.source = prefill_s, source
        self.open_id, self.close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
        self.decoder = StreamDecoder(tokenizer)
        self.generated: list[int] = []
        self.in_think = opened  # inside the think block now
        self.n_thinking = 0
        self.fresh = True  # at the start of a thinking or answer segment: drop the template's newlines
        self.forced: list[int] = []  # tokens the budget makes us write instead of sampling
        self.n_forced = 0  # of them written: outside max_tokens and the thinking count, which are the model's
        self.budget_hit = False
        self.next: int | None = None
        self.done: Done | None = None
        self.constraint = constraint
        self.may_open = thinks and not opened  # the first token may open the thinking
        self.answering = False  # the constraint has taken a token: think tags are text from now on
        self.logprobs = logprobs
        self.t1 = time.perf_counter()

    def step(self, logits: np.ndarray, room: bool = True) -> list[Event]:
        """The events of the token these logits give; `room`: the cache has a position left for
        it to run at (False ends the generation with context_full)."""
        if self.in_think and self.thinking_budget is not None and self.n_thinking >= self.thinking_budget \
                and not self.budget_hit and self.close_id is not None:
            self.budget_hit = True
            self.forced = self.tokenizer.encode(BUDGET_NOTE, add_special_tokens=False).ids + [self.close_id]
        if not self.forced and not np.isfinite(logits).all():
            raise NonFiniteLogits(f"{self.source}: the model computed NaN or infinite "
                                  "logits; its weights are corrupt or not what their types say")
        was_forced = bool(self.forced)
        raw = logits
        constrained = self.constraint is not None and not self.in_think and not was_forced
        if constrained:
            masked = self.constraint.mask(logits)
            if self.may_open and self.open_id is not None:
                masked[self.open_id] = logits[self.open_id]
            logits = masked
        tid = self.forced.pop(0) if self.forced else self.sampler(logits, self.generated)
        opening = self.may_open and tid == self.open_id
        self.may_open = False
        if constrained and tid not in self.stop_ids and not opening:
            self.constraint.consume(tid)
            self.answering = True
        self.n_forced += was_forced
        self.generated.append(tid)
        self.next = None
        if tid in self.stop_ids:
            return [self._finish("stop")]
        lp = None if self.logprobs is None else token_logprob(log_softmax(raw), tid, self.logprobs)
        if tid == self.open_id and not self.in_think and not self.answering:
            self.in_think, self.fresh = True, True
            events: list[Event] = [Token(tid, "", True, lp)]
        elif tid == self.close_id and self.in_think:
            self.n_thinking += not was_forced
            self.in_think, self.fresh = False, True
            events = [Token(tid, "", True, lp)]
        else:
            self.n_thinking += self.in_think and not was_forced
            text = self.decoder.push(tid)
            if self.fresh:
                text = text.lstrip("\n")
                self.fresh = not text
            events = [Token(tid, text, self.in_think, lp)]
        if self.max_tokens is not None and len(self.generated) - self.n_forced >= self.max_tokens and not self.forced:
            events.append(self._finish("length"))
        elif not room:
            events.append(self._finish("context_full"))
        else:
            self.next = tid
        return events

    def _finish(self, reason: str) -> Done:
        if reason != "stop" and self.in_think:
            reason += "_in_thinking"
        self.done = Done(reason, self.prompt_tokens, len(self.generated), self.n_thinking, self.prefill_s,
                         time.perf_counter() - self.t1, self.budget_hit, self.cached_tokens)
        return self.done


def check_prompt(prompt_ids: list[int], ctx: int) -> None:
    if len(prompt_ids) > ctx:
        from ..model.forward import ContextFull

        raise ContextFull(f"the prompt has {len(prompt_ids)} tokens; the context holds {ctx}")


def generate(model: Model, tokenizer, prompt_ids: list[int], sampler: Sampler, *, stop_ids: frozenset[int],
             max_tokens: int | None = None, cache: KVCache | None = None,
             opened: bool = False, thinking_budget: int | None = None, constraint=None,
             thinks: bool = False) -> Iterator[Event]:
    """Yield events until a stop token, max_tokens or the context end. `opened`: the prompt
    already opened a think block. The cache may hold a prefix of prompt_ids (it is reused).
    After `thinking_budget` thinking tokens the thinking is closed for the model (BUDGET_NOTE).
    constraint, thinks: see Generation."""
    cache = cache if cache is not None else model.new_cache()
    check_prompt(prompt_ids, cache.ctx)
    cache.truncate(len(prompt_ids) - 1)  # keep a shared prefix, but always run at least one token
    cached = cache.n
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids[cache.n:], cache)
    g = Generation(tokenizer, sampler, stop_ids=stop_ids, max_tokens=max_tokens, opened=opened,
                   thinking_budget=thinking_budget, prompt_tokens=len(prompt_ids), cached_tokens=cached,
                   prefill_s=time.perf_counter() - t0, source=getattr(model, "source", "the model"),
                   constraint=constraint, thinks=thinks)
    while True:
        yield from g.step(logits, cache.n < cache.ctx)
        if g.next is None:
            return
        logits = model.forward([g.next], cache)


@dataclass
class Reply:
    """The text of a finished generation, thinking and answer apart, as the template strips them."""
    thinking: str
    answer: str
    done: Done


def collect(events: Iterator[Event]) -> Reply:
    think, answer, done = [], [], None
    for ev in events:
        if isinstance(ev, Done):
            done = ev
        else:
            (think if ev.thinking else answer).append(ev.text)
    return Reply("".join(think).strip("\n"), "".join(answer).lstrip("\n"), done)
