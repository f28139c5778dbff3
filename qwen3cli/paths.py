"""Where qwen3cli keeps what it rebuilds between runs (tokenizers, packed weights): a leaf, so
that any layer may ask, from the model's packed-weights cache up to the CLI."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "QWEN3CLI_CACHE_DIR"


def cache_dir() -> Path:
    """QWEN3CLI_CACHE_DIR, else the hub conversions' QWEN3CLI_CACHE (io/hub.py), else the OS's
    per-user cache directory (platformdirs: ~/.cache/qwen3cli on Linux, ...)."""
    for name in (ENV, "QWEN3CLI_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name])
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwen3cli", appauthor=False))
