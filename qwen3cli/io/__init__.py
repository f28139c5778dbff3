"""Model files, on disk and on the hub: checkpoints, GGUF loading, HF -> GGUF conversion,
requantizing, downloads, and the cached models' list.

Kept empty of imports: each module loads only what it needs (qwen3cli --help stays fast)."""
