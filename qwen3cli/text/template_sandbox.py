"""The sandbox chat templates render in: jinja2's ImmutableSandboxedEnvironment, every step of
it under the current thread's Budget (template_budget.py), so that a template from a stranger
cannot hang or exhaust memory.

The code generator puts a deadline check into each `for` body and loop filter (a loop that
outputs and calls nothing still meets it); calls, filters, tests, operators, `~`, literals,
slices, captured blocks and outputs are measured before they run (template_checks.py) and
charged after. Nothing here changes what a template renders: the checks only refuse.
"""

from __future__ import annotations

import re
import threading
import types
from functools import update_wrapper, wraps
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from markupsafe import EscapeFormatter, Markup

from . import template_budget
from .template_budget import (JSON_GROWTH, MAX_INT_BITS, MAX_ITERATIONS, MAX_LIPSUM_WORDS, NUMBER_TEXT,
                              REPR_GROWTH, Budget, OverBudget, clock, weight_of)
from .template_checks import FILTERS, STRING_METHODS, Done, check_int_args, number, printf_size

_SCOPE = ("_loop_vars", "_block_vars")


class _BoundedFormatter(SandboxedFormatter):
    """str.format and format_map: every field's width and value measured before it is formatted."""

    growth = 2  # str(value), and room for grouping commas

    def __init__(self, env: "BudgetedEnvironment", **kwargs: Any):
        super().__init__(env, **kwargs)
        self._total = 0

    def vformat(self, format_string, args, kwargs):
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value, conversion):
        if conversion is not None:  # !s, !r and !a build a string before format_field sees it
            b = self._env.budget
            b.check_text((REPR_GROWTH if conversion in ("r", "a") else 1) * b.text_size(value), "a ! field")
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        b = self._env.budget
        b.tick()
        widths = [number(d) for d in re.findall(r"\d+", format_spec)]  # width or precision, whichever is larger
        self._total += max(widths, default=0) + self.growth * b.text_size(value) + NUMBER_TEXT
        b.check_text(self._total, "str.format")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    growth = 2 * JSON_GROWTH  # and escaped


# -- the code generator: a deadline check in every loop ------------------------------------------

class _BudgetedCode(CodeGenerator):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._loop_parts: dict[int, Any] = {}  # id -> a loop's body or filter condition (kept alive)

    def visit_For(self, node, frame):
        # a deadline check in every iteration, and before every filter condition (items the filter
        # skips never reach the body): four nested loops that output nothing are stopped too
        for part in (node.body, node.test):
            if part is not None:
                self._loop_parts[id(part)] = part
        super().visit_For(node, frame)

    def blockvisit(self, body, frame):
        if self._loop_parts.get(id(body)) is body:
            self.writeline("environment.tick()")
        super().blockvisit(body, frame)

    def visit(self, node, *args, **kwargs):
        if self._loop_parts.get(id(node)) is not node:
            return super().visit(node, *args, **kwargs)
        self.write("(environment.tick() and (")
        super().visit(node, *args, **kwargs)
        self.write("))")

    @optimizeconst
    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.tilde((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _made(self, visit, node, frame):
        self.write("environment.made(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._made(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._made(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx != "load":  # an assignment target: `{% for a, b in ... %}`
            return super().visit_Tuple(node, frame)
        self._made(super().visit_Tuple, node, frame)

    @optimizeconst
    def visit_Getitem(self, node, frame):
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.sliced(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if i else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")


# -- the environment --------------------------------------------------------------------------

class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """An ImmutableSandboxedEnvironment whose every step is under the current thread's Budget
    (`with env.budgeted(): ...`)."""

    code_generator_class = _BudgetedCode
    intercepted_binops = frozenset(["+", "*", "%", "**"])

    def __init__(self, *, filters: dict | None = None, globals: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._local = threading.local()
        self.finalize = self._output
        self.filters.update(filters or {})
        self.filters = {name: self._bounded(name, f, FILTERS.get(name)) for name, f in self.filters.items()}
        self.tests = {name: self._bounded(name, f, None) for name, f in self.tests.items()}
        self.globals.update(range=self._range, lipsum=self._lipsum, **(globals or {}))

    # -- the budget ----------------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        return self._local.budget

    def new_budget(self, deadline_s: float | None = None) -> Budget:
        self._local.budget = Budget(template_budget.DEADLINE_S if deadline_s is None else deadline_s)
        return self._local.budget

    def tick(self) -> bool:
        return self._local.budget.tick()

    # -- what the generated code calls -----------------------------------------------------------
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        b = __self._local.budget
        if clock() > b.deadline:
            b.tick()
        check_int_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if type(owner) is str or isinstance(owner, (str, bytes)):
            own = {k: v for k, v in kwargs.items() if k not in _SCOPE} if kwargs else kwargs  # not jinja's
            if isinstance(owner, Markup):  # Markup's methods escape their arguments: & becomes &amp;
                b.check_text(JSON_GROWTH * (len(owner) + sum(map(b.text_size, (*args, *own.values())))),
                             "a Markup method")
            check = STRING_METHODS.get(getattr(__obj, "__name__", ""))
            replaced = check(b, owner, *args, **own) if check is not None else None
            if replaced is not None:
                args, kwargs = replaced[0], {**kwargs, **replaced[1]}
        elif __obj is dict and args:
            args = (b.take(args[0], "dict"), *args[1:])
        return b.checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        b = self._local.budget
        if clock() > b.deadline:
            b.tick()
        known = None  # the result's (weight, depth), from its parts
        if operator == "+":
            if type(left) is str and type(right) is str:
                b.check_text(len(left) + len(right), "+")
            elif isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
                growth = JSON_GROWTH if isinstance(left, Markup) or isinstance(right, Markup) else 1
                b.check_text(growth * (len(left) + len(right)), "+")
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                b.check_items(len(left) + len(right), "+")
                (lw, ld, lp), (rw, rd, rp) = b.measure(left), b.measure(right)
                known = weight_of(lw + rw, "+"), max(ld, rd), lp and rp
        elif operator == "*":
            known = self._check_repeat(b, left, right)
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
                raise OverBudget("raises a number to an exponent larger than 64")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * abs(right) > MAX_INT_BITS:
                raise OverBudget(f"builds a number of more than {MAX_INT_BITS} bits with **")
        elif operator == "%" and isinstance(left, (str, bytes)):
            growth = JSON_GROWTH if isinstance(left, Markup) else 1
            b.check_text(growth * printf_size(b, left, right), "% formatting")
        result = self.binop_table[operator](left, right)
        if known is not None and known[2] and isinstance(result, (list, tuple)):
            b.remember(result, known[0], known[1])
        return b.checked(result, fresh_items=False)

    @staticmethod
    def _check_repeat(b: Budget, left, right) -> tuple[int, int, bool] | None:
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise OverBudget(f"builds a number of more than {MAX_INT_BITS} bits with *")
            return None
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and n > 0:
                if isinstance(seq, (str, bytes)):
                    b.check_text(len(seq) * n, "*")
                    return None
                b.check_items(len(seq) * n, "*")
                w, d, pure = b.measure(seq)
                return weight_of(w * n, "*"), d, pure
        return None

    def tilde(self, parts: tuple) -> str:
        """The `~` operator: str() of each part, joined, measured first."""
        b = self._local.budget
        b.tick()
        b.check_text(sum(b.text_size(p) for p in parts), "~")
        return b.charge("".join(map(str, parts)))

    def made(self, value):
        """A list, tuple or dict literal: made of existing values, but [x, x] nested twenty times
        weighs a million x."""
        b = self._local.budget
        b.tick()
        b.weight(value)
        return b.charge(value)

    def sliced(self, value, key: slice):
        b = self._local.budget
        b.tick()
        return b.charge(value[key])

    def concat(self, parts) -> str:  # type: ignore[override]
        """Joins what a {% set %} block, a macro or a {% call %} captured."""
        b = self._local.budget
        b.tick()
        parts = parts if isinstance(parts, list) else list(parts)
        b.check_text(sum(len(p) for p in parts), "a captured block")
        return b.charge("".join(parts))

    def _output(self, value):
        """Every {{ expression }}: converted here, where its size is checked first."""
        if type(value) is str:  # the render loop checks the deadline between outputs
            return value
        b = self._local.budget
        b.check_text(b.text_size(value), "{{ }}")
        return b.charge(str(value))

    def wrap_str_format(self, value):
        # jinja's own wrapper, with a formatter that measures each field first
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        fmt, as_map = value.__self__, value.__name__ == "format_map"
        formatter = (_BoundedEscapeFormatter(self, escape=fmt.escape) if isinstance(fmt, Markup)
                     else _BoundedFormatter(self))

        def wrapper(*args, **kwargs):
            if as_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                args, kwargs = (), args[0]
            return type(fmt)(formatter.vformat(fmt, args, kwargs))

        return update_wrapper(wrapper, value)

    # -- filters, tests and globals --------------------------------------------------------------
    def _bounded(self, name: str, f, check):
        context_arg = 1 if getattr(f, "jinja_pass_arg", None) else 0
        local = self._local

        @wraps(f)  # keeps jinja's pass_context / pass_environment marker
        def g(*args, **kwargs):
            b = local.budget
            if clock() > b.deadline:
                b.tick()
            check_int_args(args, kwargs)  # jinja's context argument is never an int
            if check is not None:
                r = check(b, self, *args[context_arg:], **kwargs)
                if isinstance(r, Done):
                    return b.checked(r.value)
                if r is not None:
                    args, kwargs = (*args[:context_arg], *r[0]), r[1]
            return b.checked(f(*args, **kwargs))

        return g

    def _range(self, *args):
        r = range(*args)
        b = self._local.budget
        b.iterations += len(r)
        if b.iterations > MAX_ITERATIONS:
            raise OverBudget(f"loops more than {MAX_ITERATIONS} times")
        return r

    def _lipsum(self, n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's parameter names)
        if isinstance(n, int) and isinstance(max, int) and n * max > MAX_LIPSUM_WORDS:
            raise OverBudget(f"asks lipsum for more than {MAX_LIPSUM_WORDS} words")
        return generate_lorem_ipsum(n, html, min, max)
