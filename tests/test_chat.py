"""The chat: Conversation logic against transformers' template, and the REPL driven through
prompt_toolkit's pipe input on a tiny model (a fake sampler decides what the model "says")."""

import io
import json

import pytest
import transformers
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from checkpoints import TOKENIZER
from qwen3cli.runtime import conversation as conv_mod
from qwen3cli.runtime import prefix_cache as prefix_mod
from qwen3cli.cli.chat import ChatUI, make_prompt_session
from qwen3cli.runtime.conversation import ChatSettings, Conversation, Notice, common_prefix, split_soft_switch
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.generation import BUDGET_NOTE, Done
from qwen3cli.io.loader import load


@pytest.fixture(scope="module")
def engine(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    return Engine(load(path), ctx=512)


class FakeModel:
    """Stands in for sampling: thinks `thought`, answers `answer`, stops. Records every call."""

    def __init__(self, engine, thought="I ponder.", answer="Answer.", think_forever=False, interrupt_at=None):
        enc = lambda s: engine.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        self.tid = engine.tokenizer.token_to_id
        self.thought, self.answer = enc(f"\n{thought}\n"), enc(f"\n\n{answer}") + [self.tid("<|im_end|>")]
        self.word = enc(" hmm")[0]
        self.think_forever, self.interrupt_at = think_forever, interrupt_at
        self.params, self.opened = [], None

    def factory(self, params, rng=None):
        self.params.append(params)
        return self

    def __call__(self, logits, generated):
        if self.interrupt_at is not None and len(generated) == self.interrupt_at:
            raise KeyboardInterrupt
        close = self.tid("</think>")
        if close in generated:  # answer after the (possibly forced) close
            return self.answer[len(generated) - generated.index(close) - 1]
        if self.opened:  # the prompt already ended the thinking (no_think): answer
            return self.answer[len(generated)]
        if self.think_forever:
            return self.tid("<think>") if not generated else self.word
        seq = [self.tid("<think>")] + self.thought + [close]
        return seq[len(generated)]


@pytest.fixture
def fake(engine, monkeypatch):
    made = {}

    def install(**kw):
        f = FakeModel(engine, **kw)
        real_generate = prefix_mod.generate

        def recording_generate(model, tok, prompt_ids, sampler, **k):
            f.prompts = getattr(f, "prompts", []) + [list(prompt_ids)]
            f.opened = engine.tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False).endswith("</think>\n\n")
            return real_generate(model, tok, prompt_ids, sampler, **k)

        monkeypatch.setattr(conv_mod, "Sampler", f.factory)
        monkeypatch.setattr(prefix_mod, "generate", recording_generate)
        made["f"] = f
        return f

    return install


def drive(engine, keys: str, settings=None, display="show", conv=None, width=120):
    conv = conv or Conversation(engine, settings or ChatSettings())
    out = io.StringIO()
    with create_pipe_input() as inp:
        session = make_prompt_session(input=inp, output=DummyOutput(), history=InMemoryHistory())
        ui = ChatUI(conv, Console(file=out, width=width), session, display=display)
        inp.send_text(keys)
        ui.loop()
    return conv, out.getvalue()


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)


def test_soft_switch_parsing():
    assert split_soft_switch("Explain X /no_think") == ("Explain X", False)
    assert split_soft_switch("Explain X /think  ") == ("Explain X", True)
    assert split_soft_switch("path/no_think") == ("path/no_think", None)
    assert split_soft_switch("plain") == ("plain", None)


def test_multi_turn_tokens_equal_transformers_and_only_new_tokens_are_prefilled(engine, fake, hf_tok):
    f = fake(thought="Let me add.", answer="It is 4.")
    conv = Conversation(engine, ChatSettings(system="Be brief."))
    list(conv.send("2+2?"))
    assert conv.messages[-1] == {"role": "assistant", "content": "It is 4.", "thinking": "Let me add.",
                                 "finish_reason": "stop"}
    done = [e for e in conv.send("and 3+3?") if isinstance(e, Done)][0]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "<think>\nLet me add.\n</think>\n\nIt is 4."},
               {"role": "user", "content": "and 3+3?"}]
    want = hf_tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert f.prompts[1] == list(want)
    # the first prompt is a prefix of the second: only the rest (old answer + new message) is prefilled
    assert done.cached_tokens == len(f.prompts[0]) == common_prefix(f.prompts[0], f.prompts[1])
    assert conv.total_reused == done.cached_tokens


def test_no_think_switches_template_and_sampling(engine, fake):
    f = fake()
    conv, out = drive(engine, "/no_think\rhello\r/exit\r")
    assert engine.tokenizer.decode(f.prompts[0], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    assert (f.params[0].temperature, f.params[0].top_p) == (0.7, 0.8)
    assert conv.messages[-1]["content"] == "Answer." and conv.messages[-1]["thinking"] == ""
    assert "thinking…" not in out  # an empty think block is never shown


def test_trailing_switch_is_for_one_turn_and_removed(engine, fake):
    f = fake()
    conv, _ = drive(engine, "first /think\rsecond\r/exit\r", settings=ChatSettings(think=False))
    texts = [engine.tokenizer.decode(p, skip_special_tokens=False) for p in f.prompts]
    assert texts[0].endswith("<|im_start|>assistant\n") and texts[1].endswith("</think>\n\n")
    assert conv.messages[0]["content"] == "first" and "user\nfirst<|im_end|>" in texts[1]
    assert (f.params[0].temperature, f.params[1].temperature) == (0.6, 0.7)


@pytest.mark.parametrize("display", ["show", "collapse", "hide"])
def test_thinking_display(engine, fake, display):
    fake(thought="SECRET-THOUGHT", answer="visible answer")
    conv, out = drive(engine, f"/thinking {display}\rq\r/last_thinking\r/exit\r")
    before_last = out.split("visible answer")[0]
    assert ("SECRET-THOUGHT" in before_last) == (display == "show")
    assert ("thought for" in out) == (display == "collapse")
    assert out.count("SECRET-THOUGHT") == (2 if display == "show" else 1)  # /last_thinking reprints it
    assert "visible answer" in out and "<think>" not in out


def test_budget_closes_the_thinking(engine, fake):
    fake(think_forever=True, answer="done")
    conv, out = drive(engine, "/budget 5\rq\r/exit\r", display="collapse")
    assert "budget hit) · /last_thinking" in out
    r = conv.messages[-1]
    assert r["content"] == "done" and r["thinking"].endswith(BUDGET_NOTE.strip())
    assert r["thinking"].count("hmm") == 5  # exactly the budget, then the note
    assert "thinking budget hit" in out and conv.last.budget_hit


def test_reset_retry_undo_save_load(engine, fake, tmp_path):
    fake()
    save = tmp_path / "chat.json"
    conv, out = drive(engine, f"one\rtwo\r/retry\r/save {save}\r/undo\r/exit\r")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    saved = json.loads(save.read_text())
    assert [m["content"] for m in saved["messages"]] == ["one", "Answer.", "two", "Answer."]
    conv2, _ = drive(engine, f"/load {save}\r/exit\r")
    assert conv2.messages == saved["messages"] and conv2.settings == conv.settings
    conv3, out3 = drive(engine, "/reset\r/exit\r", conv=conv2)
    assert conv3.messages == [] and conv3.context_used == 0 and "cleared" in out3
    _, out4 = drive(engine, f"/load {tmp_path / 'missing.json'}\r/exit\r")
    assert "no such file" in out4


def test_unknown_command_is_not_sent(engine, fake):
    f = fake()
    conv, out = drive(engine, "/thnik\r/exit\r")
    assert conv.messages == [] and not getattr(f, "prompts", None)
    assert "unknown command /thnik" in out and "/think" in out


def test_set_and_stats(engine, fake):
    f = fake()
    conv, out = drive(engine, "/set temp 0.2\r/set top_k 5\r/set top_p 7\rhi\r/set\r/stats\r/exit\r")
    assert f.params[0].temperature == 0.2 and f.params[0].top_k == 5
    assert "usage: /set" in out  # top_p 7 is refused
    assert "reused" in out and "context" in out


def test_ctrl_c_during_generation_keeps_the_session(engine, fake):
    f = fake(interrupt_at=3)
    conv, out = drive(engine, "first\r/exit\r")
    assert conv.messages[-1]["interrupted"] and "interrupted" in out
    f.interrupt_at = None
    list(conv.send("second"))
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[-1]["content"] == "Answer."


def test_ctrl_c_at_empty_prompt_asks_then_exits(engine, fake):
    conv, out = drive(engine, "\x03\x03")
    assert "Ctrl-C again" in out


def test_context_overflow_drops_the_oldest_turn(gguf_model, fake):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    small = Engine(load(path), ctx=96)
    fake(thought="t", answer="a")
    conv = Conversation(small, ChatSettings(max_tokens=8))
    notices = []
    for i in range(6):
        notices += [e for e in conv.send(f"message number {i} " * 2) if isinstance(e, Notice)]
    assert notices and "dropped the oldest" in notices[0].text
    assert conv.messages[-2]["content"].startswith("message number 5")
    assert conv.messages[0]["content"] != "message number 0 message number 0"
    with pytest.raises(conv_mod.ContextFull):
        list(conv.send("word " * 200))
    assert conv.messages[-2]["content"].startswith("message number 5")  # the refused message is not kept


def test_chat_command_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from qwen3cli.cli import app

    for args, needle in ((["chat", str(tmp_path / "none.gguf")], "no such file"),
                         (["chat", "x.gguf", "--thinking", "loud"], "--thinking"),
                         (["chat", "x.gguf", "--ctx", "0"], "--ctx"),
                         (["chat", "x.gguf", "--temp", "-2"], "--temp must be >= 0")):
        r = CliRunner().invoke(app, args)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], (args, r.stderr)


def test_flags_win_over_a_loaded_chat_and_its_context_shows(engine, fake, tmp_path):
    fake()
    save = tmp_path / "chat.json"
    conv, _ = drive(engine, f"/set max_tokens 50\r/budget 9\r/set temp 0.3\rone\r/save {save}\r/exit\r",
                    settings=ChatSettings(system="Old."))
    fresh = Conversation(engine, ChatSettings(max_tokens=3, sampling={"top_k": 4}))
    fresh.load(save, keep=fresh.settings)
    s = fresh.settings
    assert (s.max_tokens, s.thinking_budget, s.system, s.sampling) == (3, 9, "Old.", {"temperature": 0.3, "top_k": 4})
    assert fresh.cache.n == 0 and fresh.context_used > 10  # what the history will take, before it is computed


def test_block_is_one_history_entry_reset_forgets_stats_and_suggestions_fit(engine, fake):
    fake()
    conv = Conversation(engine, ChatSettings())
    out = io.StringIO()
    with create_pipe_input() as inp:
        session = make_prompt_session(input=inp, output=DummyOutput(), history=InMemoryHistory())
        ui = ChatUI(conv, Console(file=out, width=120), session)
        inp.send_text('"""line one\rline two"""\r/stats\r/reset\r/stats\r/thi hide\r/exit\r')
        ui.loop()
        history = list(session.history.get_strings())
    text = out.getvalue()
    assert conv.messages == []  # reset
    assert '"""line one\nline two"""' in history and not any(h.startswith("line two") for h in history)
    assert text.count("last turn") == 1  # the /stats after /reset has no last turn
    assert "did you mean /thinking?" in text


def test_stats_give_no_rate_for_a_few_prefilled_tokens(engine):
    conv = Conversation(engine, ChatSettings())
    out = io.StringIO()
    ui = ChatUI(conv, Console(file=out, width=120), None)
    conv.last = Done("stop", 40, 5, 0, 1e-5, 0.1, cached_tokens=39)
    ui.command("/stats")
    assert "prefilled 1)" in out.getvalue() and "tok/s" not in out.getvalue().split("last turn")[1].split("\n")[0]
    assert conv.last.prefill_tps == 1 / 1e-5  # the rate counts computed tokens only


def test_markdown_streams_a_tail_that_fits_then_renders_whole(engine, fake):
    from qwen3cli.cli import chat_ui

    assert chat_ui._tail("a\nb\nc\nd", 2) == "c\nd" and chat_ui._tail("a", 0) == "a"
    fake(answer="\n".join(f"line {i}" for i in range(60)))
    conv = Conversation(engine, ChatSettings(think=False))
    out = io.StringIO()
    with create_pipe_input() as inp:
        session = make_prompt_session(input=inp, output=DummyOutput(), history=InMemoryHistory())
        ui = ChatUI(conv, Console(file=out, width=80, height=10), session, markdown=True)
        inp.send_text("go\r/exit\r")
        ui.loop()
    assert all(f"line {i}" in out.getvalue() for i in range(60))  # the end render has every line


# -- long inputs: /file, the overflow warning, the refusal ------------------------------------------

def ui_for(conv):
    """A ChatUI whose commands are called directly; returns it and its output buffer."""
    out = io.StringIO()
    return ChatUI(conv, Console(file=out, width=400), None), out


def hf_ids(hf_tok, messages):
    return list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_file_goes_into_the_next_message_in_order(engine, fake, hf_tok, tmp_path):
    f = fake(answer="Seen.")
    (tmp_path / "notes.txt").write_text("The secret number is 42.\n")
    (tmp_path / "code.md").write_text("Run:\n```sh\nmake\n```\n")  # a fence inside: ours must be longer
    conv, out = drive(engine, f"/file {tmp_path / 'notes.txt'}\r/file '{tmp_path / 'code.md'}'\r"
                              "what is it?\rand now?\r/exit\r")
    want = ("notes.txt:\n```\nThe secret number is 42.\n```\n\n"
            "code.md:\n````\nRun:\n```sh\nmake\n```\n````\n\nwhat is it?")
    assert conv.messages[0]["content"] == want
    assert f.prompts[0] == hf_ids(hf_tok, [{"role": "user", "content": want}])
    # the files went with that message only
    assert "42" not in conv.messages[2]["content"] and conv.pending == []
    n = len(hf_tok.encode("notes.txt:\n```\nThe secret number is 42.\n```", add_special_tokens=False))
    assert f"attached notes.txt: {n} tokens; with the conversation the next prompt takes about {n} of 512 tokens" in out
    assert "(2 files)" in out


def test_attached_files_show_in_the_status_bar_and_reset_drops_them(engine, fake, hf_tok, tmp_path):
    f = fake()
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 20)
    conv = Conversation(engine, ChatSettings())
    ui, out = ui_for(conv)
    assert "ctx 0/512 (0%)" in ui.toolbar()
    ui.command(f"/file {tmp_path / 'a.txt'}")
    n = conv.pending_tokens
    assert n == len(hf_tok.encode("a.txt:\n```\n" + ("alpha beta gamma " * 20).rstrip("\n") + "\n```",
                                  add_special_tokens=False))
    assert f"ctx 0+{n}/512 ({round(100 * n / 512)}%)" in ui.toolbar()
    ui.command("/help")
    assert "/file" in out.getvalue()
    ui.command("/reset")
    assert "conversation cleared (and 1 attached file)" in out.getvalue() and conv.pending == []
    list(conv.send("hello"))
    assert f.prompts[0] == hf_ids(hf_tok, [{"role": "user", "content": "hello"}])
    used = conv.context_used
    assert used > 0 and f"ctx {used}/512 ({round(100 * used / 512)}%)" in ui.toolbar()


def test_file_bad_paths_are_one_line_each_and_attach_nothing(engine, fake, tmp_path):
    fake()
    (tmp_path / "bin.dat").write_bytes(b"ELF\x00\x01\x02text")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "huge.txt").write_bytes(b"a" * (1 << 20))  # more bytes than a 512-token context holds
    (tmp_path / "long.txt").write_text("word " * 2000)  # few bytes, but more tokens than a message may take
    cases = {"missing.txt": "no such file", ".": "is a directory", "bin.dat": "binary",
             "latin1.txt": "not UTF-8 text (byte 3)", "empty.txt": "empty", "huge.txt": "1048576 bytes, more than",
             "long.txt": "tokens, more than a message can take: the context holds 512"}
    conv = Conversation(engine, ChatSettings())
    ui, out = ui_for(conv)  # wide: each message is one line
    for name in [*cases, ""]:
        ui.command(f"/file {tmp_path / name if name else ''}".strip())
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == len(cases) + 1, out  # one line each, then /file's usage
    for line, (name, needle) in zip(lines, cases.items()):
        assert line.startswith("error: ") and needle in line and "Traceback" not in line, (name, line)
    assert "usage: /file PATH" in lines[-1]
    assert conv.pending == [] and conv.messages == []


def test_a_message_that_overflows_is_warned_about_before_the_reply(gguf_model, fake, hf_tok):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    small = Engine(load(path), ctx=96)
    fake(thought="t", answer="a")
    conv = Conversation(small, ChatSettings(max_tokens=8))
    for i in range(10):  # exchanges until the next message no longer fits with them
        new = (f"message number {i} " * 2).rstrip()
        need = len(hf_ids(hf_tok, conv.template_messages() + [{"role": "user", "content": new}]))
        if need > 88:  # 96 less the 8 kept for the reply
            break
        assert not [e for e in conv.send(new) if isinstance(e, Notice)]
    assert i >= 2
    conv, out = drive(small, f"{new}\r/exit\r", conv=conv, width=400)
    warning = f"context full: dropped the oldest exchange (the history and this message take {need} tokens; 88 fit"
    assert out.startswith(warning) and "\na\n" in out  # the warning, then the reply
    assert conv.messages[0]["content"].startswith("message number 1") and conv.messages[-2]["content"] == new


def test_a_message_that_cannot_fit_is_refused_and_the_chat_goes_on(gguf_model, fake, hf_tok, tmp_path):
    path, _ = gguf_model("q8_0", dtype="f32", std=0.05, peaked=True)
    small = Engine(load(path), ctx=96)
    fake(thought="t", answer="a")
    (tmp_path / "part.txt").write_text("one two three four five six seven eight nine ten " * 3)
    long = " ".join(["word"] * 120)
    conv, out = drive(small, f"hi\r{long}\r/file {tmp_path / 'part.txt'}\r{' '.join(['word'] * 60)}\r"
                             "still here?\r/exit\r", settings=ChatSettings(max_tokens=8), width=400)
    n = len(hf_ids(hf_tok, [{"role": "user", "content": long}]))
    assert f"error: this message takes {n} tokens; the context holds 96 and 8 are kept for the reply" in out
    assert "this message (with its 1 attached file) takes" in out and "its files are dropped" in out
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["hi", "still here?"]
    assert conv.pending == [] and conv.messages[-1]["content"] == "a"


def test_path_arguments_complete_as_paths(tmp_path):
    from prompt_toolkit.document import Document

    from qwen3cli.cli.chat_ui import SlashCompleter

    (tmp_path / "notes.txt").write_text("x")
    for cmd in ("/file", "/load"):
        got = [c.text for c in SlashCompleter().get_completions(Document(f"{cmd} {tmp_path}/no"), None)]
        assert got == ["tes.txt"], (cmd, got)
    assert [c.text for c in SlashCompleter().get_completions(Document("/fi"), None)] == ["/file"]
