"""The interactive chat's terminal side (prompt_toolkit for input, rich for output), loaded
only when `qwen3cli chat` runs.

Everything here is rendering and input; the conversation logic (switches, budget, prefix
reuse, context overflow, save/load) lives in `conversation.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from ..runtime.conversation import (SAMPLING_KEYS, AttachError, Conversation, Notice, SettingError,
                                    check_sampling, check_setting)
from ..errors import Qwen3CliError
from ..runtime.generation import BUDGET_NOTE, Done

DISPLAYS = ("show", "collapse", "hide")
MIN_RATE_TOKENS = 8  # fewer prefilled tokens than this get no tokens/s: the time is mostly overhead
SET_ALIASES = {"temp": "temperature", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "min_p": "min_p", "presence_penalty": "presence_penalty", "repeat_penalty": "repeat_penalty",
               "max_tokens": "max_tokens", "seed": "seed"}
COMMANDS = {
    "/help": "this list",
    "/think": "think in the following turns (end a message with /think for one turn)",
    "/no_think": "answer without thinking in the following turns (or end a message with /no_think)",
    "/thinking": "show | collapse | hide the thinking",
    "/last_thinking": "print the last reply's thinking",
    "/budget": "N | off: close the thinking after N tokens",
    "/system": "[TEXT]: set (or show) the system prompt",
    "/set": "[temp|top_p|top_k|min_p|presence_penalty|repeat_penalty|max_tokens|seed VALUE]: show or change settings",
    "/file": "PATH: attach a text file to your next message (several: in order)",
    "/stats": "tokens, context, speed, prefix reuse",
    "/retry": "regenerate the last reply",
    "/undo": "drop the last exchange",
    "/reset": "start over (also /clear)",
    "/save": "FILE: save the conversation as JSON",
    "/load": "FILE: load a saved conversation",
    "/exit": "leave (also /quit, Ctrl-D)",
}
ALIASES = {"/clear": "/reset", "/quit": "/exit", "/bye": "/exit", "/?": "/help"}
PATH_COMMANDS = ("/file", "/save", "/load")  # their argument completes as a path


def _whole(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:  # '²' is a digit to str.isdigit, not to int
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def data_dir() -> Path:
    base = os.environ.get("QWEN3CLI_DATA") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "qwen3cli")
    return Path(base)


def _unquoted(arg: str) -> str:
    """A path as typed, or as a terminal pastes a dropped file: in quotes."""
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    return arg


class SlashCompleter(Completer):
    def __init__(self):
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        name, space, arg = text.partition(" ")
        if name in PATH_COMMANDS and space:
            yield from self.paths.get_completions(Document(arg.lstrip()), complete_event)
            return
        if not text.startswith("/") or " " in text:
            if text.startswith("/thinking "):
                word = text.split(" ", 1)[1]
                for d in DISPLAYS:
                    if d.startswith(word):
                        yield Completion(d, -len(word))
            return
        for name in [*COMMANDS, *ALIASES]:
            if name.startswith(text):
                yield Completion(name, -len(text), display_meta=COMMANDS.get(name, f"= {ALIASES.get(name)}"))


def _suggest(name: str, arg: str) -> str:
    """'; did you mean /x?' for a mistyped command: the commands it starts, the one whose
    argument was given (/thi hide -> /thinking), else the closest spelling."""
    import difflib

    names = [*COMMANDS, *ALIASES]
    close = [n for n in names if n.startswith(name)] if len(name) > 1 else []
    if arg in DISPLAYS and "/thinking" in close:
        close = ["/thinking"]
    close = close or difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close[:3])}?" if close else ""


class ChatUI:
    def __init__(self, conv: Conversation, console: Console, session: PromptSession, display: str = "show",
                 markdown: bool = False):
        self.conv, self.console, self.session = conv, console, session
        self.display, self.markdown = display, markdown
        self.last_tps = 0.0
        self.ctrl_c = False

    # -- status ------------------------------------------------------------------------------
    def toolbar(self) -> str:
        c = self.conv
        mode = "think" if c.thinks() else "no_think"
        if c.engine.mode != "hybrid":
            mode += " (fixed)"
        speed = f" │ {self.last_tps:.1f} tok/s" if self.last_tps else ""
        return f" {c.engine.loaded.name} │ {mode} │ {_context(c)}{speed} │ /help"

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(Text(text, style=style))

    # -- input -------------------------------------------------------------------------------
    def read(self) -> str | None:
        """One message or command; None at Ctrl-D (or a second Ctrl-C at an empty prompt)."""
        while True:
            try:
                text = self.session.prompt(">>> ", bottom_toolbar=self.toolbar)
            except KeyboardInterrupt:
                if self.ctrl_c:
                    return None
                self.ctrl_c = True
                self.say("(Ctrl-C again or Ctrl-D to exit)")
                continue
            except EOFError:
                return None
            self.ctrl_c = False
            if text.lstrip().startswith('"""'):
                text = self._block(text.lstrip()[3:])
            if text.strip():
                return text

    def _block(self, first: str) -> str:
        lines = [first]
        history = self.session.history if isinstance(self.session.history, BlockHistory) else None
        if history is not None:
            history.hold = True  # the lines go into history as one block, below
        try:
            while not lines[-1].rstrip().endswith('"""'):
                try:
                    lines.append(self.session.prompt("... "))
                except (KeyboardInterrupt, EOFError):
                    return ""
        finally:
            if history is not None:
                history.hold = False
        lines[-1] = lines[-1].rstrip()[:-3]
        text = "\n".join(lines).strip("\n")
        if history is not None and text.strip():
            history.add_block(text)
        return text

    def loop(self) -> None:
        while (text := self.read()) is not None:
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text.strip()) == "exit":
                        return
                    continue
                self.turn(lambda: self.conv.send(text), text)
            except Exception as e:  # the last line of defence: one input never ends the chat
                self.unexpected(e)

    def unexpected(self, e: Exception) -> None:
        text = str(e) if len(str(e)) <= 300 else str(e)[:300] + "..."
        self.say(f"error: unexpected {type(e).__name__}: {text} (the conversation is kept)", "red")

    # -- a turn ------------------------------------------------------------------------------
    def turn(self, start, text: str = "") -> None:
        from ..runtime.conversation import split_soft_switch

        _, override = split_soft_switch(text)
        if override is not None and self.conv.engine.mode != "hybrid":
            self.say(f"this model {'always' if self.conv.engine.mode == 'always' else 'never'} thinks; "
                     f"{'/think' if override else '/no_think'} has no effect", "yellow")
        r = _TurnRenderer(self)
        gen = None
        try:
            gen = start()
            for ev in gen:
                r.event(ev)
        except KeyboardInterrupt:
            if gen is not None:
                gen.close()
            r.interrupted()
        except Qwen3CliError as e:
            r.finish()
            self.say(f"error: {e}", "red")
        except Exception as e:
            r.finish()  # stops a live display before the line is printed
            self.unexpected(e)

    # -- commands ----------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        name, arg = ALIASES.get(name, name), arg.strip()
        c, s = self.conv, self.conv.settings
        if name == "/exit":
            return "exit"
        if name == "/help":
            for n, h in COMMANDS.items():
                self.console.print(Text.assemble((f"  {n:<15}", "bold"), h))
            self.say('  multi-line: Esc-Enter (or Alt-Enter) for a newline, or wrap the text in """')
        elif name in ("/think", "/no_think"):
            on = name == "/think"
            if c.engine.mode != "hybrid":
                self.say(f"this model {'always' if c.engine.mode == 'always' else 'never'} thinks; "
                         f"{name} has no effect", "yellow")
            else:
                s.think = on
                p = c.params(on)
                self.say(f"thinking {'on' if on else 'off'} for the following turns (temp {p.temperature:g}, "
                         f"top_p {p.top_p:g}, top_k {p.top_k})")
        elif name == "/thinking":
            if arg not in DISPLAYS:
                self.say(f"usage: /thinking {'|'.join(DISPLAYS)} (now {self.display})", "yellow")
            else:
                self.display = arg
                self.say(f"thinking display: {arg}")
        elif name == "/last_thinking":
            t = c.last_thinking
            self.console.print(Text(t, style="dim") if t else Text("(no thinking in the last reply)", style="dim"))
        elif name == "/budget":
            n = _whole(arg)
            if arg == "off":
                s.thinking_budget = None
                self.say("thinking budget off")
            elif n is not None and n > 0:
                s.thinking_budget = n
                self.say(f"thinking budget: {n} tokens")
            else:
                self.say(f"usage: /budget N|off (now {s.thinking_budget or 'off'})", "yellow")
        elif name == "/system":
            if arg:
                s.system = arg
                self.say("system prompt set")
            else:
                self.say(f"system prompt: {s.system!r}" if s.system else "no system prompt")
        elif name == "/set":
            self._set(arg)
        elif name == "/file":
            self._file(arg)
        elif name == "/stats":
            self._stats()
        elif name == "/retry":
            if not c.messages:
                self.say("nothing to retry", "yellow")
            else:
                self.turn(c.retry)
        elif name == "/undo":
            self.say("dropped the last exchange" if c.undo() else "nothing to undo")
        elif name == "/reset":
            files = len(c.pending)
            c.reset()
            self.last_tps = 0.0
            self.say("conversation cleared" + (f" (and {files} attached file{'s' if files > 1 else ''})" if files else ""))
        elif name in ("/save", "/load"):
            if not arg:
                self.say(f"usage: {name} FILE", "yellow")
            else:
                try:
                    if name == "/save":
                        self.say(f"saved to {c.save(arg)}")
                    else:
                        for warning in c.load(arg):
                            self.say(warning, "yellow")
                        self.say(f"loaded {len(c.messages)} messages from {arg}")
                except Qwen3CliError as e:
                    self.say(f"error: {e}", "red")
        else:
            hint = _suggest(name, arg)
            self.say(f"unknown command {name}{hint} (/help lists them; start with // to send a literal /)", "yellow")
        return None

    def _file(self, arg: str) -> None:
        c = self.conv
        if not arg:
            for a in c.pending:
                self.say(f"  {a.name}: {a.tokens} tokens")
            self.say("usage: /file PATH (attaches it to your next message)" if not c.pending
                     else f"{len(c.pending)} file(s) go with your next message; /reset drops them", "yellow")
            return
        try:
            a = c.attach(_unquoted(arg))
        except AttachError as e:
            self.say(f"error: {e}", "red")
            return
        more = f" ({len(c.pending)} files)" if len(c.pending) > 1 else ""
        self.say(f"attached {a.name}: {a.tokens} tokens; with the conversation the next prompt takes about "
                 f"{c.context_used + c.pending_tokens} of {c.engine.ctx} tokens ({_share(c)}){more}; "
                 "it goes with your next message")
        if c.context_used + c.pending_tokens > c.room:
            self.say(f"that is more than the {c.room} tokens a prompt may take ({c.engine.ctx - c.room} are kept for "
                     "the reply): the oldest exchanges will be dropped when you send it", "yellow")

    def _set(self, arg: str) -> None:
        c, s = self.conv, self.conv.settings
        if not arg:
            p = c.params(c.thinks())
            for k in SAMPLING_KEYS:
                mark = "" if k in s.sampling else "  (default)"
                self.console.print(f"  {k:<17}{getattr(p, k)}{mark}", highlight=False)
            self.console.print(f"  {'max_tokens':<17}{s.max_tokens or 'until the context is full'}", highlight=False)
            self.console.print(f"  {'seed':<17}{s.seed if s.seed is not None else 'random'}", highlight=False)
            return
        key, _, value = arg.partition(" ")
        key, value = SET_ALIASES.get(key), value.strip()
        if key is None or not value:
            self.say(f"usage: /set {'|'.join(SET_ALIASES)} VALUE", "yellow")
            return
        number = _whole(value) if key in ("max_tokens", "seed", "top_k") else _float(value)
        v = None if value in ("off", "none") else value if number is None else number
        try:
            v = check_sampling(key, v) if key in SAMPLING_KEYS else check_setting(key, v, none="off")
        except SettingError as e:  # nothing changes: the conversation and its settings are kept
            self.say(f"usage: /set {key} VALUE, {e.wants} (got {e.got})", "yellow")
            return
        if key == "seed":
            c.set_seed(v)
        elif key == "max_tokens":
            s.max_tokens = v
        else:
            s.sampling[key] = v
        self.say(f"{key} = {value}")

    def _stats(self) -> None:
        c, d = self.conv, self.conv.last
        self.console.print(f"  context      {c.context_used} / {c.engine.ctx} tokens, {len(c.messages)} messages",
                           highlight=False)
        if c.pending:
            self.console.print(f"  attached     {len(c.pending)} file(s), {c.pending_tokens} tokens, for the next message",
                               highlight=False)
        if d is None:
            return
        prefilled = d.prompt_tokens - d.cached_tokens
        rate = f" at {d.prefill_tps:.1f} tok/s" if prefilled >= MIN_RATE_TOKENS else ""  # a few tokens time noise
        self.console.print(f"  last turn    prompt {d.prompt_tokens} tokens (reused {d.cached_tokens} from the "
                           f"cache, prefilled {prefilled}){rate}", highlight=False)
        self.console.print(f"               generated {d.completion_tokens} tokens ({d.thinking_tokens} thinking) "
                           f"at {d.decode_tps:.1f} tok/s", highlight=False)
        self.console.print(f"  session      reused {c.total_reused} prompt tokens in all", highlight=False)


def _share(c: Conversation) -> str:
    """The share of the context that the history and the files waiting for the next message take."""
    return f"{100 * (c.context_used + c.pending_tokens) / c.engine.ctx:.0f}%"


def _context(c: Conversation) -> str:
    """'ctx 1200+800/8192 (24%)': the context in use, the attached files' tokens, their share."""
    files = f"+{c.pending_tokens}" if c.pending else ""
    return f"ctx {c.context_used}{files}/{c.engine.ctx} ({_share(c)})"


class _TurnRenderer:
    """Renders one reply's events according to the display mode."""

    def __init__(self, ui: ChatUI):
        self.ui, self.con = ui, ui.console
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.think_tokens, self.think_t0, self.think_text = 0, None, []
        self.answer: list[str] = []
        self.live: Live | None = None
        self.thinking_shown = self.answer_started = False

    def event(self, ev) -> None:
        if isinstance(ev, Notice):
            self.ui.say(ev.text, "yellow")
            return
        if isinstance(ev, Done):
            self.finish(ev)
            return
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        if ev.thinking:
            self._thinking(ev.text)
        else:
            self._answer(ev.text)

    def _thinking(self, text: str) -> None:
        if self.think_t0 is None:
            self.think_t0 = time.perf_counter()
        self.think_tokens += 1
        self.think_text.append(text)
        mode = self.ui.display
        if mode == "show" and text:
            if not self.thinking_shown:
                self.con.print(Text("thinking…", style="dim italic"))
                self.thinking_shown = True
            self.con.print(Text(text, style="dim"), end="")
        elif mode == "collapse" and "".join(self.think_text).strip():
            line = Text(f"thinking... {self.think_tokens} tokens, {time.perf_counter() - self.think_t0:.1f} s",
                        style="dim italic")
            if self.live is None:
                self.live = Live(line, console=self.con, transient=True, auto_refresh=False)
                self.live.start()
            self.live.update(line, refresh=True)

    def _end_thinking(self, budget_hit: bool = False) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        think = "".join(self.think_text).strip()
        if self.ui.display == "show" and self.thinking_shown:
            self.con.print()
            self.con.print()
        elif self.ui.display == "collapse" and think:
            took = time.perf_counter() - (self.think_t0 or self.t0)
            budget_hit = budget_hit or think.endswith(BUDGET_NOTE.strip())
            self.con.print(Text(f"thought for {took:.1f} s ({self.think_tokens} tokens"
                                f"{', budget hit' if budget_hit else ''}) · /last_thinking shows it", style="dim"))
        self.think_text = [] if not think else [think]
        self.thinking_shown = False

    def _answer(self, text: str) -> None:
        if not self.answer_started:
            self._end_thinking()
            self.answer_started = True
        self.answer.append(text)
        if not self.ui.markdown:
            self.con.print(text, end="", markup=False, highlight=False)
        elif self.live is None:
            self.live = Live(Text(""), console=self.con, transient=True, auto_refresh=False)
            self.live.start()
        if self.ui.markdown:
            self.live.update(Text(_tail("".join(self.answer), self.con.size.height - 2)), refresh=True)

    def _close(self, budget_hit: bool = False) -> None:
        if not self.answer_started:
            self._end_thinking(budget_hit)
        if self.live is not None:
            self.live.stop()
            self.live = None
        text = "".join(self.answer).strip()
        if self.ui.markdown and text:
            self.con.print(Markdown(text))
        elif text:
            self.con.print()

    def finish(self, d: Done | None = None) -> None:
        self._close(d.budget_hit if d else False)
        if d is None:
            return
        self.ui.last_tps = d.decode_tps
        bits = [f"{d.completion_tokens} tokens", f"{d.decode_tps:.1f} tok/s",
                f"first token {self.first or 0:.2f} s"]
        if d.cached_tokens:
            bits.append(f"reused {d.cached_tokens} prompt tokens")
        if d.budget_hit:
            bits.append("thinking budget hit")
        if d.finish_reason != "stop":
            bits.append({"length": "stopped at max_tokens", "context_full": "context full"}.get(
                d.finish_reason.replace("_in_thinking", ""), d.finish_reason)
                + (" while thinking" if d.finish_reason.endswith("_in_thinking") else ""))
        self.ui.say(" · ".join(bits))

    def interrupted(self) -> None:
        self._close()
        self.ui.say("[interrupted: the partial reply is kept]", "yellow")


def _tail(text: str, rows: int) -> str:
    """The end of a streaming reply that fits `rows` terminal rows: a live display crops at the
    terminal's height (with "..."), so it shows the newest lines; the whole reply is rendered
    once it ends."""
    lines = text.split("\n")
    return "\n".join(lines[-max(1, rows):])


class BlockHistory(History):
    """The prompt history, with a \"\"\" block kept as one entry (recalled whole) instead of one
    entry per line typed."""

    def __init__(self, inner: History):
        super().__init__()
        self.inner, self.hold = inner, False

    def load_history_strings(self):
        yield from self.inner.load_history_strings()

    def store_string(self, string: str) -> None:
        self.inner.store_string(string)

    def append_string(self, string: str) -> None:
        if not self.hold and not string.lstrip().startswith('"""'):
            super().append_string(string)

    def add_block(self, text: str) -> None:
        super().append_string(f'"""{text}"""')


def make_prompt_session(**kw) -> PromptSession:
    kb = KeyBindings()

    @kb.add("escape", "enter")  # Alt-Enter arrives as Esc-Enter in most terminals
    def _newline(event):
        event.current_buffer.insert_text("\n")

    if "history" not in kw:
        try:
            d = data_dir()
            d.mkdir(parents=True, exist_ok=True)
            kw["history"] = FileHistory(str(d / "chat_history"))
        except OSError:
            kw["history"] = InMemoryHistory()
    kw["history"] = BlockHistory(kw["history"])
    return PromptSession(key_bindings=kb, completer=SlashCompleter(), complete_while_typing=False,
                         enable_history_search=False, **kw)
