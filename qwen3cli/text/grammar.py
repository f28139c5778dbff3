"""Structured output: grammars compiled by llguidance (the engine llama.cpp, vLLM and SGLang
use) into a mask of the tokens that may come next.

A `Grammar` is checked when it is made, so a bad schema or grammar is refused before anything
runs (GrammarError, with the engine's own message, also for a schema feature it does not
support: never a silent fallback to free text). `Grammar.matcher(tokenizer, stop_ids)` gives a
`Matcher` for one generation: `mask(logits)` sets every token the grammar forbids to -inf, and
`consume(token)` advances it. Once the grammar is complete only the stop tokens are allowed,
so the generation ends there.

JSON is generated compact (llguidance's whitespace_flexible off, as OpenAI's structured
outputs): free whitespace lets a weak model pad forever instead of closing the object.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from ..errors import Qwen3CliError

_COMPACT = {"whitespace_flexible": False}


class GrammarError(Qwen3CliError):
    """A JSON schema or grammar the engine refuses (the message is llguidance's)."""


def _ll():
    import llguidance  # ~30 ms with its Rust library: only when a request asks for a grammar

    return llguidance


class Grammar:
    """A checked llguidance grammar; make one with json_schema, json_object, lark or tool_call."""

    def __init__(self, spec: str, what: str, for_tokenizer=None):
        """for_tokenizer(tokenizer) -> spec: the grammar as it must be for one tokenizer (where
        it names tokens that tokenizer has as single added tokens)."""
        self.spec, self.what, self._for_tokenizer = spec, what, for_tokenizer
        err = _ll().LLMatcher.validate_grammar(spec)
        if err:
            raise GrammarError(f"{what}: {err.strip()}")

    @classmethod
    def json_schema(cls, schema: Any, what: str = "the JSON schema") -> "Grammar":
        if isinstance(schema, (bytes, str)):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"{what} is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"{what} must be a JSON object, not {type(schema).__name__}")
        try:
            spec = _ll().LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{what}: {e}") from None
        return cls(spec, what)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (response_format json_object, ollama's format: json)."""
        return cls.json_schema({"type": "object"}, "a JSON object")

    @classmethod
    def lark(cls, text: str, what: str = "the grammar") -> "Grammar":
        """llguidance's Lark syntax (which also takes %json {schema} inside rules)."""
        return cls(_ll().LLMatcher.grammar_from_lark(text), what)

    @classmethod
    def tool_call(cls, tools: list[dict], name: str | None = None) -> "Grammar":
        """One Qwen tool call block, <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>,
        whose arguments validate against the function's parameters schema: of the function
        `name`, or of any of `tools` (tool_choice "required")."""
        fns = [t.get("function", t) for t in tools if isinstance(t, dict)]
        if name is not None:
            fns = [f for f in fns if isinstance(f, dict) and f.get("name") == name]
            if not fns:
                raise GrammarError(f"tool_choice names the function {name!r}, which is not among the tools")
        calls = [{"type": "object", "properties": {"name": {"const": f.get("name")},
                                                   "arguments": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for f in fns if isinstance(f, dict) and isinstance(f.get("name"), str)]
        if not calls:
            raise GrammarError("a forced tool call needs at least one function with a name")
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        body = json.dumps({**schema, "x-guidance": _COMPACT})

        def lark(open_tag: str, close_tag: str) -> str:
            return f'start: {open_tag} "\\n" %json {body} "\\n" {close_tag}'

        def for_tokenizer(tok) -> str:
            # Qwen's tags are added tokens, which llguidance matches as tokens (<[id]>), not text
            ids = [tok.token_to_id(t) for t in ("<tool_call>", "</tool_call>")]
            tags = [f"<[{i}]>" if i is not None else f'"{t}"' for i, t in zip(ids, ("<tool_call>", "</tool_call>"))]
            return _ll().LLMatcher.grammar_from_lark(lark(*tags))

        g = cls.lark(lark('"<tool_call>"', '"</tool_call>"'), "the tools' parameter schemas")
        g._for_tokenizer = for_tokenizer
        return g

    def matcher(self, tokenizer, stop_ids, vocab_size: int) -> "Matcher":
        spec = self._for_tokenizer(tokenizer) if self._for_tokenizer else self.spec
        return Matcher(spec, self.what, _tokenizer(tokenizer, tuple(sorted(stop_ids)), vocab_size))


_TOKENIZERS: dict = {}
_LOCK = threading.Lock()


def _tokenizer(tokenizer, stop_ids: tuple[int, ...], vocab_size: int):
    """llguidance's view of our tokenizer (~0.7 s to build for Qwen3's: once per tokenizer)."""
    key = (id(tokenizer), stop_ids, vocab_size)
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (tokenizer, _ll().LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                            eos_token=list(stop_ids)))
        return _TOKENIZERS[key][1]  # the tokenizer is kept with it, so its id stays its own


class Matcher:
    """One generation's walk through a grammar."""

    def __init__(self, spec: str, what: str, lltok):
        self._m = _ll().LLMatcher(lltok, spec, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"{what}: {self._m.get_error()}")
        self._bits = np.zeros((lltok.vocab_size + 31) // 32, np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits with every token the grammar forbids next at -inf (a copy)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:len(logits)].view(bool)
        out = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
        if not allowed.any():
            raise GrammarError(f"the grammar allows no token here: {self._m.get_error() or 'it cannot go on'}")
        return out

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {token} breaks the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        return self._m.is_stopped()
