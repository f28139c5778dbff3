"""Chat templates from model files, rendered as transformers' apply_chat_template does, in a
sandbox with a budget.

Templates come from strangers: they render in template_sandbox's environment, which refuses
Python internals and stops any render that runs past its deadline or would build too much
(template_budget.py has the limits). The environment mirrors transformers' (trim and lstrip
blocks, loopcontrols, its tojson, raise_exception, strftime_now), so the text is the same, byte
for byte.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext

from . import template_budget
from .template_budget import MAX_TEXT, OverBudget, TemplateError
from .template_sandbox import BudgetedEnvironment

__all__ = ["ChatTemplate", "TemplateError", "builtin_template"]

MAX_OUTPUT = MAX_TEXT  # characters
MAX_SOURCE = 256 << 10  # characters: real templates are a few KB; compiling takes time that no deadline bounds
MAX_MESSAGE = 300  # characters of an error's own text (raise_exception can be handed a whole document)
STRFTIME_GROWTH = 256  # Python gives up on a strftime result longer than 256 times its format


def builtin_template() -> str:
    return resources.files("qwen3cli").joinpath("data/qwen3.jinja").read_text(encoding="utf-8")


class ChatTemplate:
    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, where: str = "model"):
        self.source = source if source else builtin_template()
        self.builtin = not source
        self.where = where
        self.special_tokens = dict(special_tokens or {})
        if len(self.source) > MAX_SOURCE:
            raise TemplateError(f"{where}: chat template has {len(self.source)} characters, more than {MAX_SOURCE}")
        self._env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                                        filters={"tojson": _tojson},
                                        globals={"raise_exception": _raise, "strftime_now": _strftime_now})
        self._env.new_budget()  # compiling folds constant expressions: filters run then too
        try:
            self._template = self._env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}: chat template has a syntax error at line {e.lineno}: "
                                f"{_short(e.message)}") from None
        except RecursionError:
            raise TemplateError(f"{where}: chat template nests too deeply") from None
        except Exception as e:  # jinja's generated Python may fail to compile (too many nested blocks ...)
            raise TemplateError(f"{where}: chat template cannot be compiled: {type(e).__name__}: {_short(e)}") from None

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
        budget = self._env.new_budget(template_budget.DEADLINE_S)
        out, n = [], 0
        try:
            for chunk in self._template.generate(messages=messages, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **ctx):
                n += len(chunk)
                if n > MAX_OUTPUT:
                    raise OverBudget(f"output exceeds {MAX_OUTPUT} characters")
                budget.tick()
                out.append(chunk)
        except OverBudget as e:
            raise TemplateError(f"{self.where}: chat template {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self.where}: chat template refused by the sandbox: {_short(e)}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.where}: chat template error: {_short(e)}") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: chat template recurses too deeply") from None
        except Exception as e:  # a template may fail in many Python ways; none of them is ours
            raise TemplateError(f"{self.where}: chat template failed: {type(e).__name__}: {_short(e)}") from None
        return "".join(out)


def _short(e: object) -> str:
    # a template can raise with a message of megabytes; the user needs its start
    text = str(e)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + f"... ({len(text)} characters)"


def _raise(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt):
    if isinstance(fmt, str) and len(fmt) * STRFTIME_GROWTH > MAX_TEXT:
        raise OverBudget(f"passes strftime_now a format of {len(fmt)} characters")
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
