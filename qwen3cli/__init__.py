"""qwen3cli: Qwen3 checkpoints to llama.cpp-compatible GGUF, run with numpy + numba.

The Python API (api.py): `load`, `generate`, `stream_generate`, `batch_generate`, `Chat`, `quantize`. They are
imported on first use, so `import qwen3cli` (and the CLI's --help) stays light.
"""

__version__ = "0.1.0"

_API = ("load", "generate", "stream_generate", "batch_generate", "Chat", "quantize", "Reply", "Chunk", "Stream", "Usage",
        "Timings", "set_threads")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qwen3cli' has no attribute {name!r}")
