"""The budget a chat template renders under: its limits, and the per-render Budget that the
sandbox (template_sandbox.py) charges every step to.

- Time: a deadline, checked between steps; a step is bounded, so a render ends soon after it.
- Size: one string holds at most MAX_TEXT characters, one container MAX_ITEMS items, and one
  nested value weighs at most MAX_WEIGHT (its printed size, shared parts counted each time they
  are printed: what printing, comparing or hashing it costs). What a step would build is
  measured before it runs (template_checks.py).
- Memory: what a render allocates is charged against MAX_MEMORY bytes, so many values, each
  under the size limits, cannot add up to gigabytes either.
"""

from __future__ import annotations

import sys
import time
from collections.abc import ItemsView, KeysView, Sized, ValuesView
from typing import Any

from jinja2.utils import Namespace

from ..errors import Qwen3CliError

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
NUMBER_TEXT = 330  # characters a float formats to at most: 309 digits, sign, point, a few more


clock = time.monotonic  # the deadline's clock, bound once: every step reads it
_sizeof = sys.getsizeof
_SCALARS = frozenset([bool, int, float, type(None)])


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
        if clock() > self.deadline:
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


def weight_of(w: int, what: str) -> int:
    if w > MAX_WEIGHT:
        raise OverBudget(f"builds a value that prints as more than {MAX_WEIGHT} characters with {what}")
    return w
