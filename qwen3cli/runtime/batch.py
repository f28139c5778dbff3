"""Continuous batching: many generations over one model, their decode steps run together.

A Batcher owns `slots` KV caches of the model's whole context each (as ollama's parallel
requests: every request may fill the window) and one thread that runs the model. Requests wait
in arrival order for a free slot. Each step of the thread:

1. drops cancelled requests (a client that went away) at once;
2. admits waiting requests into free slots: the one sharing the longest prefix with the
   prompt where that prefix is over half of the slot's tokens or of the prompt (a client
   resending its conversation prefills only what is new), else the least recently used one,
   so a stranger's request does not evict a conversation (llama-server's rule, with its
   default similarity of 0.5);
3. prefills one chunk (`chunk` tokens) of the earliest request still prefilling, so a long
   prompt delays the running streams by a chunk's time per step, not by its whole prefill;
4. runs one decode pass for every generating sequence (Model.decode: the weights read once
   for all of them), and hands each its events.

A sequence's prompt is prefilled in the same chunks and each decode row computed as a lone row
(Model.decode), so what a request generates does not depend on the others beside it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from ..model.forward import DECODE_ROWS, Model
from ..sampler import Sampler, log_softmax, token_logprob
from .generation import Done, Event, Generation, PromptLogprobs, check_prompt
from .prefix_cache import common_prefix

CHUNK = 64  # prompt tokens a step prefills (~0.5 s on the 0.6B shape with 2 threads)
POLL_S = 0.2  # how often a consumer waiting on its first event asks whether its client is still there


@dataclass
class Request:
    ids: list[int]
    sampler: Sampler
    stop_ids: frozenset[int]
    max_tokens: int | None = None
    opened: bool = False  # the prompt opened the think block
    thinking_budget: int | None = None
    constraint: object = None  # a text.grammar.Matcher for the answer
    thinks: bool = False  # the turn is expected to think (the constraint waits for </think>)
    logprobs: int | None = None  # each Token's log-probability, with this many top alternatives
    prompt_logprobs: bool = False  # a PromptLogprobs event first (the prompt is prefilled whole)


class Ticket:
    """A submitted request: iterate for its events (the last a Done); close() cancels it."""

    def __init__(self, batcher: "Batcher", req: Request, cancelled: Callable[[], bool]):
        self.batcher, self.req, self._cancelled = batcher, req, cancelled
        self.events: queue.Queue = queue.Queue()
        self.closed = False
        self.cached = 0  # prompt tokens found in the slot's cache (set when admitted)

    def __iter__(self) -> Iterator[Event]:
        try:
            while not self.closed:
                try:
                    ev = self.events.get(timeout=POLL_S)
                except queue.Empty:
                    if self._cancelled():
                        return
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.batcher._wake()


class _Slot:
    def __init__(self, kv):
        self.kv = kv
        self.ids: list[int] = []  # the tokens whose keys and values kv holds
        self.ticket: Ticket | None = None
        self.gen: Generation | None = None  # None while the prompt is prefilled
        self.prefill_s = 0.0
        self.prompt_logprobs: list = []  # gathered chunk by chunk, when the request asks
        self.since = 0  # admission order, for fairness between prefilling requests


class Batcher:
    def __init__(self, model: Model, tokenizer, slots: int = 4, chunk: int = CHUNK):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk
        self.slots = [_Slot(kv) for kv in model.new_caches(slots)]
        self.waiting: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._admitted = 0
        self._stopping = False
        self.requests = 0  # admitted so far
        self.reused_tokens = 0  # prompt tokens whose KV came from an earlier request
        self.widest = 0  # the most sequences one decode pass has run
        self._thread: threading.Thread | None = None

    # -- the consumers' side ------------------------------------------------------------------
    def submit(self, req: Request, cancelled: Callable[[], bool] = lambda: False) -> Ticket:
        """Queue a request; its events come through the ticket. `cancelled` is asked while the
        consumer waits for an event (a client that leaves while queued frees its place)."""
        check_prompt(req.ids, self.model.ctx)
        t = Ticket(self, req, cancelled)
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qwen3cli-batcher", daemon=True)
                self._thread.start()
            self.waiting.append(t)
            self._cv.notify_all()
        return t

    @property
    def in_use(self) -> int:
        return sum(s.ticket is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the model's thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or self.waiting or self.in_use)
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit()
            try:
                self._prefill_one()
                self._decode_all()
            except Exception as e:  # the model failed (not one request's sampling): all of them hear it
                for s in self.slots:
                    if s.ticket is not None:
                        self._free(s, e)

    def _drop_cancelled(self) -> None:
        self.waiting = deque(t for t in self.waiting if not t.closed)
        for s in self.slots:
            if s.ticket is not None and s.ticket.closed:
                self._free(s)

    def _admit(self) -> None:
        while self.waiting and (free := [s for s in self.slots if s.ticket is None]):
            t = self.waiting.popleft()
            ids = t.req.ids
            best = max(free, key=lambda s: common_prefix(s.ids, ids))  # the first of equals: stable
            shared = common_prefix(best.ids, ids)
            s = best if 2 * shared > min(len(best.ids), len(ids)) else min(free, key=lambda s: s.since)
            # always run at least one token; all of them when their logits are asked for (a
            # cached prefix has its keys and values, not its logits)
            s.kv.truncate(0 if t.req.prompt_logprobs else min(common_prefix(s.ids, ids), len(ids) - 1))
            s.ids = ids[:s.kv.n]
            s.ticket, s.gen, s.prefill_s, s.prompt_logprobs = t, None, 0.0, []
            self._admitted += 1
            s.since = self._admitted
            t.cached = s.kv.n
            self.requests += 1
            self.reused_tokens += s.kv.n

    def _prefill_one(self) -> None:
        pending = [s for s in self.slots if s.ticket is not None and s.gen is None]
        if not pending:
            return
        s = min(pending, key=lambda s: s.since)
        ids = s.ticket.req.ids
        at = s.kv.n
        # chunks end at multiples of `chunk`: where a prompt's are cut depends on it alone
        end = min(len(ids), (at // self.chunk + 1) * self.chunk)
        r = s.ticket.req
        t0 = time.perf_counter()
        logits = self.model.forward(ids[at:end], s.kv, all_logits=r.prompt_logprobs)
        if r.prompt_logprobs:
            if at == 0:
                s.prompt_logprobs.append(None)
            # row j predicts token at+j+1; the last row of the last chunk predicts the first generated one
            rows = log_softmax(logits[:min(end, len(ids) - 1) - at])
            s.prompt_logprobs += [token_logprob(lp, ids[at + 1 + j], r.logprobs or 0) for j, lp in enumerate(rows)]
            logits = logits[-1]
        s.prefill_s += time.perf_counter() - t0
        s.ids = ids[:end]
        if end < len(ids):
            return
        if r.prompt_logprobs:
            s.ticket.events.put(PromptLogprobs(s.prompt_logprobs))
        s.gen = Generation(self.tokenizer, r.sampler, stop_ids=r.stop_ids, max_tokens=r.max_tokens, opened=r.opened,
                           thinking_budget=r.thinking_budget, prompt_tokens=len(ids), cached_tokens=s.ticket.cached,
                           prefill_s=s.prefill_s, source=getattr(self.model, "source", "the model"),
                           constraint=r.constraint, thinks=r.thinks, logprobs=r.logprobs)
        self._step(s, logits)

    def _decode_all(self) -> None:
        running = [s for s in self.slots if s.gen is not None and s.gen.next is not None and not s.ticket.closed]
        for i in range(0, len(running), DECODE_ROWS):
            group = running[i:i + DECODE_ROWS]
            self.widest = max(self.widest, len(group))
            logits = self.model.decode([s.gen.next for s in group], [s.kv for s in group])
            for s, row in zip(group, logits):
                s.ids.append(s.gen.next)
                self._step(s, row)

    def _step(self, s: _Slot, logits) -> None:
        try:
            events = s.gen.step(logits, s.kv.n < s.kv.ctx)
        except Exception as e:  # this request's logits (NaN) or sampler: it alone ends
            self._free(s, e)
            return
        for ev in events:
            s.ticket.events.put(ev)
        if s.gen.next is None:
            self._free(s)

    def _free(self, s: _Slot, error: BaseException | None = None) -> None:
        if error is not None:
            s.ticket.events.put(error)
        s.ids = s.ids[:s.kv.n]
        s.ticket, s.gen = None, None


def batch_generate(model: Model, tokenizer, requests: list[Request], slots: int | None = None) -> list[list[Event]]:
    """Run the requests together (up to `slots` at once, default all, at most DECODE_ROWS a
    decode pass, more in turn) and return each one's events, in the requests' order."""
    b = Batcher(model, tokenizer, slots or len(requests))
    try:
        tickets = [b.submit(r) for r in requests]
        return [list(t) for t in tickets]
    finally:
        b.close()
