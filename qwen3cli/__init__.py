"""qwen3cli: Qwen3 checkpoints to llama.cpp-compatible GGUF, run with numpy + numba."""

__version__ = "0.1.0"
