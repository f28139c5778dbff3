"""The Qwen3 / Qwen3-MoE forward pass, written once over a backend's operations.

One code path serves prefill (n tokens) and decode (n = 1) on every device: `ops` (a Backend,
backend.py: ops_cpu.py or ops_cuda.py) holds the weights in its own memory and layout, and only
the logits come back.
"""

from __future__ import annotations

import numpy as np

from . import kv_cache, memory
from .backend import Backend, open_backend
from ..errors import Qwen3CliError
from .rope import make_rope, scaling_for_context
from .weights import Weights


DECODE_ROWS = 8  # sequences per batched decode pass: matmul_cpu.SMALL_N, the rows its decode kernels take
PREFILL_CHUNK = 512  # CPU prefill tokens per pass through the layer stack (see Model.forward); llama.cpp's n_ubatch


class ContextFull(Qwen3CliError):
    """The tokens do not fit in the context window."""


def kv_cache_nbytes(a, ctx: int, cache_type: str) -> int:
    """K and V of `cache_type` for every layer, KV head and position: Python ints, exact at any size."""
    return 2 * a.n_layers * a.n_kv_heads * int(ctx) * kv_cache.row_nbytes(cache_type, a.head_dim)


def check_context(a, ctx: int, backend: str = "cpu", cache_type: str = kv_cache.DEFAULT["cpu"], caches: int = 1) -> None:
    """Refuse a context whose host-side tables cannot fit, before anything is allocated: the
    CPU's KV caches (`caches` of them: serve --parallel), or the RoPE tables the CUDA backend
    builds on the host (it checks the GPU's memory for the cache itself)."""
    if backend == "cuda":  # float64 angles, their cos and sin, and float32 copies of both
        need, what = int(ctx) * a.head_dim * 16, f"the RoPE tables of a {ctx}-token context"
    else:
        need = caches * kv_cache_nbytes(a, ctx, cache_type)
        what = (f"{f'{caches} {ctx}-token KV caches' if caches > 1 else f'a {ctx}-token KV cache'} "
                f"({kv_cache_nbytes(a, 1, cache_type)} bytes per token: {a.n_layers} layers, "
                f"{a.n_kv_heads} KV heads of {a.head_dim}, K and V in {cache_type})")
    smaller = backend == "cpu" and cache_type != "q8_0" and a.head_dim % kv_cache.QK == 0
    hint = ("use a smaller --ctx" + (" or --parallel" if caches > 1 else "")
            + (" or --cache-type q8_0" if smaller else ""))
    memory.require(need, what, hint)


class Model:
    packed = None  # the packed-cache store the weights came through, if any

    def __init__(self, w: Weights, ctx: int | None = None, release=None, backend: str = "cpu", exact: bool = False,
                 cache_type: str | None = None, packed=None):
        """exact: float activations in every product (the reference's numerics, for parity
        checks) instead of llama.cpp's 8-bit ones on quantized weights; the GPU is always exact.
        cache_type: the KV cache's f32, f16 or q8_0 (kv_cache.py); None for the backend's default.
        packed: the CPU's packed weights of an earlier run, kept on disk (packed_cache.py)."""
        a = w.args
        self.args = a
        self.ctx = int(ctx or a.context_length)
        self.cache_type = kv_cache.check_type(cache_type, a.head_dim, backend)
        check_context(a, self.ctx, backend, self.cache_type)
        self.rope = make_rope(a, scaling_for_context(a, self.ctx))
        self.ops: Backend = open_backend(backend, a, self.rope, self.ctx, self.cache_type, exact)
        self.device = self.ops.name
        # tokens per pass through the stack in a long prefill (None: all at once, as on the GPU,
        # whose memory holds a whole prompt's activations without the host noticing)
        self.chunk = PREFILL_CHUNK if backend == "cpu" else None
        self.w = self.ops.prepare(w, release, packed) if packed is not None else self.ops.prepare(w, release)
        self.packed = packed

    def settle(self) -> None:
        """Wait for what loading left running in the background (the packed-weights cache's
        write of a first run: a file's worth of bytes to disk, which takes a core and the disk
        while it lasts). A benchmark waits here so that it times the engine, not the writer."""
        if self.packed is not None:
            self.packed.wait()

    def new_cache(self):
        return self.ops.new_cache(self.ctx)

    def skip_positions(self, cache, n: int) -> None:
        """Run the cache's next tokens n positions further on, without the tokens between: their
        queries and keys then sit a long way from the keys already held, as in a long context,
        without prefilling one (the long-position parity test's hook; attention sees only the
        rows held). For a cache that is not truncated below this point after; the CPU only
        (the GPU's RoPE tables end at ctx)."""
        if type(n) is not int or n < 0:  # noqa: E721 (a bool is not a count)
            raise ValueError(f"positions to skip must be a whole number, at least 0, got {n!r}")
        if self.device != "cpu":
            raise ValueError(f"skipping positions is for the CPU backend, not {self.device}")
        cache.rope_offset += n

    def new_caches(self, n: int) -> list:
        """n caches of the whole context (a batch's), refused up front if they cannot all fit."""
        check_context(self.args, self.ctx, self.device, self.cache_type, caches=n)
        return self.ops.new_caches(self.ctx, n)

    def forward(self, tokens, cache, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions cache.n...; logits of the last token (n_vocab,) or all (n, n_vocab).

        On the CPU a long prompt goes through the whole layer stack `chunk` tokens at a time
        (llama.cpp's n_ubatch): every step reads K and V from the cache, so the result is the
        one pass's, and the activations held at once are a chunk's, not the prompt's."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        n, p = len(ids), cache.n
        if n == 0:
            raise ValueError("no tokens")
        if p + n > cache.ctx:
            raise ContextFull(f"{p + n} tokens do not fit in the context of {cache.ctx}")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            raise ValueError("token id out of range")
        step = self.chunk or n
        if n <= step:
            logits = self._forward(ids, cache, all_logits)
            return logits if all_logits else logits[0]
        out = np.empty((n, self.args.vocab_size), np.float32) if all_logits else None
        for s in range(0, n, step):
            last = s + step >= n
            y = self._forward(ids[s:s + step], cache, all_logits, logits=all_logits or last)
            if all_logits:
                out[s:s + len(y)] = y
        return out if all_logits else y[0]

    def decode(self, tokens, caches) -> np.ndarray:
        """One decode step of several sequences, token i at position caches[i].n of its own
        cache: their logits (n, n_vocab). The weights are read once for all, and each row comes
        out as a lone decode step computes it (the backend's rowwise products), so what one
        sequence generates does not depend on which others share its steps."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        if len(ids) != len(caches) or not 0 < len(ids) <= DECODE_ROWS:
            raise ValueError(f"{len(ids)} tokens for {len(caches)} caches (1 to {DECODE_ROWS} a step)")
        for c in caches:
            if c.n >= c.ctx:
                raise ContextFull(f"{c.n + 1} tokens do not fit in the context of {c.ctx}")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            raise ValueError("token id out of range")
        ps = [c.n for c in caches]
        self.ops.rowwise = True
        try:
            x = self._layers(ids, lambda li, ly, q, k, v: self.ops.attention_rows(li, ly, q, k, v, caches, ps))
            for c in caches:
                c.n += 1
            return self._logits(x)
        finally:
            self.ops.rowwise = False

    def _forward(self, ids: np.ndarray, cache, all_logits: bool, logits: bool = True) -> np.ndarray | None:
        """One pass of ids through the stack; the logits of every row (all_logits), the last, or
        none (logits=False: a chunk whose rows only fill the cache)."""
        p, n = cache.n, len(ids)
        x = self._layers(ids, lambda li, ly, q, k, v: self.ops.attention(li, ly, q, k, v, cache, p))
        cache.n = p + n
        if not logits:
            return None
        return self._logits(x if all_logits else self.ops.last(x))

    def _logits(self, x):
        return self.ops.to_host(self.ops.matmul(self.ops.rms_norm(x, self.w.output_norm), self.w.output))

    def _layers(self, ids: np.ndarray, attend):
        """The layer stack over the rows of ids; attend(li, ly, q, k, v) is the attention step."""
        a, ops = self.args, self.ops
        x = ops.embed(self.w.token_embd, ids)
        sizes = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim)
        for li, ly in enumerate(self.w.layers):
            h = ops.rms_norm(x, ly.attn_norm)
            if ly.qkv is not None:
                q, k, v = ops.split(ops.matmul(h, ly.qkv), sizes)
            else:
                q, k, v = ops.matmul(h, ly.q), ops.matmul(h, ly.k), ops.matmul(h, ly.v)
            del h  # not held through the MLP: q|k|v and h are a fifth of a layer's activations
            att = attend(li, ly, q, k, v)
            del q, k, v
            x = ops.residual(x, att, ly.o)
            del att
            x = ops.ffn(ly, ops.rms_norm(x, ly.ffn_norm), x)
        return x

    # the MoE steps, reachable for tests that compare them with the dense reference
    def route(self, ly, h):
        return self.ops.route(ly, h)

    def moe(self, ly, h):
        return self.ops.moe(ly, h)
