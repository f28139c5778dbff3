"""A loaded model at work: opening one (loading.py), the Engine, generation events, the
KV prefix cache, multi-turn conversations, bench and evaluate, the models that running
processes hold (`qwen3cli ps`).

Kept empty of imports: each module loads only what it needs (qwen3cli --help stays fast)."""
