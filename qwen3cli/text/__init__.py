"""Text <-> token ids: the tokenizer (from tokenizer.json or a GGUF) and the chat template,
rendered in a sandbox with a budget.

Kept empty of imports: each module loads only what it needs (qwen3cli --help stays fast)."""
