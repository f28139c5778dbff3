"""A GGUF file's header opened, and its cached tokenizer's parse started, before the slow imports.

The parse was started here to run on the other core beside the command's imports (~0.3 s of
numba and the kernels). It cannot: tokenizers holds the GIL for the whole parse (~0.18 s of
Qwen3's; `Tokenizer.from_str` never lets it go, tokenizers 0.23), so it takes its turn among
the imports, and a warm start measured the same with the parse started here or in the loader.

Only what this module imports is paid before the parse starts: the GGUF reader, the tokenizer
cache and the heap trim, none of which imports numba. Nothing here reports: a file this cannot
open is left for the loader, which says what is wrong with it. `take` hands what was started to
the loader, for the same file only (same inode, size and mtime), once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

_early: Early | None = None


@dataclass
class Early:
    key: tuple
    file: Any  # quant.gguf_split's GGUFFile or SplitGGUF
    tokenizer: Any  # tokenizer_cache.Pending, or None where the cache had no good entry


def _identity(path: str | os.PathLike) -> tuple | None:
    """A regular file's path, inode, device, size and mtime; None for anything else."""
    try:
        st = os.stat(path)
    except (OSError, ValueError, TypeError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (os.path.realpath(path), st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def prestart(source: str | os.PathLike | None) -> None:
    """Open `source` if it is a GGUF file and start its tokenizer's parse; otherwise nothing."""
    global _early
    key = _identity(source) if source is not None else None
    if key is None or _early is not None and _early.key == key:
        return
    try:
        from quant.gguf_split import open_gguf

        from ..model import memory
        from ..text.tokenizer_cache import start_cached

        g = open_gguf(source)
        # the header's freed buffers first: a trim beside the parse would wait on its heap's lock
        memory.trim_heap()
        tok = start_cached(g.metadata, str(g.path), done=memory.trim_heap)
    except Exception:  # noqa: BLE001 - not a GGUF, unreadable, damaged: the loader reports it
        return
    _early = Early(key, g, tok)


def take(path: str | os.PathLike) -> Early | None:
    """What prestart opened for this file (and nothing for any other), handed over once."""
    global _early
    e, _early = _early, None
    return e if e is not None and e.key == _identity(path) else None
