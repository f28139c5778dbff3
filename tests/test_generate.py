"""Generation events: thinking split at the think tags (also when the prompt opened it), finish
reasons, KV prefix reuse. The model is a tiny real one; a scripted sampler picks the tokens."""

import numpy as np
import pytest

from qwen3cli.io.loader import load
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.generation import Done, Token, collect, generate
from qwen3cli.sampler import Sampler, SamplingParams


class Scripted:
    """Returns the given ids in order (a stand-in for sampling, so outputs are known)."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.seen_logits = []

    def __call__(self, logits, generated):
        self.seen_logits.append(np.array(logits))
        return self.ids[len(generated)]


@pytest.fixture(scope="module")
def engine(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    return Engine(load(path), ctx=64)


def ids(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False).ids


def special(engine, tok):
    return engine.tokenizer.token_to_id(tok)


def script(engine, *parts):
    out = []
    for p in parts:
        out += [special(engine, p)] if p.startswith("<") and p.endswith(">") else ids(engine, p)
    return out


def test_thinking_then_answer(engine):
    p = engine.prompt([{"role": "user", "content": "Hi"}])
    assert p.thinks and not p.opened
    s = script(engine, "<think>", "\nLet me pónder 😀.\n", "</think>", "\n\nHello wörld", "<|im_end|>")
    events = list(generate(engine.model, engine.tokenizer, p.ids, Scripted(s), stop_ids=engine.loaded.stop_ids))
    r = collect(iter(events))
    assert r.thinking == "Let me pónder 😀." and r.answer == "Hello wörld"
    assert r.done.finish_reason == "stop" and r.done.completion_tokens == len(s)
    assert r.done.thinking_tokens == len(ids(engine, "\nLet me pónder 😀.\n")) + 1
    assert not any(isinstance(e, Token) and "think>" in e.text for e in events)


def test_opened_by_prompt(engine):
    # Thinking-2507 style: the generation prompt ends in "<think>\n"; the model only closes it
    p = engine.prompt([{"role": "user", "content": "Hi"}])
    prompt = p.ids + ids(engine, "<think>\n")
    s = script(engine, "an idea", "</think>", "\n\nanswer", "<|endoftext|>")
    r = collect(generate(engine.model, engine.tokenizer, prompt, Scripted(s), stop_ids=engine.loaded.stop_ids,
                         opened=True))
    assert (r.thinking, r.answer, r.done.finish_reason) == ("an idea", "answer", "stop")


def test_no_think_prompt_has_empty_block_and_answer_only(engine):
    p = engine.prompt([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert not p.thinks and p.text.endswith("<think>\n\n</think>\n\n")
    r = collect(generate(engine.model, engine.tokenizer, p.ids, Scripted(script(engine, "plain", "<|im_end|>")),
                         stop_ids=engine.loaded.stop_ids))
    assert (r.thinking, r.answer) == ("", "plain")


def test_out_of_tokens_inside_thinking_says_so(engine):
    p = engine.prompt([{"role": "user", "content": "Hi"}])
    s = script(engine, "<think>", "a b c d e f g h")
    r = collect(generate(engine.model, engine.tokenizer, p.ids, Scripted(s), stop_ids=engine.loaded.stop_ids,
                         max_tokens=4))
    assert r.done.finish_reason == "length_in_thinking" and r.done.completion_tokens == 4 and r.answer == ""


def test_context_full(engine):
    p = engine.prompt([{"role": "user", "content": "Hi"}])
    room = engine.ctx - len(p.ids)
    r = collect(generate(engine.model, engine.tokenizer, p.ids, Sampler(SamplingParams(temperature=0)),
                         stop_ids=frozenset()))
    assert r.done.finish_reason in ("context_full", "context_full_in_thinking")
    assert r.done.completion_tokens == room + 1  # the last sampled token needs no cache slot


def test_greedy_is_deterministic_and_reuses_a_prefix(engine):
    p = engine.prompt([{"role": "user", "content": "Tell me"}], enable_thinking=False)
    greedy = Sampler(SamplingParams(temperature=0))
    a = [e.id for e in generate(engine.model, engine.tokenizer, p.ids, greedy, stop_ids=frozenset(), max_tokens=6)
         if isinstance(e, Token)]
    cache = engine.model.new_cache()
    list(generate(engine.model, engine.tokenizer, p.ids[:-3] + [11, 12], greedy, stop_ids=frozenset(),
                  max_tokens=2, cache=cache))
    cache.truncate(len(p.ids) - 3)  # the shared prefix stays; the rest is recomputed
    b = [e.id for e in generate(engine.model, engine.tokenizer, p.ids, greedy, stop_ids=frozenset(), max_tokens=6,
                                cache=cache) if isinstance(e, Token)]
    assert a == b


def test_done_speeds(engine):
    p = engine.prompt([{"role": "user", "content": "Hi"}])
    evs = list(generate(engine.model, engine.tokenizer, p.ids, Sampler(SamplingParams(seed=0)),
                        stop_ids=frozenset(), max_tokens=5))
    d = evs[-1]
    assert isinstance(d, Done) and d.prefill_tps > 0 and d.decode_tps > 0 and d.prompt_tokens == len(p.ids)


class Counting:
    """Returns the given ids in order of its own calls (forced tokens do not advance it)."""

    def __init__(self, ids):
        self.ids, self.n = list(ids), 0

    def __call__(self, logits, generated):
        self.n += 1
        return self.ids[self.n - 1]


def test_the_budget_note_is_outside_max_tokens_and_the_thinking_count(engine):
    from qwen3cli.runtime.generation import BUDGET_NOTE

    p = engine.prompt([{"role": "user", "content": "Hi"}])
    hmm = ids(engine, " hmm")
    s = script(engine, "<think>") + hmm * 3 + ids(engine, " yes yes yes yes")  # the model, after the note
    r = collect(generate(engine.model, engine.tokenizer, p.ids, Counting(s), stop_ids=engine.loaded.stop_ids,
                         max_tokens=1 + 3 * len(hmm) + 2, thinking_budget=3 * len(hmm)))
    note = len(ids(engine, BUDGET_NOTE)) + 1  # and the closing tag
    assert r.done.budget_hit and r.done.thinking_tokens == 3 * len(hmm)
    assert r.answer.strip() == "yes yes" and r.done.finish_reason == "length"  # -n left room for the answer
    assert r.done.completion_tokens == 1 + 3 * len(hmm) + 2 + note
