"""The answer text as it streams: Qwen3's `<tool_call>{...}</tool_call>` blocks lifted out as
tool calls, stop strings cut, and the text in between passed on as soon as nothing can still
turn out to be the start of a marker. Streaming and non-streaming replies both go through it,
so they say the same thing."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI's clients expect


def parse_tool_call(body: str) -> ToolCall | None:
    """The JSON between the tags, or None when it is not {"name": str, "arguments": object}."""
    try:
        d = json.loads(body)
    except ValueError:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
        return None
    args = d.get("arguments", d.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", d["name"], json.dumps(args, ensure_ascii=False))


def _partial_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that some marker starts with (so it must wait)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class AnswerSplitter:
    """push(text) -> a list of str (answer text) and ToolCall; finish() flushes what is held.

    `tools`: lift tool-call blocks out (a block whose JSON is malformed stays in the text).
    `stops`: stop strings; after one, `stopped` is set and the rest is dropped.
    `trim`: hold whitespace until more text follows, so a reply never ends in (or consists
    only of) the newlines between tool calls."""

    def __init__(self, tools: bool = False, stops: list[str] | None = None, trim: bool = False):
        self.tools, self.stops, self.trim = tools, list(stops or []), trim
        self.stopped = False
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._ws = ""  # held whitespace (trim)
        self._in_block = False

    def push(self, text: str) -> list[str | ToolCall]:
        if self.stopped:
            return []
        self._buf += text
        out: list[str | ToolCall] = []
        while self._buf and not self.stopped:
            if self._in_block:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                block, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
                self._in_block = False
                call = parse_tool_call(block.strip())
                if call is None:
                    self._text(out, OPEN + block + CLOSE)
                else:
                    self.calls.append(call)
                    self._ws = ""
                    out.append(call)
                continue
            at, which = self._first_marker()
            if at < 0:
                keep = _partial_suffix(self._buf, self._markers())
                self._text(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            self._text(out, self._buf[:at])
            if which == OPEN:
                self._in_block, self._buf = True, self._buf[at + len(OPEN):]
            else:
                self.stopped, self._buf = True, ""
        return out

    def finish(self) -> list[str | ToolCall]:
        """The end of the answer: an unclosed block or a partial marker is plain text."""
        if self.stopped:
            return []
        out: list[str | ToolCall] = []
        self._text(out, (OPEN if self._in_block else "") + self._buf)
        self._buf, self._in_block, self._ws = "", False, ""
        return out

    def _markers(self) -> list[str]:
        return ([OPEN] if self.tools else []) + self.stops

    def _first_marker(self) -> tuple[int, str]:
        hits = [(self._buf.find(m), m) for m in self._markers()]
        hits = [h for h in hits if h[0] >= 0]
        return min(hits) if hits else (-1, "")

    def _text(self, out: list, text: str) -> None:
        if not text:
            return
        if not self.trim:
            out.append(text)
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            out.append(body)
