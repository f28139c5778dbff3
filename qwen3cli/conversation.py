"""A multi-turn conversation over an Engine: per-turn thinking switches, a thinking budget,
KV prefix reuse between turns, dropping the oldest turns when the context fills, retry, undo,
and save/load. No printing: `send()` yields generation events and Notices for the front end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quant.files import InputFileError, read_json

from .engine import Engine
from .errors import Qwen3CliError
from .files import atomic_output
from .generate import Done, Token
from .model import ContextFull
from .prefix_cache import PrefixCache, common_prefix  # noqa: F401  (common_prefix: part of this module's API)
from .sampler import Sampler, SamplingParams, default_params

SOFT_SWITCHES = {"/think": True, "/no_think": False}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty")
FORMAT = "qwen3cli-chat"
MAX_CHAT_FILE = 256 << 20  # bytes; a 128K-token context is a few MB of text


class ChatFileError(Qwen3CliError):
    """A saved chat cannot be read or written."""


@dataclass(frozen=True)
class Notice:
    text: str


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


class Conversation:
    def __init__(self, engine: Engine, settings: ChatSettings | None = None):
        self.engine = engine
        self.settings = settings or ChatSettings()
        self.messages: list[dict[str, Any]] = []  # user / assistant; assistant keeps "thinking" apart
        self.prefix = PrefixCache(engine.model)
        self.rng = np.random.default_rng(self.settings.seed)
        self.last: Done | None = None
        self.total_reused = 0

    # -- state ---------------------------------------------------------------------------------
    @property
    def cache(self):
        return self.prefix.kv

    @property
    def context_used(self) -> int:
        return self.cache.n

    def thinks(self, override: bool | None = None) -> bool:
        return self.engine.thinks(self.settings.think if override is None else override)

    def params(self, thinking: bool) -> SamplingParams:
        return default_params(thinking, self.engine.loaded.metadata, thinking == self.engine.thinks(None),
                              **self.settings.sampling)

    @property
    def last_thinking(self) -> str:
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m.get("thinking", "")
        return ""

    def template_messages(self) -> list[dict[str, str]]:
        sys = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return sys + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def set_seed(self, seed: int | None) -> None:
        self.settings.seed = seed
        self.rng = np.random.default_rng(seed)

    # -- turns ---------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[Token | Done | Notice]:
        text, override = split_soft_switch(text)
        self.messages.append({"role": "user", "content": text, "think": override})
        return self._reply()

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
        self.prefix.clear()

    def _prompt(self, override: bool | None) -> tuple[Any, list[Notice]]:
        e, notices = self.engine, []
        reserve = min(self.settings.max_tokens or 1024, e.ctx // 4)
        think = self.settings.think if override is None else override
        p = e.prompt(self.template_messages(), enable_thinking=think)
        if len(p.ids) <= e.ctx - reserve:
            return p, notices
        sys = self.template_messages()[:1] if self.settings.system else []
        alone = e.prompt(sys + self.template_messages()[-1:], enable_thinking=think)
        if len(alone.ids) > e.ctx - reserve:  # never truncate the current message: refuse it
            self.messages.pop()
            raise ContextFull(f"this message takes {len(alone.ids)} tokens; the context holds {e.ctx} and "
                              f"{reserve} are kept for the reply (raise --ctx)")
        while len(p.ids) > e.ctx - reserve and len(self.messages) > 1:
            n = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:n]
            notices.append(Notice("context full: dropped the oldest exchange"))
            p = e.prompt(self.template_messages(), enable_thinking=think)
        return p, notices

    def _reply(self) -> Iterator[Token | Done | Notice]:
        override = self.messages[-1].get("think")
        p, notices = self._prompt(override)
        yield from notices
        sampler = Sampler(self.params(p.thinking), rng=self.rng)
        reply = {"role": "assistant", "content": "", "thinking": ""}
        think, answer = [], []
        done = None
        try:
            for ev in self.prefix.generate(self.engine.tokenizer, p.ids, sampler,
                                           stop_ids=self.engine.loaded.stop_ids, max_tokens=self.settings.max_tokens,
                                           thinking=p.opened,
                                           thinking_budget=self.settings.thinking_budget if p.thinking else None):
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

    def load(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            data = read_json(path, MAX_CHAT_FILE, "saved chat")
        except InputFileError as e:
            raise ChatFileError(str(e)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("messages"), list):
            raise ChatFileError(f"{path}: not a qwen3cli chat file")
        msgs = data["messages"]
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise ChatFileError(f"{path}: malformed message {str(m)[:60]!r}")
        s = data.get("settings") or {}
        known = {f.name for f in fields(ChatSettings)}
        try:
            settings = ChatSettings(**{k: v for k, v in s.items() if k in known})
            if not isinstance(settings.sampling, dict):
                raise TypeError("sampling")
        except TypeError:
            raise ChatFileError(f"{path}: malformed settings") from None
        self.settings = settings
        self.set_seed(settings.seed)
        self.messages = msgs
        self.prefix.clear()
