"""The Qwen3 / Qwen3-MoE forward pass: orchestration in numpy, matmuls through the kernels.

One code path serves prefill (n tokens) and decode (n = 1). Activations are float32; the
KV cache is preallocated for the whole context (its pages are only touched as they fill).
"""

from __future__ import annotations

import mmap

import numpy as np

from dataclasses import fields, replace

from quant.kernels.matmul_cpu import Packed, fuse, matmul, pack
from quant.qtensor import QTensor

from .errors import Qwen3CliError
from .rope import apply_rope, make_rope, scaling_for_context
from .weights import LayerWeights, Weights

Q_CHUNK = 256  # query rows per attention block: bounds the score matrix in long prefills


class ContextFull(Qwen3CliError):
    """The tokens do not fit in the context window."""


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """Zeroed float32 memory whose pages appear as they are first written, in small pages:
    each (layer, head) row of the cache is touched a few KB at a time, and with transparent huge
    pages every first touch would zero 2 MB (measured: 2.1 s for a 128-token prompt on the
    0.6B shape at ctx 8192, against 0.03 s with 4 KB pages)."""
    n = int(np.prod(shape)) * 4
    try:
        m = mmap.mmap(-1, max(n, 1))
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
    except (OSError, ValueError):
        return np.zeros(shape, np.float32)
    return np.frombuffer(m, np.float32, int(np.prod(shape))).reshape(shape)


class KVCache:
    def __init__(self, n_layers: int, n_kv: int, ctx: int, head_dim: int):
        self.k = lazy_zeros((n_layers, n_kv, ctx, head_dim))
        self.v = lazy_zeros((n_layers, n_kv, ctx, head_dim))
        self.ctx = ctx
        self.n = 0  # positions filled

    def truncate(self, n: int) -> None:
        """Forget everything after the first n positions (to reuse a shared prefix)."""
        self.n = min(self.n, n)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def prepare(w: Weights, release=None) -> Weights:
    """The same weights in the kernels' layout: q|k|v and gate|up stacked into one matrix each
    (one launch, one read of the input), Q8_0 / Q4_0 / Q6_K repacked. Done layer by layer and
    `release(name)` is told of each tensor copied, so the file's pages can go and memory stays
    near the file size."""
    def conv(t):
        if not isinstance(t, QTensor):
            return t
        p = pack(t)
        if p is not t and release is not None:
            release(t.name)
        return p

    layers = []
    for ly in w.layers:
        groups = {"qkv": ("q", "k", "v"),
                  "gate_up": ("gate_exps", "up_exps") if ly.router is not None else ("gate", "up")}
        fused, parts = {}, {}
        for key, names in groups.items():
            f = fuse([getattr(ly, n) for n in names])
            fused[key] = conv(f)
            if f is not None:  # keep only the stacked copy
                parts.update({n: None for n in names})
                for n in names:
                    if release is not None:
                        release(getattr(ly, n).name)
        ly = replace(ly, **{f.name: conv(getattr(ly, f.name)) for f in fields(ly) if f.name not in parts}, **parts)
        layers.append(Fused(ly, fused["qkv"], fused["gate_up"]))
    output = conv(w.output)
    # tied: look tokens up in the packed matrix, so the file's copy is not kept in memory too
    embd = output if w.output is w.token_embd and isinstance(output, Packed) else w.token_embd
    return replace(w, layers=layers, output=output, token_embd=embd)


class Fused:
    """A layer's weights plus the stacked q|k|v and gate|up matrices (None if not stackable)."""

    def __init__(self, ly: LayerWeights, qkv, gate_up):
        self.__dict__.update(vars(ly))
        self.qkv, self.gate_up = qkv, gate_up


class Model:
    def __init__(self, w: Weights, ctx: int | None = None, release=None):
        a = w.args
        w = prepare(w, release)
        self.w, self.args = w, a
        self.ctx = int(ctx or a.context_length)
        self.rope = make_rope(a, scaling_for_context(a, self.ctx))
        self.eps = a.rms_norm_eps

    def new_cache(self) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, self.ctx, a.head_dim)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions cache.n...; logits of the last token (n_vocab,) or all (n, n_vocab)."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        n, p = len(ids), cache.n
        if n == 0:
            raise ValueError("no tokens")
        if p + n > cache.ctx:
            raise ContextFull(f"{p + n} tokens do not fit in the context of {cache.ctx}")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            raise ValueError("token id out of range")
        x = self.w.token_embd.take(ids)
        cos, sin = self.rope.cos_sin(np.arange(p, p + n))
        for li, ly in enumerate(self.w.layers):
            x = x + self._attention(li, ly, rms_norm(x, ly.attn_norm, self.eps), cache, p, cos, sin)
            h = rms_norm(x, ly.ffn_norm, self.eps)
            x = x + (self.moe(ly, h) if ly.router is not None else self._mlp(ly, -1, h))
        cache.n = p + n
        x = x if all_logits else x[-1:]
        logits = matmul(rms_norm(x, self.w.output_norm, self.eps), self.w.output)
        return logits if all_logits else logits[0]

    def _attention(self, li: int, ly: LayerWeights, h, cache: KVCache, p: int, cos, sin) -> np.ndarray:
        a = self.args
        n, D, Hq, Hkv = h.shape[0], a.head_dim, a.n_heads, a.n_kv_heads
        if ly.qkv is not None:
            qkv = matmul(h, ly.qkv)
            q, k, v = qkv[:, :Hq * D], qkv[:, Hq * D:(Hq + Hkv) * D], qkv[:, (Hq + Hkv) * D:]
        else:
            q, k, v = matmul(h, ly.q), matmul(h, ly.k), matmul(h, ly.v)
        q = rms_norm(q.reshape(n, Hq, D), ly.q_norm, self.eps)
        k = rms_norm(k.reshape(n, Hkv, D), ly.k_norm, self.eps)
        v = v.reshape(n, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[li, :, p:p + n] = k.transpose(1, 0, 2)
        cache.v[li, :, p:p + n] = v.transpose(1, 0, 2)
        T = p + n
        K, V = cache.k[li, :, :T], cache.v[li, :, :T]  # (Hkv, T, D)
        G = Hq // Hkv
        qg = np.ascontiguousarray(q.reshape(n, Hkv, G, D).transpose(1, 2, 0, 3))  # (Hkv, G, n, D)
        out = np.empty((Hkv, G, n, D), np.float32)
        scale = np.float32(D ** -0.5)
        Kt = K.transpose(0, 2, 1)  # (Hkv, D, T): a strided view BLAS takes as is
        for s in range(0, n, Q_CHUNK):
            e = min(n, s + Q_CHUNK)
            m = e - s
            scores = np.matmul(np.ascontiguousarray(qg[:, :, s:e]).reshape(Hkv, G * m, D), Kt)
            scores = scores.reshape(Hkv, G, m, T)
            scores *= scale
            if m > 1:  # causal: query i (position p+s+i) sees keys up to its own position
                future = np.arange(T)[None, :] > (p + np.arange(s, e))[:, None]
                scores[:, :, future] = -np.inf
            out[:, :, s:e] = np.matmul(softmax(scores).reshape(Hkv, G * m, T), V).reshape(Hkv, G, m, D)
        attn = out.transpose(2, 0, 1, 3).reshape(n, Hq * D)
        return matmul(attn, ly.o)

    @staticmethod
    def _mlp(ly, e: int, h: np.ndarray) -> np.ndarray:
        """SwiGLU of the dense MLP (e = -1) or of expert e."""
        def w(t):
            return t if e < 0 else t.expert(e)

        if ly.gate_up is not None:
            gu = matmul(h, w(ly.gate_up))
            half = gu.shape[1] // 2
            return matmul(silu(gu[:, :half]) * gu[:, half:], w(ly.down if e < 0 else ly.down_exps))
        gate, up, down = (ly.gate, ly.up, ly.down) if e < 0 else (ly.gate_exps, ly.up_exps, ly.down_exps)
        return matmul(silu(matmul(h, w(gate))) * matmul(h, w(up)), w(down))

    def route(self, ly: LayerWeights, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts per token and their weights: softmax over all experts, then top-k."""
        a = self.args
        probs = softmax(matmul(h, ly.router))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :a.n_experts_used]
        wts = np.take_along_axis(probs, top, axis=-1)
        if a.norm_topk_prob:
            wts = wts / wts.sum(axis=-1, keepdims=True)
        return top, wts.astype(np.float32)

    def moe(self, ly: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Only the selected experts' weights are touched."""
        top, wts = self.route(ly, h)
        out = np.zeros_like(h)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            y = self._mlp(ly, int(e), h[rows])
            out[rows] += wts[rows, slot][:, None] * y
        return out

    def moe_dense(self, ly: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Reference: every expert on every token, weighted by a dense (mostly zero) routing matrix."""
        top, wts = self.route(ly, h)
        dense = np.zeros((h.shape[0], self.args.n_experts), np.float32)
        np.put_along_axis(dense, top, wts, axis=-1)
        out = np.zeros_like(h)
        for e in range(self.args.n_experts):
            out += dense[:, e:e + 1] * self._mlp(ly, e, h)
        return out
