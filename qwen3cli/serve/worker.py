"""The engine behind the server: requests go to a Batcher (runtime/batch.py), which runs up
to `parallel` of them together, each over a KV cache whose prefix carries over from request to
request (a client resending its conversation prefills only what is new), and queues the rest in
arrival order. Yields what the reply is made of; the HTTP layer shapes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..model.forward import ContextFull
from ..runtime.batch import Batcher, Request, Ticket
from ..runtime.engine import Engine
from ..runtime.generation import Done, PromptLogprobs
from ..sampler import Sampler, TokenLogprob
from ..text.chat_template import TemplateError
from ..text.grammar import Grammar
from ..text.tokenizer import StreamDecoder
from .answer import AnswerSplitter, ToolCall
from .protocol import APIError, ChatRequest, CompletionRequest, Sampling, usage


@dataclass(frozen=True)
class Reasoning:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last piece (asked for)


@dataclass(frozen=True)
class Content:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last piece (asked for)


@dataclass(frozen=True)
class Finish:
    reason: str  # OpenAI's: stop | length | tool_calls
    usage: dict


Piece = Reasoning | Content | ToolCall | Finish


@dataclass
class Job:
    ids: list[int]
    sampler: Sampler
    max_tokens: int | None
    stop: list[str]
    opened: bool = False  # the prompt opened the think block
    thinking_budget: int | None = None
    parse_tools: bool = False
    echo: str = ""
    grammar: Grammar | None = None
    thinks: bool = False
    logprobs: int | None = None  # the tokens' log-probabilities, with this many top ones
    reasoning_logprobs: bool = False  # the thinking's too
    prompt_logprobs: bool = False  # the prompt's too (completions' echo)


@dataclass(frozen=True)
class Defaults:
    """The server's own defaults (serve's flags): they fill in what a request leaves out."""
    sampling: Sampling = field(default_factory=Sampling)
    think: bool | None = None
    max_tokens: int | None = None
    thinking_budget: int | None = None


PARALLEL = 4  # requests decoded together by default (serve --parallel)


class Worker:
    def __init__(self, engine: Engine, defaults: Defaults | None = None, parallel: int = PARALLEL):
        self.engine = engine
        self.defaults = defaults or Defaults()
        self.batcher = Batcher(engine.model, engine.tokenizer, parallel)
        self.rng = np.random.default_rng()  # only the batcher's thread samples

    @property
    def requests(self) -> int:
        return self.batcher.requests

    @property
    def reused_tokens(self) -> int:
        return self.batcher.reused_tokens

    # -- preparing: everything that can refuse a request, before any reply is sent --------------
    def _sampler(self, s: Sampling, thinks: bool) -> Sampler:
        e = self.engine
        try:
            params = e.sampling(thinks, s)
        except ValueError as err:
            raise APIError(str(err), param="temperature") from None
        return Sampler(params, rng=None if params.seed is not None else self.rng)

    def _fits(self, ids: list[int]) -> None:
        if len(ids) >= self.engine.ctx:
            raise APIError(f"this request has {len(ids)} prompt tokens; the model's context holds "
                           f"{self.engine.ctx} (the server's --ctx)", param="messages",
                           code="context_length_exceeded")

    def _sampling(self, s: Sampling) -> Sampling:
        return Sampling(**{**self.defaults.sampling.given(), **s.given()})

    def prepare_chat(self, req: ChatRequest) -> Job:
        d = self.defaults
        think = req.enable_thinking if req.enable_thinking is not None else d.think
        budget = req.thinking_budget if req.thinking_budget is not None else d.thinking_budget
        max_tokens = req.max_tokens if req.max_tokens is not None else d.max_tokens
        try:
            p = self.engine.prompt(req.messages, enable_thinking=think, tools=req.tools)
        except TemplateError as err:  # e.g. the template's own raise_exception on a role order it refuses
            raise APIError(str(err), param="messages") from None
        except ContextFull as err:  # too long to be worth tokenizing
            raise APIError(str(err), param="messages", code="context_length_exceeded") from None
        self._fits(p.ids)
        return Job(p.ids, self._sampler(self._sampling(req.sampling), p.thinks), max_tokens, req.stop,
                   opened=p.opened, thinking_budget=budget if p.thinks else None, parse_tools=req.parse_tools,
                   grammar=req.grammar, thinks=p.thinks, logprobs=req.logprobs,
                   reasoning_logprobs=req.reasoning_logprobs)

    def prepare_completion(self, req: CompletionRequest) -> Job:
        tok = self.engine.tokenizer
        if isinstance(req.prompt, list):
            self._fits(req.prompt)
            vocab = self.engine.args.vocab_size
            bad = next((t for t in req.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(f"'prompt' has token id {bad}; this model's ids are 0 to {vocab - 1}", param="prompt")
            ids, text = req.prompt, tok.decode(req.prompt, skip_special_tokens=False) if req.echo else ""
        else:
            try:
                self.engine.check_size(req.prompt)
            except ContextFull as err:
                raise APIError(str(err), param="prompt", code="context_length_exceeded") from None
            ids, text = tok.encode(req.prompt, add_special_tokens=False).ids, req.prompt
        self._fits(ids)
        return Job(ids, self._sampler(self._sampling(req.sampling), False), req.max_tokens, req.stop,
                   echo=text if req.echo else "", grammar=req.grammar, logprobs=req.logprobs,
                   prompt_logprobs=req.echo and req.logprobs is not None)

    # -- running ----------------------------------------------------------------------------------
    def _submit(self, job: Job, opened: bool, cancelled: Callable[[], bool]) -> Ticket:
        e = self.engine
        matcher = job.grammar.matcher(e.tokenizer, e.loaded.stop_ids, e.args.vocab_size) if job.grammar else None
        # max_tokens 0 (a prompt scored, nothing written): the batcher runs one step, its token unsaid
        return self.batcher.submit(Request(job.ids, job.sampler, e.loaded.stop_ids,
                                           1 if job.max_tokens == 0 else job.max_tokens, opened,
                                           job.thinking_budget, matcher, job.thinks, job.logprobs,
                                           job.prompt_logprobs), cancelled)

    def run_chat(self, job: Job, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Piece]:
        """Reasoning and Content deltas, ToolCalls as their blocks close, then one Finish.
        Stops without a Finish when `cancelled()` turns true (the client went away)."""
        answer = AnswerSplitter(tools=job.parse_tools, stops=job.stop, trim=True)
        thought = AnswerSplitter(trim=True)  # only to drop the newlines before </think>
        ticket = self._submit(job, job.opened, cancelled)
        done, n, n_think = None, 0, 0
        # a token's log-probability rides on the next piece of its kind: text held back (a
        # possible marker) or lifted out (a tool call) still has its tokens counted
        said, thought_lp = _Pending(Content), _Pending(Reasoning)
        try:
            for ev in ticket:
                if isinstance(ev, Done):
                    done = ev
                    break
                n, n_think = n + 1, n_think + ev.thinking
                if ev.thinking:
                    if job.reasoning_logprobs:
                        thought_lp.add(ev.logprob)
                    yield from (thought_lp.piece(t) for t in thought.push(ev.text))
                else:
                    said.add(ev.logprob)
                    yield from (x if isinstance(x, ToolCall) else said.piece(x) for x in answer.push(ev.text))
                    if answer.stopped:
                        break
                if cancelled():
                    return
        finally:
            ticket.close()
        if done is None and cancelled():  # the client left while queued
            return
        yield from (x if isinstance(x, ToolCall) else said.piece(x) for x in answer.finish())
        yield from thought_lp.rest()
        yield from said.rest()
        if done is None:  # a stop string ended it
            yield Finish("stop", usage(len(job.ids), n, n_think, ticket.cached))
            return
        if done.finish_reason == "stop":
            reason = "tool_calls" if answer.calls else "stop"
        else:  # length, context_full, and either of them inside the thinking: never an empty success
            reason = "length"
        yield Finish(reason, usage(done.prompt_tokens, done.completion_tokens, done.thinking_tokens,
                                   done.cached_tokens))

    def run_completion(self, job: Job, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Content | Finish]:
        """Raw text (think tags included: there is no template to say what they mean)."""
        text = AnswerSplitter(stops=job.stop)
        decoder = StreamDecoder(self.engine.tokenizer)
        ticket = self._submit(job, False, cancelled)
        if job.echo and not job.prompt_logprobs:
            yield Content(job.echo)
        done, n = None, 0
        said = _Pending(Content)
        try:
            for ev in ticket:
                if isinstance(ev, Done):
                    done = ev
                    break
                if isinstance(ev, PromptLogprobs):
                    yield Content(job.echo, tuple(ev.logprobs))
                    continue
                if job.max_tokens == 0:
                    break
                n += 1
                said.add(ev.logprob)
                yield from (said.piece(t) for t in text.push(decoder.push(ev.id)))
                if text.stopped or cancelled():
                    break
        finally:
            ticket.close()
        if cancelled():
            return
        yield from (said.piece(t) for t in text.finish())
        yield from said.rest()
        if job.max_tokens == 0:
            yield Finish("length", usage(len(job.ids), 0, 0, ticket.cached))
        elif done is None:
            yield Finish("stop", usage(len(job.ids), n, 0, ticket.cached))
        else:
            yield Finish("stop" if done.finish_reason == "stop" else "length",
                         usage(done.prompt_tokens, done.completion_tokens, 0, done.cached_tokens))


class _Pending:
    """Log-probabilities of tokens whose text has not gone out yet, for the next piece."""

    def __init__(self, kind: type):
        self.kind, self.held = kind, []

    def add(self, lp: TokenLogprob | None) -> None:
        if lp is not None:
            self.held.append(lp)

    def piece(self, text: str):
        out, self.held = self.kind(text, tuple(self.held)), []
        return out

    def rest(self) -> list:
        return [self.piece("")] if self.held else []
