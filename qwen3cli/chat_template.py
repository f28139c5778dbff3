"""Chat templates from model files, rendered as transformers' apply_chat_template does, in a
sandbox with a budget.

Templates come from strangers. jinja2's ImmutableSandboxedEnvironment refuses access to
Python internals; on top of it every render has a budget: `range` draws from one shared
iteration allowance, `*` and `**` cannot build huge values, the output is capped, and a
deadline stops anything else that runs long. The environment mirrors transformers' (trim and
lstrip blocks, loopcontrols, its tojson, raise_exception, strftime_now), so the text is the
same, byte for byte.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import wraps
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import Qwen3CliError

MAX_ITERATIONS = 1_000_000  # range() items per render, all calls together
MAX_VALUE = 1_000_000  # elements a * or ** result may have
MAX_OUTPUT = 16 << 20  # characters
DEADLINE_S = 5.0


class TemplateError(Qwen3CliError):
    """The chat template is invalid, unsafe, over budget, or raised an error itself."""


def builtin_template() -> str:
    return resources.files("qwen3cli").joinpath("data/qwen3.jinja").read_text(encoding="utf-8")


class _Budget:
    def __init__(self):
        self.iterations = 0
        self.deadline = time.monotonic() + DEADLINE_S

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template: rendering took longer than {DEADLINE_S:.0f} s")


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])
    budget: _Budget

    def call_binop(self, context, operator, left, right):
        self.budget.check()
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
                raise TemplateError("chat template: exponent too large")
            return left ** right
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_VALUE:
                raise TemplateError("chat template: repeats a value into something too large")
        return left * right

    def call(self, __context, __obj, *args, **kwargs):
        self.budget.check()
        _check_sizes(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _check_sizes(args, kwargs) -> None:
    # 'x'.ljust(10**9), range(10**9), lipsum(10**6), 'x'|center(10**9): one huge integer argument
    # is how a template asks for a huge allocation or loop
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_VALUE:
            raise TemplateError(f"chat template: argument {v} is too large")


def _bounded_filter(f):
    @wraps(f)  # keeps jinja's pass_context / pass_environment marker
    def g(*args, **kwargs):
        _check_sizes(args, kwargs)
        return f(*args, **kwargs)

    return g


class ChatTemplate:
    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, where: str = "model"):
        self.source = source if source else builtin_template()
        self.builtin = not source
        self.where = where
        self.special_tokens = dict(special_tokens or {})
        env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.budget = _Budget()
        env.filters["tojson"] = _tojson
        env.filters = {k: _bounded_filter(f) for k, f in env.filters.items()}
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f),
                           range=self._range)
        self._env = env
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}: chat template has a syntax error at line {e.lineno}: {e.message}") from None

    def _range(self, *args):
        r = range(*args)
        b = self._env.budget
        b.iterations += len(r)
        if b.iterations > MAX_ITERATIONS:
            raise TemplateError(f"{self.where}: chat template loops more than {MAX_ITERATIONS} times")
        return r

    def thinking_mode(self) -> str:
        """"hybrid" (enable_thinking switches it), "always" (Thinking-2507) or "never" (Instruct-2507)."""
        probe = [{"role": "user", "content": "x"}]
        on = self.render(probe, enable_thinking=True)
        if on != self.render(probe, enable_thinking=False):
            return "hybrid"
        return "always" if on.rstrip().endswith("<think>") else "never"

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               enable_thinking: bool | None = None, tools: list[dict] | None = None, **kwargs: Any) -> str:
        ctx = {**self.special_tokens, **kwargs}
        if enable_thinking is not None:
            ctx["enable_thinking"] = enable_thinking
        self._env.budget = _Budget()
        out, n = [], 0
        try:
            for chunk in self._template.generate(messages=messages, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **ctx):
                n += len(chunk)
                if n > MAX_OUTPUT:
                    raise TemplateError(f"{self.where}: chat template output exceeds {MAX_OUTPUT} characters")
                self._env.budget.check()
                out.append(chunk)
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self.where}: chat template refused by the sandbox: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.where}: chat template error: {e}") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: chat template recurses too deeply") from None
        except Exception as e:  # a template may fail in many Python ways; none of them is ours
            raise TemplateError(f"{self.where}: chat template failed: {type(e).__name__}: {e}") from None
        return "".join(out)


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
