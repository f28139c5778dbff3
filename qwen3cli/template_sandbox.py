"""The sandbox chat templates render in: jinja2's ImmutableSandboxedEnvironment under a budget
that holds for every construct, so a template from a stranger cannot hang or exhaust memory.

- Time: a deadline, checked on every loop iteration (the code generator puts the check into each
  `for` body and loop filter, so a loop that outputs and calls nothing still meets it), call,
  filter, test, operator, literal, slice and output. Between two checks a template can only do
  one bounded step.
- Size, checked before the work is done: every step that can build something larger than its
  inputs (`*`, `+`, `~`, `%`, format widths, padding, replace, join, indent, ...) is measured
  first. One string holds at most MAX_TEXT characters, one container MAX_ITEMS items, and one
  nested value weighs at most MAX_WEIGHT (its printed size, shared parts counted each time they
  are printed: what printing, comparing or hashing it costs).
- Memory: what a render allocates is charged against MAX_MEMORY bytes, so many values, each
  under the size limits, cannot add up to gigabytes either.

Nothing here changes what a template renders: the checks only refuse.
"""

from __future__ import annotations

import codecs
import re
import sys
import threading
import time
import types
from collections.abc import ItemsView, KeysView, Mapping, Sized, ValuesView
from functools import update_wrapper, wraps
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import EscapeFormatter, Markup

from .errors import Qwen3CliError

MAX_TEXT = 16 << 20  # characters in one string, the render's output included
MAX_ITEMS = 1 << 20  # items in one list, tuple or dict; also the largest integer argument
MAX_WEIGHT = 16 << 20  # printed size of one nested value, shared parts counted each time
MAX_MEMORY = 256 << 20  # bytes one render may allocate, garbage included
MAX_ITERATIONS = 1_000_000  # range() items per render, all calls together
MAX_INT_BITS = 1 << 16
MAX_SLOW_TEXT = 1 << 20  # characters for filters that work a word at a time in Python (title, urlize...)
MAX_LIPSUM_WORDS = 100_000
DEADLINE_S = 5.0
REPR_GROWTH = 10  # repr() writes a character as at most 10 ('\U000e0001')
JSON_GROWTH = 6  # json.dumps writes a character as at most 6 ('\u0001')
LINEAR_CODECS = frozenset(["utf-8", "ascii", "latin-1", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be",
                           "utf-32", "utf-32-le", "utf-32-be"])


_now = time.monotonic
_sizeof = sys.getsizeof
_SCALARS = frozenset([bool, int, float, type(None)])
_SCOPE = ("_loop_vars", "_block_vars")


class TemplateError(Qwen3CliError):
    """The chat template is invalid, unsafe, over budget, or raised an error itself."""


class OverBudget(TemplateError):
    """The template asked for more time, memory or size than a render may have."""


class Budget:
    """One render's allowance. Containers are weighed once: the sandbox forbids changing a list or
    a dict, so a weight stays true; namespaces change, so whatever holds one is weighed afresh."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.iterations = 0
        self.memory = 0
        self._weights: dict[int, tuple[Any, int, int]] = {}  # id -> (the object, kept alive; weight; depth)
        self._open: set[int] = set()
        self._passing: dict[int, tuple[Any, int, int]] = {}

    # -- time and memory ------------------------------------------------------------------------
    def tick(self) -> bool:
        if _now() > self.deadline:
            raise OverBudget(f"took longer than {self.deadline_s:g} s")
        return True

    def charge(self, value: Any, fresh_items: bool = False) -> Any:
        """Count value's bytes against MAX_MEMORY; with fresh_items, its items' too (a call's result
        is usually made of new objects, a literal or a slice of existing ones)."""
        n = _sizeof(value)
        if fresh_items and type(value) in (list, tuple):
            n += sum(map(_sizeof, value))
        elif fresh_items and type(value) is dict:
            n += sum(map(_sizeof, value)) + sum(map(_sizeof, value.values()))
        self.memory += n
        if self.memory > MAX_MEMORY:
            raise OverBudget(f"allocates more than {MAX_MEMORY >> 20} MB")
        return value

    def checked(self, value: Any, fresh_items: bool = True) -> Any:
        """A value a call, operator or literal just made: within the size limits, and charged."""
        t = type(value)
        if t is str:  # the common case, kept short
            if len(value) > MAX_TEXT:
                self.check_text(len(value), "a result")
            self.memory += _sizeof(value)
            if self.memory > MAX_MEMORY:
                self.charge(None)
            return value
        if t in _SCALARS:  # small, and only kept by a container, which is charged
            return value
        if isinstance(value, (str, bytes)):
            self.check_text(len(value), "a result")
        elif isinstance(value, (list, tuple, dict)):
            self.check_items(len(value), "a result")
            self.weight(value)
        elif t is Namespace:
            self.weight(value)
        return self.charge(value, fresh_items)

    # -- sizes ----------------------------------------------------------------------------------
    @staticmethod
    def check_text(n: int, what: str) -> None:
        if n > MAX_TEXT:
            raise OverBudget(f"builds a string of {n} characters with {what} (at most {MAX_TEXT})")

    @staticmethod
    def check_items(n: int, what: str) -> None:
        if n > MAX_ITEMS:
            raise OverBudget(f"builds {n} items with {what} (at most {MAX_ITEMS})")

    def weight(self, value: Any) -> int:
        """Roughly the characters value prints as: what printing, comparing or hashing it costs."""
        return self.measure(value)[0]

    def depth(self, value: Any) -> int:
        return self.measure(value)[1]

    def measure(self, value: Any) -> tuple[int, int, bool]:
        """(weight, nesting depth, whether the weight stays true: no namespace inside)."""
        self._passing = {}  # namespaces and what holds them: weighed once per measure, nothing changes meanwhile
        try:
            return self._weigh(value, MAX_WEIGHT)
        finally:
            self._passing = {}

    def remember(self, value: Any, weight: int, depth: int) -> None:
        """A weight known from the parts (x * n, a + b), so that checking the result costs nothing."""
        self._weights[id(value)] = (value, weight, depth)

    def text_size(self, value: Any) -> int:
        """At least the characters str(value) has, measured without building it."""
        if isinstance(value, str):
            return len(value)
        if isinstance(value, bytes):
            return 4 * len(value) + 3
        w = self.weight(value)
        return w if type(value) in _SCALARS else REPR_GROWTH * w

    def _weigh(self, v: Any, room: int) -> tuple[int, int, bool]:
        t = type(v)
        if t is str or t is bytes:
            return len(v) + 2, 0, True
        if t in _SCALARS:
            return (v.bit_length() // 3 + 2 if t is int else 24), 0, True
        known = self._weights.get(id(v)) or self._passing.get(id(v))
        if known is not None:
            return known[1], known[2], id(v) in self._weights
        if t in (list, tuple, dict) or isinstance(v, (list, tuple, dict, set, frozenset)):
            w, d, pure = self._weigh_items(v.items() if isinstance(v, dict) else v, room, isinstance(v, dict))
            (self._weights if pure else self._passing)[id(v)] = (v, w, d)
            return w, d, pure
        if isinstance(v, (str, bytes)):
            return len(v) + 2, 0, True
        if isinstance(v, int):
            return v.bit_length() // 3 + 2, 0, True
        if isinstance(v, Namespace):
            if id(v) in self._open:  # a namespace inside itself prints as {...}
                return 16, 0, False
            self._open.add(id(v))
            try:
                w, d, _ = self._weigh_items(object.__getattribute__(v, "_Namespace__attrs").items(), room, True)
            finally:
                self._open.discard(id(v))
            self._passing[id(v)] = (v, w + 16, d)
            return w + 16, d, False
        if isinstance(v, (KeysView, ValuesView, ItemsView)):
            w, d, _ = self._weigh_items(v, room, isinstance(v, ItemsView))
            return w + 16, d, False
        return 24, 0, True

    def _weigh_items(self, items, room: int, pairs: bool) -> tuple[int, int, bool]:
        if not pairs and items:  # the common cases, counted in C: a list of strings, of integers
            if all(type(x) is str for x in items):
                return self._flat(4 + sum(map(len, items)) + 4 * len(items), room)
            if all(type(x) is int for x in items):
                return self._flat(4 + sum(map(int.bit_length, items)) // 3 + 4 * len(items), room)
        w, depth, pure = 4, 0, True
        for x in items:
            for p in (x if pairs else (x,)):
                pw, pd, pp = self._weigh(p, room - w)
                w += pw + 2
                depth = max(depth, pd + 1)
                pure = pure and pp
            if w > room:
                raise OverBudget(f"builds a value that prints as more than {MAX_WEIGHT} characters")
        return w, depth, pure

    @staticmethod
    def _flat(w: int, room: int) -> tuple[int, int, bool]:
        if w > room:
            raise OverBudget(f"builds a value that prints as more than {MAX_WEIGHT} characters")
        return w, 1, True

    def take(self, iterable: Any, what: str) -> Any:
        """iterable, with at most MAX_ITEMS items: an iterator is drawn into a list, counting as it goes."""
        if isinstance(iterable, Sized):
            self.check_items(len(iterable), what)
            return iterable
        out = []
        for i, x in enumerate(iterable):
            if not i & 1023:
                self.tick()
                self.check_items(i, what)
            out.append(x)
        self.check_items(len(out), what)
        return out


# -- estimates of what a step builds, before it runs ----------------------------------------------

def _weight_of(w: int, what: str) -> int:
    if w > MAX_WEIGHT:
        raise OverBudget(f"builds a value that prints as more than {MAX_WEIGHT} characters with {what}")
    return w


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 12 else 10**12  # int() of a huge digit string is itself slow


def _scalar_size(b: Budget, value: Any, conversion: str) -> int:
    if conversion in "ra":
        return REPR_GROWTH * b.text_size(value) + 2
    if conversion == "c":
        return 1
    if conversion in "sb":
        return b.text_size(value)
    if isinstance(value, int):  # d i o u x X: at most a digit per bit
        return value.bit_length() + 2
    return 330  # a float: 308 digits at most before the point


def printf_size(b: Budget, fmt: str | bytes, args: Any) -> int:
    """Characters `fmt % args` makes at most, from its conversions' widths, precisions and values."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    positional = list(args) if isinstance(args, tuple) else [args]
    # like Python: anything subscriptable but a tuple or a string serves %(key)s (a namespace too)
    by_key = not isinstance(args, (tuple, str, bytes)) and hasattr(type(args), "__getitem__")
    total, i, k, n = 0, 0, 0, len(fmt)

    def star_or_digits(j):
        nonlocal k
        if j < n and fmt[j] == "*":
            v = positional[k] if k < len(positional) else 0
            k += 1
            return (abs(v) if isinstance(v, int) else 0), j + 1
        m = j
        while m < n and fmt[m].isdigit():
            m += 1
        return (_number(fmt[j:m]) if m > j else 0), m

    while (j := fmt.find("%", i)) >= 0:
        total += j - i
        j += 1
        key = None
        if j < n and fmt[j] == "(":  # a mapping key, parentheses nested as Python counts them
            depth, start = 1, j + 1
            while depth and j + 1 < n:
                j += 1
                depth += (fmt[j] == "(") - (fmt[j] == ")")
            key, j = fmt[start:j], j + 1
        while j < n and fmt[j] in "-+ #0":
            j += 1
        width, j = star_or_digits(j)
        precision = 0
        if j < n and fmt[j] == ".":
            precision, j = star_or_digits(j + 1)
        while j < n and fmt[j] in "hlL":
            j += 1
        conversion = fmt[j] if j < n else "%"
        j += 1
        if conversion == "%":
            piece = 1
        else:
            if key is not None:
                value = _item(args, key) if by_key else None
            else:
                value = positional[k] if k < len(positional) else None
                k += 1
            piece = _scalar_size(b, value, conversion) + precision
        total += max(width, piece)
        i = j
    return total + n - i


def _item(mapping, key):
    try:
        return mapping[key]
    except Exception:  # Python's % will say what is wrong
        return None


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
        widths = [_number(d) for d in re.findall(r"\d+", format_spec)]  # width or precision, whichever is larger
        self._total += max(widths, default=0) + self.growth * b.text_size(value) + 330
        b.check_text(self._total, "str.format")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    growth = 2 * JSON_GROWTH  # and escaped


def _lines(s: str | bytes) -> int:
    if isinstance(s, bytes):
        return s.count(b"\n") + s.count(b"\r") + 1
    return sum(s.count(c) for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029") + 1


def _replaced_size(s, old, new, count=-1) -> int:
    hits = s.count(old) if len(old) else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


# str and bytes methods: what they build at most, checked before they run
def _m_pad(b, s, width, fillchar=" "):
    b.check_text(max(len(s), width), "padding")


def _m_expandtabs(b, s, tabsize=8):
    b.check_text(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tabsize, 0), "expandtabs")


def _m_replace(b, s, old, new, count=-1):
    b.check_text(_replaced_size(s, old, new, count), "replace")


def _m_join(b, s, iterable):
    items = b.take(iterable, "join")
    b.check_items(len(items), "join")
    b.check_text(sum(len(x) if isinstance(x, (str, bytes)) else 0 for x in items)
                 + max(len(items) - 1, 0) * len(s), "join")
    return (items,), {}


def _m_translate(b, s, table):
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
    longest = max((len(v) for v in b.take(values, "translate") if isinstance(v, (str, bytes))), default=1)
    b.check_text(len(s) * max(longest, 1), "translate")


def _m_codec(b, s, encoding="utf-8", errors="strict"):
    try:
        name = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        return  # the call itself says what is wrong
    if name not in LINEAR_CODECS:  # punycode and friends are quadratic in pure Python
        raise OverBudget(f"uses the {name} codec, which the sandbox does not allow")
    # 'namereplace' writes a character as its Unicode name, up to ~90 bytes
    b.check_text(len(s) * (4 if errors in ("strict", "ignore", "replace") else 100), "encode")


def _m_split(b, s, sep=None, maxsplit=-1):
    pieces = s.count(sep) + 1 if sep else len(s) // 2 + 1
    if isinstance(maxsplit, int) and maxsplit >= 0:
        pieces = min(pieces, maxsplit + 1)
    b.check_items(pieces, "split")


def _m_splitlines(b, s, keepends=False):
    b.check_items(_lines(s), "splitlines")


def _m_case(b, s, *args):
    b.check_text(3 * len(s), "a change of case")  # 'ß'.upper() is 'SS'; 'ΐ' becomes three characters


# str and bytes methods that can build more than their string holds (the rest never do)
STRING_METHODS = {"center": _m_pad, "ljust": _m_pad, "rjust": _m_pad, "zfill": _m_pad, "expandtabs": _m_expandtabs,
                  "replace": _m_replace, "join": _m_join, "translate": _m_translate, "encode": _m_codec,
                  "decode": _m_codec, "split": _m_split, "rsplit": _m_split, "splitlines": _m_splitlines,
                  "upper": _m_case, "lower": _m_case, "casefold": _m_case, "swapcase": _m_case, "title": _m_case,
                  "capitalize": _m_case}


class Done:
    """A filter check that did the filter's work itself."""

    def __init__(self, value):
        self.value = value


# filters: the same, called with the filter's arguments (without jinja's context argument); a check
# returns None, new (args, kwargs) for the filter, or Done
def _text(b, value, what: str) -> str:
    """str(value), measured before it is built."""
    if isinstance(value, str):
        return value
    b.check_text(b.text_size(value), what)
    return str(value)


def _f_center(b, env, value, width=80):
    b.check_text(max(b.text_size(value), width), "center")


def _f_indent(b, env, s, width=4, first=False, blank=False):
    pad = len(width) if isinstance(width, str) else max(width, 0)
    s = _text(b, s, "indent")
    b.check_text(len(s) + pad * (_lines(s) + 1), "indent")


def _f_wordwrap(b, env, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    _slow(b, s, "wordwrap")
    # at most a break per character, each as long as wrapstring
    b.check_text(len(s) * (1 + len(wrapstring if wrapstring is not None else env.newline_sequence)), "wordwrap")


def _f_truncate(b, env, s, length=255, killwords=False, end="...", leeway=None):
    b.check_text(b.text_size(s) + b.text_size(end), "truncate")


def _f_format(b, env, value, *args, **kwargs):
    b.check_text(printf_size(b, _text(b, value, "format"), kwargs or args), "format")


def _f_replace(b, env, s, old, new, count=None):
    s, old, new = (_text(b, x, "replace") for x in (s, old, new))
    b.check_text(_replaced_size(s, old, new, -1 if count is None else count), "replace")


def _f_join(b, env, value, d="", attribute=None):
    items = b.take(value, "join")
    if attribute is not None:
        get = make_attrgetter(env, attribute)
        items = [get(x) for x in items]
    b.check_text(sum(b.text_size(x) for x in items) + max(len(items) - 1, 0) * b.text_size(d), "join")
    return (items, d), {}


def _f_sum(b, env, iterable, attribute=None, start=0):
    items = b.take(iterable, "sum")
    if isinstance(start, (int, float)):
        return (items, attribute, start), {}  # numbers: jinja's own sum (the same float rounding)
    if attribute is not None:
        get = make_attrgetter(env, attribute)
        items = [get(x) for x in items]
    # sum() of lists copies the growing total at every step, unchecked: add one by one instead
    total = start
    for x in items:
        total = env.call_binop(None, "+", total, x)
    return Done(total)


def _f_take(b, env, value, *args, **kwargs):
    # filters that draw their input into a list: a string becomes one object per character
    return (b.take(value, "a filter"), *args), kwargs


def _f_reverse(b, env, value):
    if isinstance(value, Sized):
        b.check_items(len(value), "reverse")
        return None
    items = list(b.take(value, "reverse"))
    items.reverse()  # what jinja does with an iterator
    return Done(items)


def _f_text(growth: int):
    def check(b, env, value, *args, **kwargs):
        b.check_text(growth * b.text_size(value), "a filter")

    return check


def _f_tojson(b, env, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    seps = sum(b.text_size(x) for x in separators) if isinstance(separators, (list, tuple)) else 2
    w = b.weight(value)
    # ensure_ascii writes an emoji as a surrogate pair, \ud83d\ude00: 12 characters
    growth = 2 * JSON_GROWTH if ensure_ascii else JSON_GROWTH
    b.check_text(growth * w + w * (b.depth(value) * pad + seps + 1), "tojson")


def _f_pprint(b, env, value):
    w = b.weight(value)
    b.check_text(REPR_GROWTH * w + w * (b.depth(value) + 1), "pprint")


def _f_striptags(b, env, value):
    s = _text(b, value, "striptags")
    # markupsafe cuts one tag at a time, copying the rest each time: tags times length
    if (s.count("<") + 1) * len(s) > MAX_SLOW_TEXT * 1024:
        raise OverBudget(f"strips tags from {len(s)} characters with {s.count('<')} tags (too slow)")


def _slow(b, value, what: str) -> None:
    if b.text_size(value) > MAX_SLOW_TEXT:
        raise OverBudget(f"runs {what} on more than {MAX_SLOW_TEXT} characters (too slow)")


def _f_slow(growth: int):
    def check(b, env, value, *args, **kwargs):
        _slow(b, value, "a word-by-word filter")
        # urlize can add its target and rel to every word
        extra = sum(b.text_size(a) for a in (*args, *kwargs.values()) if isinstance(a, str))
        b.check_text(b.text_size(value) * (growth + extra), "a filter")

    return check


FILTERS = {"center": _f_center, "indent": _f_indent, "wordwrap": _f_wordwrap, "truncate": _f_truncate,
           "format": _f_format, "replace": _f_replace, "join": _f_join, "sum": _f_sum, "tojson": _f_tojson,
           "pprint": _f_pprint, "striptags": _f_striptags, "reverse": _f_reverse,
           **dict.fromkeys(["list", "sort", "unique", "min", "max", "slice", "batch", "groupby", "map", "select",
                            "reject", "selectattr", "rejectattr"], _f_take),
           **dict.fromkeys(["string", "safe", "trim"], _f_text(1)),
           **dict.fromkeys(["capitalize", "upper", "lower"], _f_text(3)),
           **dict.fromkeys(["escape", "e", "forceescape", "xmlattr"], _f_text(JSON_GROWTH)),
           "urlencode": _f_slow(12), "title": _f_slow(3), "wordcount": _f_slow(1), "urlize": _f_slow(64)}


def _check_int_args(args, kwargs) -> None:
    # 'x'.ljust(10**9), range(10**9), batch(10**9): one huge integer is how a template asks for a
    # huge allocation or loop
    for v in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(v, int) and not -MAX_ITEMS <= v <= MAX_ITEMS:
            raise OverBudget(f"passes {v}, more than {MAX_ITEMS}, to a function")


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
        self._local.budget = Budget(DEADLINE_S if deadline_s is None else deadline_s)
        return self._local.budget

    def tick(self) -> bool:
        return self._local.budget.tick()

    # -- what the generated code calls -----------------------------------------------------------
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        b = __self._local.budget
        if _now() > b.deadline:
            b.tick()
        _check_int_args(args, kwargs)
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
        if _now() > b.deadline:
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
                known = _weight_of(lw + rw, "+"), max(ld, rd), lp and rp
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
                return _weight_of(w * n, "*"), d, pure
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
            if _now() > b.deadline:
                b.tick()
            _check_int_args(args, kwargs)  # jinja's context argument is never an int
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
