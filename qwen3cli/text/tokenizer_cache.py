"""The tokenizer rebuilt from a GGUF's metadata, cached per user as tokenizers' JSON.

Rebuilding Qwen3's 151,936 tokens and 151,387 merges (checking every merge in Python) took
about 1.5x as long as loading the built tokenizer back from its JSON, at every start.

An entry's key is a SHA-256 of the tokenizer metadata as the file holds it (model and
pre-tokenizer names, the raw bytes of tokens, token types and merges), of tokenizer.py's
source, its split regex, the `tokenizers` version and the entry's layout: every Qwen3 GGUF
shares one entry, a tokenizer that differs by one byte gets its own, and a change to the
builder, the library or the layout starts afresh. Hashing the ~5 MB takes milliseconds; a
key from the path, size and mtime would be cheaper but goes wrong for a file rewritten in
place, and would give each copy of a model its own entry.

An entry is one header line (the key, and the SHA-256 of the rest) followed by the JSON of
`Tokenizer.to_str()` in a layout that parses faster (`_compact`; the same tokenizer). One that
cannot be read, is cut short or altered, or belongs to another key is rebuilt and rewritten:
never an error, never a wrong tokenizer. A cache directory that cannot be written only means
no cache. QWEN3CLI_CACHE_DIR moves the cache (tests use it).

`start_tokenizer` parses a checked entry on a thread. tokenizers holds the GIL while it parses
(`Tokenizer.from_str` never lets it go: ~0.18 s of Qwen3's, measured with tokenizers 0.23), so
the parse does not run beside the caller's Python: it takes its turn among it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import tokenizers
from gguf import TokenType
from tokenizers import Tokenizer

from quant.gguf_file import StringArray

from ..paths import cache_dir
from . import tokenizer as _builder
from .tokenizer import from_gguf_metadata
from .vocab import QWEN2_SPLIT

MAGIC = "qwen3cli-tokenizer"
FORMAT = b"2"  # in the key: entries of an older layout are left for pruning, not read
MAX_ENTRY_BYTES = 256 << 20  # a 151,936-token entry is ~5 MB: anything far larger is not ours
MAX_ENTRIES = 16  # ~5 MB each; entries of an older builder are never asked for again
KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges")


def tokenizer_key(md: dict) -> str | None:
    """The cache key of a GGUF's tokenizer metadata; None when it is not held as a file's raw
    arrays (metadata built in memory), which then is simply not cached."""
    h = hashlib.sha256()
    for part in (Path(_builder.__file__).read_bytes(), QWEN2_SPLIT.encode(), tokenizers.__version__.encode(), FORMAT):
        h.update(len(part).to_bytes(8, "little") + part)
    for k in KEYS:
        v = md.get(k)
        if isinstance(v, str):
            data, tag = v.encode("utf-8"), b"s"
        elif isinstance(v, StringArray) and v.raw is not None:
            data, tag = v.raw, b"a"
        elif isinstance(v, np.ndarray) and v.ndim == 1:
            data, tag = np.ascontiguousarray(v).view(np.uint8), v.dtype.str.encode()
        else:
            return None
        # each field's name, kind and length first: no two different metadata hash the same bytes
        h.update(f"{k}\0".encode() + tag + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load_tokenizer(md: dict, where: str = "GGUF") -> Tokenizer:
    """from_gguf_metadata(md), from the cache when an entry for this metadata checks out."""
    return start_tokenizer(md, where).result()


class Pending:
    """A tokenizer being parsed on a thread; result() waits for it. Built from the metadata
    instead, on the caller's thread, if the parse fails (its errors belong to the caller)."""

    def __init__(self, body: bytes | None, n_tokens: int, rebuild, done=None):
        self._tok: Tokenizer | None = None
        self._rebuild, self._n = rebuild, n_tokens
        self._thread = None
        if body is not None:
            self._thread = threading.Thread(target=self._parse, args=(body, done), name="tokenizer", daemon=True)
            self._thread.start()

    def _parse(self, body: bytes, done) -> None:
        self._tok = _parse(body, self._n)
        if done is not None:  # the parse's freed buffers, on this thread's own heap
            done()

    def result(self) -> Tokenizer:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._tok is None:
            self._tok = self._rebuild()
        return self._tok


def start_tokenizer(md: dict, where: str = "GGUF", done=None) -> Pending:
    """load_tokenizer's tokenizer, parsed on a thread when the cache holds a good entry (the
    entry is read and its checksum checked here); else built here, so a bad file's error comes
    from this call. done() is called once the parse is over, on its thread."""
    return _start(md, where, done, build=True)


def start_cached(md: dict, where: str = "GGUF", done=None) -> Pending | None:
    """start_tokenizer's parse on a thread where the cache holds a good entry; None otherwise
    (nothing is built here: the caller's own start_tokenizer builds, and reports, later)."""
    return _start(md, where, done, build=False)


def _start(md: dict, where: str, done, build: bool) -> Pending | None:
    key = tokenizer_key(md)
    if key is None:
        if not build:
            return None
        tok = from_gguf_metadata(md, where)
        return Pending(None, 0, lambda: tok)
    path = cache_dir() / "tokenizers" / f"{key}.json"

    def rebuild() -> Tokenizer:
        tok = from_gguf_metadata(md, where)
        _write(path, key, tok)
        return tok

    body = _entry(path, key)
    if body is None:
        if not build:
            return None
        tok = rebuild()
        return Pending(None, 0, lambda: tok)
    return Pending(body, _n_kept(md["tokenizer.ggml.token_type"]), rebuild, done)


def _n_kept(types: np.ndarray) -> int:
    """Tokens the builder keeps: normal ones and added ones (a file's [PAD<i>] slots are not)."""
    return int(np.isin(types, [TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED]).sum())


def _entry(path: Path, key: str) -> bytes | None:
    """The JSON of the entry at path, if it is whole and for `key`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
        head, sep, body = data.partition(b"\n")
        if not sep or head.decode("ascii").split(" ") != [MAGIC, key, hashlib.sha256(body).hexdigest()]:
            return None
    except (OSError, UnicodeDecodeError):  # missing, unreadable, a directory, not ASCII: rebuild
        return None
    return body


def _parse(body: bytes, n_tokens: int) -> Tokenizer | None:
    try:
        tok = Tokenizer.from_str(body.decode("utf-8"))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # not UTF-8, or JSON tokenizers refuses, some of it with a Rust panic,
        return None  # which is a BaseException: rebuild
    return tok if tok.get_vocab_size(with_added_tokens=True) == n_tokens else None


def _compact(text: str) -> str:
    """tokenizers' JSON with the merges as "a b" strings (its older form, which it still
    reads) and the vocabulary in key order: Qwen3's parses in ~0.18 s instead of ~0.22 s, and
    the parse holds the GIL, so all of it is on the way to the first token. A merge with a
    space in it (none in byte-level BPE) keeps the pair form. The caller checks that it gives
    the same tokenizer."""
    d = json.loads(text)
    model = d.get("model")
    if not isinstance(model, dict):
        return text
    merges = model.get("merges")
    if isinstance(merges, list) and all(isinstance(m, list) and len(m) == 2 and all(
            isinstance(p, str) and p and " " not in p for p in m) for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = dict(sorted(model["vocab"].items()))
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def _write(path: Path, key: str, tok: Tokenizer) -> None:
    text = tok.to_str()
    try:
        compact = _compact(text)
        if Tokenizer.from_str(compact).to_str() == text:
            text = compact
    except Exception:  # noqa: BLE001 - a layout tokenizers refuses: the plain JSON, as it wrote it
        pass
    body = text.encode("utf-8")
    data = f"{MAGIC} {key} {hashlib.sha256(body).hexdigest()}\n".encode("ascii") + body
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the old entry or the whole new one, never half
    except OSError:  # read-only or full: run without the cache
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return
    _prune(path.parent)


def _prune(d: Path) -> None:
    """Keep the MAX_ENTRIES most recently written entries."""
    try:
        entries = sorted((p.stat().st_mtime, p) for p in d.glob("*.json"))
        for _, p in entries[:-MAX_ENTRIES]:
            p.unlink()
    except OSError:  # another process pruned first, or the directory went: nothing to keep tidy
        pass
