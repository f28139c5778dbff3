"""Typed, range-checked reads of metadata that strangers wrote: GGUF keys, config.json,
generation_config.json, the tokenizer files.

A file holds whatever its writer put there: a string where a number belongs, a token id of
2^40, nan, an array instead of a scalar. Every read goes through `Fields`, which returns a
plain Python value of the wanted type and range or raises one error naming the file, the key
and what was wanted, instead of a TypeError three calls later. Integers stay Python ints, so
a product of sizes never wraps around the way a numpy int64 does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from quant.files import read_json
from quant.gguf_file import StringArray

from .errors import ConfigError

REQUIRED = object()
KB, MB = 1 << 10, 1 << 20


def describe(v: Any) -> str:
    """A short, printable account of a value for an error line (repr escapes control characters)."""
    if v is None:
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, StringArray):
        return f"an array of {len(v)} string{'s' * (len(v) != 1)}"
    if isinstance(v, np.ndarray):
        return f"an array of {v.size} {v.dtype}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 4 and not any(isinstance(x, (list, tuple, dict)) for x in v):
            return "[" + ", ".join(repr(x[:20]) if isinstance(x, str) else describe(x) for x in v) + "]"
        return f"a list of {len(v)} item{'s' * (len(v) != 1)}"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


def _interval(lo, hi, open_lo: bool, open_hi: bool) -> str:
    return f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class Fields:
    """Typed access to one mapping of key -> value read from `where`.

    A key that is absent (or JSON null) gives `default`, or is an error when there is none.
    Nested JSON objects are read through `section`, which names keys by their dotted path.
    """

    def __init__(self, values: Mapping[str, Any], where: str | os.PathLike, *, prefix: str = "",
                 error: type[Exception] = ConfigError):
        self.values, self.where, self.prefix, self.error = values, str(where), prefix, error

    def name(self, key: str) -> str:
        return repr(self.prefix + key)

    def fail(self, key: str, want: str, v: Any) -> Exception:
        return self.error(f"{self.where}: {self.name(key)} must be {want}, got {describe(v)}")

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        v = self.values.get(key)
        if v is None:
            if default is REQUIRED:
                raise self.error(f"{self.where}: missing {self.name(key)}")
            return default
        return v

    def int(self, key: str, lo: int, hi: int, default: Any = REQUIRED) -> int:
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        if not is_int(v) or not lo <= int(v) <= hi:
            raise self.fail(key, f"an integer in {lo}..{hi}", v)
        return int(v)

    def number(self, key: str, lo: float, hi: float, default: Any = REQUIRED, *,
               open_lo: bool = False, open_hi: bool = False) -> float:
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        if is_int(v):
            x = int(v)  # compared exactly: an int of 400 digits has no float
        elif isinstance(v, (float, np.floating)) and math.isfinite(float(v)):
            x = float(v)
        else:
            x = None
        if x is None or not ((lo < x if open_lo else lo <= x) and (x < hi if open_hi else x <= hi)):
            raise self.fail(key, f"a number in {_interval(lo, hi, open_lo, open_hi)}", v)
        return float(x)

    def flag(self, key: str, default: Any = REQUIRED) -> bool:
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        if not isinstance(v, (bool, np.bool_)):
            raise self.fail(key, "true or false", v)
        return bool(v)

    def text(self, key: str, default: Any = REQUIRED, choices: tuple[str, ...] | None = None) -> str:
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        if not isinstance(v, str) or (choices is not None and v not in choices):
            want = "a string" if choices is None else " or ".join(map(repr, choices))
            raise self.fail(key, want, v)
        return v

    def texts(self, key: str, default: Any = REQUIRED, max_len: int = 1 << 24):
        """An array of strings: a GGUF string array or a JSON list, returned as it is."""
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        ok = isinstance(v, StringArray) or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v))
        if not ok or len(v) > max_len:
            raise self.fail(key, f"an array of at most {max_len} strings", v)
        return v

    def ints(self, key: str, lo: int, hi: int, default: Any = REQUIRED) -> np.ndarray:
        """An array of integers in lo..hi, as int64."""
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        want = f"an array of integers in {lo}..{hi}"
        if isinstance(v, np.ndarray):
            if v.ndim != 1 or v.dtype.kind not in "iu" or (v.size and not lo <= int(v.min()) <= int(v.max()) <= hi):
                raise self.fail(key, want, v)
            return v.astype(np.int64)
        if not isinstance(v, (list, tuple)) or not all(is_int(x) and lo <= int(x) <= hi for x in v):
            raise self.fail(key, want, v)
        return np.array([int(x) for x in v], np.int64)

    def items(self, key: str, default: Any = REQUIRED) -> list:
        """A JSON list, its items unchecked."""
        if not self.has(key):
            return self.raw(key, default)
        v = self.values[key]
        if not isinstance(v, list):
            raise self.fail(key, "a list", v)
        return v

    def section(self, key: str, required: bool = False) -> "Fields":
        """A nested JSON object, read with the same checks; an absent one reads as empty."""
        v = self.raw(key, REQUIRED if required else {})
        if not isinstance(v, dict):
            raise self.fail(key, "an object", v)
        return Fields(v, self.where, prefix=f"{self.prefix}{key}.", error=self.error)


def load_json(path: str | Path, limit: int, what: str, error: type[Exception] = ConfigError,
              not_found: str = "not found") -> dict:
    """A JSON object from a file of at most `limit` bytes. Unreadable, oversized, non-regular
    files are quant.files' InputFileError; a missing file is `error` saying `not_found`."""
    path = Path(path)
    if not os.path.lexists(path):
        raise error(f"{path}: {not_found}")
    try:
        data = read_json(path, limit, what)
    except ValueError:  # json.loads refuses integers of more than 4300 digits with a plain ValueError
        raise error(f"{path}: not valid JSON (a number with too many digits)") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {describe(data)}")
    return data
