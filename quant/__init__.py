"""GGUF files, block quant formats and their kernels. Knows nothing about Qwen3."""
