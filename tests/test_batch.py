"""Continuous batching (runtime/batch.py, serve --parallel): requests generated together get
exactly the tokens each gets alone, greedy, on random-weight tiny models (whose logits are
noise, so any numeric difference between a batched row and a lone one would show), also when
they join and leave at different steps and a long prompt is prefilled in chunks beside them."""

import itertools
import threading
import time

import numpy as np
import pytest

from qwen3cli.io.loader import load
from qwen3cli.model.forward import Model
from qwen3cli.runtime.batch import Batcher, Request, batch_generate
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.generation import Done, Token, generate
from qwen3cli.sampler import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
TEXTS = ["hello", "what is 2 + 2, and why?", "tell me a story about a long road " * 20, "x", "ok then"]


@pytest.fixture(scope="module", params=[("q8_0", False), ("q4_k_m", False), ("q4_k_m", True), ("q6_k", True)],
                ids=lambda p: f"{p[0]}-{'moe' if p[1] else 'dense'}")
def engine(gguf_model, request):
    t, moe = request.param
    path, _ = gguf_model(t, dtype="f32", moe=moe)
    return Engine(load(path), ctx=256)


def req(engine, text, max_tokens=24, sampling=GREEDY) -> Request:
    p = engine.prompt([{"role": "user", "content": text}], enable_thinking=False)
    return Request(p.ids, Sampler(sampling), engine.loaded.stop_ids, max_tokens)


def tokens(events) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def alone(engine, r: Request) -> list[int]:
    return tokens(batch_generate(engine.model, engine.tokenizer, [r], 1)[0])


def test_together_equals_alone(engine):
    reqs = [req(engine, t, max_tokens=8 + 5 * i) for i, t in enumerate(TEXTS)]  # they leave at different steps
    assert max(len(r.ids) for r in reqs) > 2 * 64  # one prompt takes several prefill chunks
    solo = [alone(engine, r) for r in reqs]
    assert len({tuple(s) for s in solo}) == len(solo)  # distinct streams: a mix-up would show
    reqs = [req(engine, t, max_tokens=8 + 5 * i) for i, t in enumerate(TEXTS)]
    together = batch_generate(engine.model, engine.tokenizer, reqs, slots=4)  # the fifth waits for a slot
    assert [tokens(evs) for evs in together] == solo
    assert all(isinstance(evs[-1], Done) and evs[-1].finish_reason == "length" for evs in together)
    # a prompt of one chunk is prefilled as generate() prefills it: the same tokens as run and chat
    short = req(engine, TEXTS[1])
    g = generate(engine.model, engine.tokenizer, short.ids, Sampler(GREEDY), stop_ids=short.stop_ids, max_tokens=13)
    assert tokens(g) == solo[1]


def test_joining_and_leaving_mid_stream(engine):
    """Requests arrive while others decode (a newcomer's prefill between their steps) and leave
    early; seeded sampling, so each stream's sampler state must stay its own too."""
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=5)
    solo = [alone(engine, req(engine, t, 20, sampling)) for t in TEXTS[:4]]
    b = Batcher(engine.model, engine.tokenizer, slots=4)
    try:
        got, tickets = [], []
        for t in TEXTS[:4]:
            tickets.append(b.submit(req(engine, t, 20, sampling)))
            it = iter(tickets[-1])
            got.append(tokens(itertools.islice(it, 3)))  # it streams before the next one joins
            tickets[-1] = it
        for it, g in zip(tickets, got):
            g += tokens(it)
        assert got == solo
        assert b.in_use == 0 and b.queued == 0
    finally:
        b.close()


def test_batched_decode_rows_equal_lone_steps(gguf_model):
    """Model.decode itself, every CPU path: int8 (default) and exact, float and quantized types."""
    for t in ("q5_k_m", "q4_0", "bf16", "f32"):
        path, _ = gguf_model(t, dtype="f32", moe=t == "q4_0")
        for exact in (False, True):
            m = Model(load(path).weights, 32, exact=exact)
            # at most 8 tokens: a float type's longer prefill goes to BLAS, whose sums follow alignment
            prompts = [[3, 4, 5], [9] * 7, [100, 7]]
            batched, lone = m.new_caches(len(prompts)), [m.new_cache() for _ in prompts]  # one pool, and apart
            for c, p in [*zip(batched, prompts), *zip(lone, prompts)]:
                m.forward(p, c)
            toks = [1, 2, 3]
            for _ in range(3):
                got = m.decode(toks, batched)
                want = np.stack([m.forward([t_], c) for t_, c in zip(toks, lone)])
                np.testing.assert_array_equal(got, want, err_msg=f"{t} exact={exact}")
                toks = [int(np.argmax(w)) for w in want]


def test_a_cancelled_request_frees_its_slot_and_the_queue_is_served_in_order(engine):
    b = Batcher(engine.model, engine.tokenizer, slots=1)
    try:
        endless = b.submit(req(engine, "go on", max_tokens=None))
        it = iter(endless)
        next(it)
        order, lock = [], threading.Lock()

        def consume(i, t):
            events = iter(t)  # one iterator: a dropped one cancels its request
            next(events)
            with lock:
                order.append(i)
            list(events)

        queued = [b.submit(req(engine, f"question {i}", max_tokens=3)) for i in range(4)]
        threads = [threading.Thread(target=consume, args=(i, t)) for i, t in enumerate(queued)]
        for th in threads:
            th.start()
        assert b.queued == 4 and b.in_use == 1
        it.close()  # the client goes away
        for th in threads:
            th.join(60)
        assert order == [0, 1, 2, 3]
        deadline = time.time() + 10
        while b.in_use and time.time() < deadline:
            time.sleep(0.01)
        assert b.in_use == 0 and b.queued == 0
    finally:
        b.close()


def test_a_request_that_leaves_while_queued_is_never_run(engine):
    b = Batcher(engine.model, engine.tokenizer, slots=1)
    try:
        busy = iter(b.submit(req(engine, "go on", max_tokens=None)))
        next(busy)
        gone = [False]
        waiting = b.submit(req(engine, "never mind"), cancelled=lambda: gone[0])
        reader = threading.Thread(target=lambda: list(waiting))
        reader.start()
        gone[0] = True
        reader.join(10)
        assert not reader.is_alive()
        busy.close()
        deadline = time.time() + 10
        while (b.in_use or b.queued) and time.time() < deadline:
            time.sleep(0.01)
        assert b.requests == 1  # the cancelled one was never admitted
    finally:
        b.close()


def test_slots_keep_their_prefix(engine):
    """A request resending its conversation lands in the slot that holds it and prefills only the rest."""
    b = Batcher(engine.model, engine.tokenizer, slots=2)
    try:
        first = req(engine, TEXTS[2], max_tokens=4)
        other = req(engine, "something else entirely", max_tokens=4)
        list(b.submit(first)), list(b.submit(other))
        again = b.submit(req(engine, TEXTS[2], max_tokens=4))
        done = list(again)[-1]
        assert done.cached_tokens == len(first.ids) - 1 == again.cached
    finally:
        b.close()


def test_too_many_caches_are_refused_before_allocating(engine, monkeypatch):
    from qwen3cli.model import memory
    from qwen3cli.model.forward import kv_cache_nbytes

    one = kv_cache_nbytes(engine.model.args, engine.model.ctx, engine.model.cache_type)
    monkeypatch.setattr(memory, "available", lambda: 10 * one)
    Batcher(engine.model, engine.tokenizer, slots=4).close()
    with pytest.raises(memory.MemoryLimitError, match=r"64 256-token KV caches .* --parallel"):
        Batcher(engine.model, engine.tokenizer, slots=64)


def test_concurrent_streaming_clients_get_what_they_get_alone(engine):
    """serve --parallel 3 with five streaming openai clients at once: two wait for a slot, and
    every client gets the text it gets when it is the only one."""
    import json
    import urllib.request

    import openai

    from qwen3cli.serve import make_server

    srv = make_server(engine, "127.0.0.1", 0, model_id="tiny", parallel=3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)

    def ask(text):
        out = []
        for ch in client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": text}], stream=True, temperature=0,
                max_tokens=12, extra_body={"chat_template_kwargs": {"enable_thinking": False}}):
            out += [c.delta.content or "" for c in ch.choices]
        return "".join(out)

    def health():
        with urllib.request.urlopen(srv.url[:-3] + "/health", timeout=10) as r:
            return json.load(r)

    try:
        solo = [ask(t) for t in TEXTS]
        got = [None] * len(TEXTS)
        seen = []

        def run(i):
            got[i] = ask(TEXTS[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TEXTS))]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            seen.append(health())
            time.sleep(0.005)
        assert got == solo
        assert max(h["slots_in_use"] for h in seen) <= 3 and all(h["slots"] == 3 for h in seen)
        print(f"\nbusiest: {max(h['slots_in_use'] for h in seen)} slots, queue {max(h['queued'] for h in seen)}; "
              f"widest decode pass {srv.worker.batcher.widest}")
        assert srv.worker.batcher.widest >= 2
        assert health()["slots_in_use"] == 0 and health()["queued"] == 0
    finally:
        srv.shutdown()
        srv.server_close()
