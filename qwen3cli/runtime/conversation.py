"""A multi-turn conversation over an Engine: per-turn thinking switches, a thinking budget,
KV prefix reuse between turns, dropping the oldest turns when the context fills, retry, undo,
save/load, and text files attached to the next message. No printing: `send()` yields generation
events and Notices for the front end.

Settings are checked field by field wherever they come from (a saved file, /set), so a bad value
is refused where it enters instead of failing every later turn.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quant.files import InputFileError, check_regular, read_bytes, read_json

from ..errors import Qwen3CliError
from ..io.files import atomic_output
from ..model.forward import ContextFull
from ..sampler import Overrides, Sampler, SamplingParams, default_params
from ..text.chat_template import MAX_OUTPUT
from .engine import Engine, PromptTooLong
from .generation import Done, Token
from .prefix_cache import PrefixCache, common_prefix  # noqa: F401  (common_prefix: part of this module's API)

SOFT_SWITCHES = {"/think": True, "/no_think": False}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty")
SAMPLING_RANGES = {"temperature": "a finite number, at least 0", "top_p": "a number above 0 and at most 1",
                   "top_k": "a whole number, at least 0 (0: off)", "min_p": "a number from 0 to 1",
                   "presence_penalty": "a number from -2 to 2", "repeat_penalty": "a finite number above 0"}
MAX_SEED = 2**64 - 1  # what --seed takes
MESSAGE_FIELDS = {"role": str, "content": str, "think": (bool, type(None)), "thinking": str, "finish_reason": str,
                  "interrupted": bool}
FORMAT = "qwen3cli-chat"
MAX_CHAT_FILE = 256 << 20  # bytes; a 128K-token context is a few MB of text
MAX_ATTACHED = 16 << 20  # bytes; no context holds that much text, and tokenizing it takes seconds


class _TooLong:
    """A render too long to tokenize: it fits no context."""
    ids = range(1 << 62)


_TOO_LONG = _TooLong()


class ChatFileError(Qwen3CliError):
    """A saved chat cannot be read or written."""


class AttachError(Qwen3CliError):
    """A file cannot be attached: missing, not a regular file, not text, or too large to fit."""


class SettingError(Qwen3CliError):
    """A chat setting has a wrong type or is out of range."""

    def __init__(self, key: str, wants: str, got: str):
        super().__init__(f"{key} must be {wants}, got {got}")
        self.key, self.wants, self.got = key, wants, got


@dataclass(frozen=True)
class Notice:
    text: str


@dataclass(frozen=True)
class Attachment:
    """A text file for the next message: `block` is what the message gets, `tokens` its size."""
    name: str
    block: str
    tokens: int


def file_block(name: str, text: str) -> str:
    """The file's name, then its text in a fence longer than any run of backticks inside it
    (CommonMark's rule), so a file holding a fenced block does not end ours early."""
    body, fence = text.rstrip("\n"), "```"
    while fence in body:
        fence += "`"
    return f"{name}:\n{fence}\n{body}\n{fence}"


@dataclass
class ChatSettings:
    system: str | None = None
    think: bool | None = None  # None: the template's default
    thinking_budget: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    sampling: dict[str, float] = field(default_factory=dict)  # only what the user set


def split_soft_switch(text: str) -> tuple[str, bool | None]:
    """'Explain X /no_think' -> ('Explain X', False): Qwen's per-turn switch, tag removed."""
    stripped = text.rstrip()
    for tag, on in SOFT_SWITCHES.items():
        if stripped.endswith(tag) and (len(stripped) == len(tag) or stripped[-len(tag) - 1].isspace()):
            return stripped[: -len(tag)].rstrip(), on
    return text, None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _listed(names: list) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(map(_shown, names[:5])) + more


def check_sampling(key: str, value: Any) -> float | int:
    """A sampling setting, as the sampler takes it; SettingError naming the setting otherwise."""
    if key not in SAMPLING_RANGES:
        raise SettingError(key, f"one of {', '.join(SAMPLING_KEYS)}", "an unknown sampling setting")
    if key == "top_k":
        ok = type(value) is int  # noqa: E721 (a bool is not a count)
    else:
        ok = type(value) in (int, float) and math.isfinite(value)
        ok = ok and (key != "presence_penalty" or -2 <= value <= 2)  # OpenAI's range, as the server takes it
        value = float(value) if ok else value
    try:
        if ok:
            default_params(True, **{key: value})  # the sampler's own ranges
    except ValueError:
        ok = False
    if not ok:
        raise SettingError(key, SAMPLING_RANGES[key], _shown(value))
    return value


def check_setting(key: str, value: Any, none: str = "null") -> Any:
    """One ChatSettings field, checked; SettingError naming it otherwise. `none` is the word
    for no value where the value comes from (null in a file, off for /set)."""
    if key == "sampling":
        if not isinstance(value, dict):
            raise SettingError(key, "an object of sampling settings", _shown(value))
        try:
            return {k: check_sampling(k, v) for k, v in value.items()}
        except SettingError as e:
            raise SettingError(f"sampling.{e.key}", e.wants, e.got) from None
    count = f"a whole number, at least 1, or {none}"
    wants = {"system": f"text or {none}", "think": f"true, false or {none}", "thinking_budget": count,
             "max_tokens": count, "seed": f"a whole number from 0 to {MAX_SEED}, or {none}"}.get(key)
    if wants is None:
        raise SettingError(key, "a chat setting", "an unknown setting")
    if value is None:
        return None
    if key == "system":
        ok = isinstance(value, str)
    elif key == "think":
        ok = isinstance(value, bool)
    else:  # true is not a seed, nor a count
        ok = type(value) is int and (0 <= value <= MAX_SEED if key == "seed" else value >= 1)  # noqa: E721
    if not ok:
        raise SettingError(key, wants, _shown(value))
    return value


def _message(m: Any, path: Path, unknown: set[str]) -> dict[str, Any]:
    """A saved message, checked field by field; fields this version does not know are dropped."""
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
        raise ChatFileError(f"{path}: malformed message {_shown(m)}")
    out = {}
    for k, v in m.items():
        kind = MESSAGE_FIELDS.get(k)
        if kind is None:
            unknown.add(k)
        elif not isinstance(v, kind):
            raise ChatFileError(f"{path}: a message's {k} has the wrong type: {_shown(v)}")
        else:
            out[k] = v
    return out


class Conversation:
    def __init__(self, engine: Engine, settings: ChatSettings | None = None):
        self.engine = engine
        self.settings = settings or ChatSettings()
        self.messages: list[dict[str, Any]] = []  # user / assistant; assistant keeps "thinking" apart
        self.prefix = PrefixCache(engine.model)
        self.rng = np.random.default_rng(self.settings.seed)
        self.last: Done | None = None
        self.total_reused = 0
        self._history_tokens: tuple = (None, 0)  # (what it was counted for, tokens)
        self.pending: list[Attachment] = []  # files for the next message, in the order attached

    # -- state ---------------------------------------------------------------------------------
    @property
    def cache(self):
        return self.prefix.kv

    @property
    def context_used(self) -> int:
        """Tokens of context in use: the cache's, or before the first reply of a loaded chat
        (whose history is not computed yet) what the history will take."""
        if self.cache.n or not self.messages:
            return self.cache.n
        key = (len(self.messages), self.settings.system)
        if self._history_tokens[0] != key:
            try:
                text = self.engine.template.render(self.template_messages(), add_generation_prompt=False)
                n = len(self.engine.tokenizer.encode(text, add_special_tokens=False).ids)
            except Exception:  # a status figure: a history the template refuses shows 0, the turn says why
                n = 0
            self._history_tokens = (key, n)
        return self._history_tokens[1]

    @property
    def pending_tokens(self) -> int:
        """Tokens the attached files will add to the next message."""
        return sum(a.tokens for a in self.pending)

    @property
    def room(self) -> int:
        """Tokens a prompt may take: the rest of the context is kept for the reply."""
        ctx = self.engine.ctx
        return ctx - min(self.settings.max_tokens or 1024, ctx // 4)

    def thinks(self, override: bool | None = None) -> bool:
        return self.engine.thinks(self.settings.think if override is None else override)

    def params(self, thinks: bool) -> SamplingParams:
        return self.engine.sampling(thinks, Overrides(**self.settings.sampling))

    @property
    def last_thinking(self) -> str:
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m.get("thinking", "")
        return ""

    def template_messages(self, start: int = 0) -> list[dict[str, str]]:
        """The system prompt and the history from message `start` on, as the template takes them."""
        sys = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return sys + [{"role": m["role"], "content": m["content"]} for m in self.messages[start:]]

    def set_seed(self, seed: int | None) -> None:
        self.settings.seed = seed
        self.rng = np.random.default_rng(seed)

    # -- turns ---------------------------------------------------------------------------------
    def attach(self, path: str | Path) -> Attachment:
        """Read a UTF-8 text file for the next message (several go in the order attached).
        AttachError when it is missing, not a regular file, binary, or larger than a message
        can be in this context; nothing is attached then."""
        path = Path(path).expanduser()
        e = self.engine
        # more bytes than the context could hold whatever they tokenize to: refused unread
        limit = min(MAX_ATTACHED, self.room * e.longest_token())
        try:
            size = check_regular(path, "text file")
            if size > limit:
                raise AttachError(f"{path}: {size} bytes, more than a message can hold in a {e.ctx}-token context"
                                  if limit < MAX_ATTACHED else f"{path}: {size} bytes, more than {MAX_ATTACHED >> 20} MB")
            data = read_bytes(path, limit, "text file")
        except InputFileError as err:
            raise AttachError(str(err)) from None
        if b"\0" in data:  # valid UTF-8, but no text file holds NUL bytes
            raise AttachError(f"{path}: a binary file (it holds NUL bytes), not UTF-8 text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise AttachError(f"{path}: not UTF-8 text (byte {err.start})") from None
        if not text.strip():
            raise AttachError(f"{path}: empty, nothing to attach")
        block = file_block(path.name, text)
        tokens = len(e.tokenizer.encode(block, add_special_tokens=False).ids)
        if tokens > self.room:
            raise AttachError(f"{path}: {tokens} tokens, more than a message can take: the context holds {e.ctx} "
                              f"and {e.ctx - self.room} are kept for the reply (raise --ctx)")
        att = Attachment(path.name, block, tokens)
        self.pending.append(att)
        return att

    def send(self, text: str) -> Iterator[Token | Done | Notice]:
        """Answer `text`, after the attached files' blocks; the files go with it (also when the
        message is refused: they were part of it)."""
        text, override = split_soft_switch(text)
        files, self.pending = self.pending, []
        content = "\n\n".join([a.block for a in files] + [text])
        self.messages.append({"role": "user", "content": content, "think": override})
        return self._reply(pending=self.messages[-1], files=len(files))

    def retry(self) -> Iterator[Token | Done | Notice]:
        """Regenerate the last reply (the last user message stays)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise Qwen3CliError("nothing to retry")
        return self._reply()

    def undo(self) -> bool:
        """Drop the last exchange (the last user message and its reply)."""
        if not self.messages:
            return False
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        return True

    def reset(self) -> None:
        self.messages.clear()
        self.pending.clear()
        self.prefix.clear()
        self.last = None  # /stats' "last turn" and the session's figures start over too
        self.total_reused = 0

    def _prompt(self, override: bool | None, files: int = 0) -> tuple[Any, list[Notice]]:
        """The prompt for the next reply; when the history does not fit, the oldest exchanges go,
        as few as possible, and a Notice says so before anything is generated. A history of any
        length (a loaded one too) costs a few renders: what cannot fit is cut by its length in
        characters, the rest by a binary search. `files`: how many attached files the message
        being answered holds (the refusal names them)."""
        e = self.engine
        room = self.room
        think = self.settings.think if override is None else override
        renders: dict[int, Any] = {}

        def prompt(start: int):
            if start not in renders:
                try:
                    renders[start] = e.prompt(self.template_messages(start), enable_thinking=think)
                except PromptTooLong:  # more bytes than any tokenization could fit: not tokenized
                    renders[start] = _TOO_LONG
            return renders[start]

        # an exchange starts at a user message (the first message starts one whatever its role);
        # the last exchange holds the message being answered
        starts = [i for i, m in enumerate(self.messages) if i == 0 or m["role"] == "user"]
        lo = self._cut_by_length(starts, room)
        if len(prompt(starts[lo]).ids) <= room:
            return renders[starts[lo]], self._dropped(starts[lo], renders.get(0), room)
        if len(prompt(starts[-1]).ids) > room:  # never truncate the current message: refuse it
            size = "too many" if prompt(starts[-1]) is _TOO_LONG else len(prompt(starts[-1]).ids)
            with_files = f" (with its {files} attached file{'s' if files > 1 else ''})" if files else ""
            raise ContextFull(f"this message{with_files} takes {size} tokens; the context holds {e.ctx} "
                              f"and {e.ctx - room} are kept for the reply (raise --ctx); it was not sent"
                              + (" and its files are dropped" if files else ""))
        hi = len(starts) - 1  # starts[lo] does not fit, starts[hi] does: find the first that does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if len(prompt(starts[mid]).ids) <= room:
                hi = mid
            else:
                lo = mid
        return renders[starts[hi]], self._dropped(starts[hi], renders.get(0), room)

    def _cut_by_length(self, starts: list[int], room: int) -> int:
        """The first exchange from which the history may fit: no token stands for more characters
        than the longest in the vocabulary, so a longer history cannot fit and is not rendered."""
        # (and never more than a template may render, or the first render would fail instead)
        most = min(room * self.engine.longest_token(), MAX_OUTPUT // 2)
        chars, first = 0, len(starts) - 1
        for j in range(len(starts) - 1, -1, -1):  # from the newest exchange back
            end = starts[j + 1] if j + 1 < len(starts) else len(self.messages)
            chars += sum(len(m["content"]) for m in self.messages[starts[j]:end])
            if chars > most:
                break
            first = j
        return first

    def _dropped(self, start: int, whole: Any, room: int) -> list[Notice]:
        """Drop the messages before `start`, and the Notice that says how many and why; `whole`:
        the render of the whole history, when it was made (a history cut by its length is not)."""
        if not start:
            return []
        exchanges = sum(1 for i, m in enumerate(self.messages[:start]) if i == 0 or m["role"] == "user")
        del self.messages[:start]
        need = f"{len(whole.ids)} tokens" if whole is not None and whole is not _TOO_LONG else f"more than {room}"
        why = (f"(the history and this message take {need}; {room} fit, {self.engine.ctx - room} of the "
               f"{self.engine.ctx} are kept for the reply)")
        if exchanges == 1:
            return [Notice(f"context full: dropped the oldest exchange {why}")]
        return [Notice(f"context full: dropped the oldest {exchanges} exchanges ({start} messages) {why}")]

    def _reply(self, pending: dict | None = None, files: int = 0) -> Iterator[Token | Done | Notice]:
        override = self.messages[-1].get("think")
        try:
            p, notices = self._prompt(override, files)
        except BaseException:  # a message that cannot be prompted (too long, the template refused it) is not kept
            if pending is not None and self.messages and self.messages[-1] is pending:
                self.messages.pop()
            raise
        yield from notices
        sampler = Sampler(self.params(p.thinks), rng=self.rng)
        reply = {"role": "assistant", "content": "", "thinking": ""}
        think, answer = [], []
        done = None
        try:
            for ev in self.prefix.generate(self.engine.tokenizer, p.ids, sampler,
                                           stop_ids=self.engine.loaded.stop_ids, max_tokens=self.settings.max_tokens,
                                           opened=p.opened,
                                           thinking_budget=self.settings.thinking_budget if p.thinks else None):
                if isinstance(ev, Done):
                    done = ev
                else:
                    (think if ev.thinking else answer).append(ev.text)
                yield ev
        finally:  # also when the front end stops us (Ctrl-C): keep what was written
            reply["thinking"] = "".join(think).strip("\n")
            reply["content"] = "".join(answer).strip()
            if done is None:
                reply["interrupted"] = True
            else:
                reply["finish_reason"] = done.finish_reason
                self.last = done
                self.total_reused += done.cached_tokens
            self.messages.append(reply)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        data = {"format": FORMAT, "version": 1, "model": self.engine.loaded.name,
                "settings": asdict(self.settings), "messages": self.messages}
        # an existing chat file is replaced (that is what /save means); anything else is refused
        with atomic_output(path, replace=True, binary=False) as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        return path

    def load(self, path: str | Path, keep: ChatSettings | None = None) -> list[str]:
        """Replace the conversation with a saved one; returns warnings (fields it ignored).
        keep: settings that win over the file's where they are set (a command line's flags).

        A setting of the wrong type or out of range refuses the whole file, naming the setting:
        loading the rest would resume a different chat than the one saved. Fields this version
        does not know are ignored with a warning, so a file from a newer qwen3cli still loads."""
        path = Path(path).expanduser()
        try:
            data = read_json(path, MAX_CHAT_FILE, "saved chat")
        except InputFileError as e:
            raise ChatFileError(str(e)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("messages"), list):
            raise ChatFileError(f"{path}: not a qwen3cli chat file")
        unknown_fields: set[str] = set()
        msgs = [_message(m, path, unknown_fields) for m in data["messages"]]
        raw = data.get("settings")
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ChatFileError(f"{path}: settings must be an object, got {_shown(raw)}")
        known = {f.name for f in fields(ChatSettings)}
        ignored = [k for k in raw if k not in known]
        raw = {k: v for k, v in raw.items() if k in known}
        if isinstance(raw.get("sampling"), dict):
            ignored += [f"sampling.{k}" for k in raw["sampling"] if k not in SAMPLING_KEYS]
            raw["sampling"] = {k: v for k, v in raw["sampling"].items() if k in SAMPLING_KEYS}
        values = {}
        for key, value in raw.items():
            try:
                values[key] = check_setting(key, value)
            except SettingError as e:
                raise ChatFileError(f"{path}: settings.{e}") from None
        warnings = [f"{path}: ignored unknown {what}: {_listed(names)}"
                    for what, names in (("settings", ignored), ("message fields", sorted(unknown_fields))) if names]
        settings = ChatSettings(**values)
        if keep is not None:
            for f in fields(ChatSettings):
                mine = getattr(keep, f.name)
                if f.name == "sampling":
                    settings.sampling = {**settings.sampling, **mine}
                elif mine is not None:
                    setattr(settings, f.name, mine)
        self.settings = settings
        self.set_seed(self.settings.seed)
        self.messages = msgs
        self.prefix.clear()
        return warnings
