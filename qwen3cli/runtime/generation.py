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
from ..sampler import Sampler
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


Event = Token | Done


def starts_in_thinking(prompt_text: str) -> bool:
    """The generation prompt opened a think block the model is expected to continue."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


def generate(model: Model, tokenizer, prompt_ids: list[int], sampler: Sampler, *, stop_ids: frozenset[int],
             max_tokens: int | None = None, cache: KVCache | None = None,
             opened: bool = False, thinking_budget: int | None = None) -> Iterator[Event]:
    """Yield events until a stop token, max_tokens or the context end. `opened`: the prompt
    already opened a think block. The cache may hold a prefix of prompt_ids (it is reused).
    After `thinking_budget` thinking tokens the thinking is closed for the model (BUDGET_NOTE)."""
    open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
    cache = cache if cache is not None else model.new_cache()
    if len(prompt_ids) > cache.ctx:
        from ..model.forward import ContextFull

        raise ContextFull(f"the prompt has {len(prompt_ids)} tokens; the context holds {cache.ctx}")
    cache.truncate(len(prompt_ids) - 1)  # keep a shared prefix, but always run at least one token
    cached = cache.n
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids[cache.n:], cache)
    prefill_s = time.perf_counter() - t0
    decoder = StreamDecoder(tokenizer)
    generated: list[int] = []
    in_think = opened  # inside the think block now
    n_thinking, reason = 0, "length"
    fresh = True  # at the start of a thinking or answer segment: drop the template's newlines
    forced: list[int] = []  # tokens the budget makes us write instead of sampling
    n_forced = 0  # of them written: outside max_tokens and the thinking count, which are the model's
    budget_hit = False
    t1 = time.perf_counter()
    while True:
        if in_think and thinking_budget is not None and n_thinking >= thinking_budget and not budget_hit \
                and close_id is not None:
            budget_hit = True
            forced = tokenizer.encode(BUDGET_NOTE, add_special_tokens=False).ids + [close_id]
        if not forced and not np.isfinite(logits).all():
            raise NonFiniteLogits(f"{getattr(model, 'source', 'the model')}: the model computed NaN or infinite "
                                  "logits; its weights are corrupt or not what their types say")
        was_forced = bool(forced)
        tid = forced.pop(0) if forced else sampler(logits, generated)
        n_forced += was_forced
        generated.append(tid)
        if tid in stop_ids:
            reason = "stop"
            break
        if tid == open_id and not in_think:
            in_think, fresh = True, True
            yield Token(tid, "", True)
        elif tid == close_id and in_think:
            n_thinking += not was_forced
            in_think, fresh = False, True
            yield Token(tid, "", True)
        else:
            n_thinking += in_think and not was_forced
            text = decoder.push(tid)
            if fresh:
                text = text.lstrip("\n")
                fresh = not text
            yield Token(tid, text, in_think)
        if max_tokens is not None and len(generated) - n_forced >= max_tokens and not forced:
            break
        if cache.n >= cache.ctx:
            reason = "context_full"
            break
        logits = model.forward([tid], cache)
    decode_s = time.perf_counter() - t1
    if reason != "stop" and in_think:
        reason += "_in_thinking"
    yield Done(reason, len(prompt_ids), len(generated), n_thinking, prefill_s, decode_s, budget_hit, cached)


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
