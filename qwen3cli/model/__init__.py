"""The Qwen3 network and its backends: hyperparameters, weights, RoPE, the KV cache, the CPU
and CUDA ops, the forward pass, and the device choice. Imports nothing above it.

Kept empty of imports: each module loads only what it needs (qwen3cli --help stays fast)."""
