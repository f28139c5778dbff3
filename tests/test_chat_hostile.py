"""Hostile chat state (issue 13, class 7): saved chats with wrong types, /set with bad values, a
history longer than the context, and errors nobody expected. The REPL never dies from an input:
it says one line, keeps the conversation, and the next message works."""

import json
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import clean_error, run_cli
from qwen3cli.runtime import conversation as conv_mod
from qwen3cli.cli.chat import ChatUI
from qwen3cli.runtime.conversation import SAMPLING_KEYS, ChatSettings, Conversation, Notice
from qwen3cli.sampler import Sampler
from test_chat import drive, engine, fake  # noqa: F401 (fixtures)

GOOD = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "Answer.", "thinking": "I ponder."}]
SETTING_KEYS = ("system", "think", "thinking_budget", "max_tokens", "seed", "sampling")


def chat_file(tmp_path, settings=None, messages=None, name="chat.json"):
    f = tmp_path / name
    f.write_text(json.dumps({"format": "qwen3cli-chat", "version": 1, "model": "m", "settings": settings or {},
                             "messages": GOOD if messages is None else messages}))
    return f


def answered(conv, text="hello") -> bool:
    return conv.messages[-1] == {"role": "assistant", "content": "Answer.", "thinking": "I ponder.",
                                 "finish_reason": "stop"} and conv.messages[-2]["content"] == text


def usable(conv) -> None:
    """The settings drive a real sampler: a NaN temperature would fail here, not only in a later turn."""
    for thinking in (True, False):
        Sampler(conv.params(thinking), rng=conv.rng)(np.linspace(0, 1, 32), [1, 2])


# -- /load: every field of the wrong type ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
VALID = {"system": st.none() | st.text(max_size=10), "think": st.none() | st.booleans(),
         "thinking_budget": st.none() | st.integers(1, 10**6), "max_tokens": st.none() | st.integers(1, 10**6),
         "seed": st.none() | st.integers(0, 2**64 - 1), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
         "top_k": st.integers(0, 100), "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2),
         "repeat_penalty": st.floats(0.5, 2), "think_field": st.none() | st.booleans(), "thinking": st.text(max_size=5),
         "finish_reason": st.sampled_from(["stop", "length"]), "interrupted": st.booleans()}


def valid_or_not(key, valid_share=1):  # a file that loads must work too: many values are valid
    if key not in VALID:
        return json_values
    return st.sampled_from([True] * valid_share + [False]).flatmap(lambda ok: VALID[key] if ok else json_values)


sampling_dicts = st.dictionaries(st.sampled_from([*SAMPLING_KEYS, "top_q"]), json_values, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: valid_or_not(k) for k in d}))
settings_dicts = st.dictionaries(st.sampled_from([*SETTING_KEYS, "bogus"]), json_values, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: sampling_dicts | json_values if k == "sampling" else valid_or_not(k) for k in d}))
message_lists = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=20)},
    optional={"think": valid_or_not("think_field", 6), "thinking": valid_or_not("thinking", 6),
              "finish_reason": valid_or_not("finish_reason", 6), "interrupted": valid_or_not("interrupted", 6),
              "tool_calls": json_values}), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(settings_dicts, message_lists)
def test_loading_any_saved_chat_keeps_the_repl(engine, fake, tmp_path, saved_settings, saved_messages):  # noqa: F811
    fake()
    f = chat_file(tmp_path, saved_settings, saved_messages, name=f"chat{time.monotonic_ns()}.json")
    before = Conversation(engine, ChatSettings(system="keep me"))
    before.messages = [dict(m) for m in GOOD]
    conv, out = drive(engine, f"/load {f}\rhello\r/exit\r", conv=before)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    if "loaded " in out:  # the file was good enough: its settings are valid through and through
        assert not errors
        assert conv.settings.system != "keep me" or saved_settings.get("system") == "keep me"
        usable(conv)
    else:  # refused in one line naming the file (and the setting), the old conversation kept
        assert len(errors) == 1 and str(f) in errors[0], out
        assert "settings" in errors[0] or "message" in errors[0], errors[0]
        assert conv.settings.system == "keep me" and conv.messages[:2] == GOOD
    assert answered(conv), out


@pytest.mark.parametrize("bad", [{"seed": "abc"}, {"seed": -1}, {"seed": True}, {"seed": 1.5}, {"seed": 2**64},
                                 {"sampling": []}, {"sampling": {"presence_penalty": 2.5}},
                                 {"sampling": {"temperature": "hot"}}, {"sampling": {"temperature": math.nan}},
                                 {"sampling": {"top_p": math.inf}}, {"sampling": {"top_k": 2.0}},
                                 {"sampling": {"min_p": 7}}, {"think": "yes"}, {"max_tokens": 0},
                                 {"thinking_budget": [1]}, {"system": 5}],
                         ids=lambda d: json.dumps(d))
def test_a_wrong_setting_refuses_the_file_naming_it(engine, fake, tmp_path, bad):  # noqa: F811
    fake()
    f = chat_file(tmp_path, bad)
    conv = Conversation(engine)
    with pytest.raises(Exception) as e:
        conv.load(f)
    key = next(iter(bad)) if "sampling" not in bad or not bad["sampling"] else f"sampling.{next(iter(bad['sampling']))}"
    assert str(e.value).startswith(f"{f}: settings.{key} must be "), str(e.value)
    assert conv.messages == [] and conv.settings == ChatSettings()


def test_unknown_keys_are_ignored_with_a_warning(engine, fake, tmp_path):  # noqa: F811
    fake()
    f = chat_file(tmp_path, {"seed": 7, "future_knob": 1, "sampling": {"top_k": 5, "top_q": 3}},
                  [{"role": "user", "content": "a", "tool_calls": []}, {"role": "assistant", "content": "b"}])
    conv, out = drive(engine, f"/load {f}\rhello\r/exit\r")
    said = " ".join(out.split())  # the console wraps long lines
    assert "ignored unknown settings: 'future_knob', 'sampling.top_q'" in said
    assert "ignored unknown message fields: 'tool_calls'" in said
    assert conv.settings.sampling == {"top_k": 5}
    assert conv.settings.seed == 7 and "tool_calls" not in conv.messages[0] and answered(conv)


# -- /set with bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize("command,setting", [
    ("/set temp nan", "temperature"), ("/set temp inf", "temperature"), ("/set temp -1", "temperature"),
    ("/set temp hot", "temperature"), ("/set top_p nan", "top_p"), ("/set top_p 0", "top_p"),
    ("/set top_k 1e9", "top_k"), ("/set top_k -3", "top_k"), ("/set min_p 2", "min_p"),
    ("/set presence_penalty -inf", "presence_penalty"), ("/set repeat_penalty 0", "repeat_penalty"),
    ("/set presence_penalty 3", "presence_penalty"), ("/set max_tokens 0", "max_tokens"),
    ("/set max_tokens lots", "max_tokens"), ("/set seed -1", "seed"), ("/set seed 1.5", "seed"),
    ("/set seed 18446744073709551616", "seed")])
def test_set_refuses_bad_values_naming_the_setting(engine, fake, command, setting):  # noqa: F811
    fake()
    conv = Conversation(engine, ChatSettings(seed=3, sampling={"temperature": 0.5}))
    conv.messages = [dict(m) for m in GOOD]
    conv, out = drive(engine, f"{command}\rhello\r/exit\r", conv=conv)
    assert f"usage: /set {setting} VALUE, " in out, out
    assert conv.settings == ChatSettings(seed=3, sampling={"temperature": 0.5}) and conv.messages[:2] == GOOD
    assert answered(conv)
    usable(conv)


def test_budget_with_a_digit_int_cannot_read(engine, fake):  # noqa: F811
    fake()
    conv, out = drive(engine, "/budget ²\rhello\r/exit\r")
    assert "usage: /budget" in out and conv.settings.thinking_budget is None and answered(conv)


# -- a history longer than the context --------------------------------------------------------------

def long_history(exchanges: int, words: int = 20, word: str = "word ") -> list[dict]:
    out = []
    for i in range(exchanges):
        out += [{"role": "user", "content": f"question {i} " + word * words},
                {"role": "assistant", "content": f"answer {i} " + word * words}]
    return out


@pytest.mark.parametrize("exchanges,words,word", [(3000, 20, "word "), (40, 20_000, "word "), (300, 2000, "漢字漢字 ")],
                         ids=["3000 exchanges", "8 MB", "3 bytes a character"])
def test_a_loaded_history_longer_than_the_context_drops_the_oldest(engine, fake, tmp_path, exchanges, words, word):  # noqa: F811
    # (3 bytes a character: cut by characters, what is left can still be more bytes than any
    # tokenization of the context holds, which the engine refuses to tokenize: still trimmed)
    fake()
    f = chat_file(tmp_path, {}, long_history(exchanges, words, word))
    t0 = time.monotonic()
    conv, out = drive(engine, f"/load {f}\rhello\rhello again\r/exit\r")
    assert time.monotonic() - t0 < 30
    assert "context full: dropped the oldest " in out and "error" not in out, out
    assert answered(conv, "hello again")
    kept = conv.messages[:-4]  # what is left of the loaded history
    if words > 1000:  # one of these exchanges alone is longer than the context
        assert kept == []
        return
    # as few as possible went: one more exchange of the old history would not fit
    room = engine.ctx - min(conv.settings.max_tokens or 1024, engine.ctx // 4)
    first = int(kept[0]["content"].split()[1])
    probe = Conversation(engine)
    probe.messages = long_history(exchanges, words, word)[2 * first - 2:2 * first] + conv.messages[:-1]
    assert len(engine.prompt(probe.template_messages()).ids) > room


def test_live_chat_still_drops_one_exchange_at_a_time(gguf_model, fake):
    from qwen3cli.runtime.engine import Engine
    from qwen3cli.io.loader import load

    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    fake(thought="t", answer="a")
    conv = Conversation(Engine(load(path), ctx=96), ChatSettings(max_tokens=8))
    notices = []
    for i in range(6):
        notices += [e.text for e in conv.send(f"message number {i} " * 2) if isinstance(e, Notice)]
    assert notices and all(n.startswith("context full: dropped the oldest exchange (") for n in notices)


# -- the last line of defence -----------------------------------------------------------------------

def test_an_unexpected_error_in_a_turn_keeps_the_conversation(engine, fake, monkeypatch):  # noqa: F811
    fake()
    conv = Conversation(engine)
    conv.messages = [dict(m) for m in GOOD]
    real = engine.prompt
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the unexpected")
        return real(*a, **k)

    monkeypatch.setattr(engine, "prompt", flaky)
    conv, out = drive(engine, "boom\rhello\r/exit\r", conv=conv)
    assert "error: unexpected RuntimeError: the unexpected" in out and "Traceback" not in out
    assert conv.messages[:2] == GOOD and "boom" not in [m["content"] for m in conv.messages]
    assert answered(conv)


def test_an_unexpected_error_in_a_command_keeps_the_conversation(engine, fake, monkeypatch):  # noqa: F811
    fake()
    monkeypatch.setattr(ChatUI, "_stats", lambda self: 1 / 0)
    conv, out = drive(engine, "/stats\rhello\r/exit\r")
    assert "error: unexpected ZeroDivisionError" in out and answered(conv)


def test_an_unexpected_error_while_generating_keeps_the_partial_reply(engine, fake, monkeypatch):  # noqa: F811
    f = fake()

    class Boom(Exception):
        pass

    def failing(logits, generated):
        if len(generated) == 2:
            raise Boom("mid-reply")
        return f(logits, generated)

    monkeypatch.setattr(conv_mod, "Sampler", lambda params, rng=None: failing)
    conv, out = drive(engine, "first\r/exit\r", display="collapse")
    assert "error: unexpected Boom: mid-reply" in out
    assert conv.messages[-1]["interrupted"] and conv.messages[-2]["content"] == "first"


# -- through the CLI ----------------------------------------------------------------------------------

def test_cli_load_of_a_bad_file_is_one_error_line(gguf_model, tmp_path):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    f = chat_file(tmp_path, {"seed": "abc", "sampling": {"temperature": "hot"}})
    r = run_cli("chat", path, "--load", f, input="", timeout=120)
    clean_error(r, str(f), "settings.seed")
