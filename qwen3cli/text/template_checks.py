"""What a template step would build, measured before it runs: the checks the sandbox makes on
`%` formatting, str and bytes methods, and filters. Each raises OverBudget when the step would
build more than the budget's limits allow; none changes what the step does.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sized
from typing import Any

from jinja2.filters import make_attrgetter

from .template_budget import JSON_GROWTH, MAX_ITEMS, MAX_SLOW_TEXT, NUMBER_TEXT, REPR_GROWTH, Budget, OverBudget

LINEAR_CODECS = frozenset(["utf-8", "ascii", "latin-1", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be",
                           "utf-32", "utf-32-le", "utf-32-be"])


def number(digits: str) -> int:
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
    return NUMBER_TEXT  # a float


def printf_size(b: Budget, fmt: str | bytes, args: Any) -> int:
    """Characters `fmt % args` makes at most, from its conversions' widths, precisions and values."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    positional = list(args) if isinstance(args, tuple) else [args]
    # as Python decides: anything subscriptable but a tuple or a string serves %(key)s
    by_key = not isinstance(args, (tuple, str, bytes)) and hasattr(type(args), "__getitem__")
    total, i, k, n = 0, 0, 0, len(fmt)

    def star_or_digits(j):
        nonlocal k
        if j < n and fmt[j] == "*":
            v = positional[k] if k < len(positional) else 0
            k += 1
            return (abs(v) if isinstance(v, int) else 0), j + 1
        m = j
        while m < n and fmt[m] in "0123456789":  # (Python's % reads ASCII digits only)
            m += 1
        return (number(fmt[j:m]) if m > j else 0), m

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


def check_int_args(args, kwargs) -> None:
    # 'x'.ljust(10**9), range(10**9), batch(10**9): one huge integer is how a template asks for a
    # huge allocation or loop
    for v in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(v, int) and not -MAX_ITEMS <= v <= MAX_ITEMS:
            raise OverBudget(f"passes {v}, more than {MAX_ITEMS}, to a function")
