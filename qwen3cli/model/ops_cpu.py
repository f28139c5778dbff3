"""The CPU backend: numpy orchestration around the numba matmul kernels.

A backend owns the device side of the forward pass (the `Backend` interface of backend.py): it
prepares the weights (repacks, uploads), makes the KV cache, and runs the steps `Model` strings
together. `CpuOps` is the reference the CUDA backend (ops_cuda.py) is tested against.
"""

from __future__ import annotations

import numpy as np

from quant.kernels import attention_cpu as attn
from quant.kernels import layer_cpu as layer
from quant.kernels import prefill_cpu as pre
from quant.kernels import threads
from quant.kernels.layouts import Mat
from quant.kernels.matmul_cpu import SMALL_N, matmul, matmul_experts

from .backend import Q_CHUNK, Release
from .kv_cache import KVCache
from .prepare import prepare
from .rope import Rope, apply_rope
from .weights import Weights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _grouped(w) -> bool:
    return isinstance(w, Mat) and w.n_mats > 1 and w.layout.grouped is not None


class CpuOps:
    """The Backend of the host: numpy arrays, numba kernels, the weights in the int8 layouts
    (or, exact, matmul_cpu's float32-scale ones)."""

    rowwise = False  # Model.decode sets it for its step: see matmul_cpu.matmul
    name = "cpu"
    summary = ""

    def __init__(self, args, rope: Rope, cache_type: str = "f16", exact: bool = False):
        self.args, self.rope, self.eps = args, rope, args.rms_norm_eps
        self.cache_type = cache_type
        self.exact = exact  # float activations (the reference's numerics) instead of int8 ones
        # prefill's float steps in threaded numba kernels (prefill_cpu.py); the numpy path, equal
        # to float32 rounding, stays for exact (the transformers-parity numerics)
        self.kernels = not exact
        self._rope_at: dict = {}

    def prepare(self, w: Weights, release: Release | None = None, store=None) -> Weights:
        """store: a packed_cache.PackedStore of the model's file, which gives the packed
        weights of an earlier run instead of packing them (int8 layouts only)."""
        if store is None or self.exact:
            return prepare(w, release, self.exact)
        from .packed_cache import restore, slots

        p = restore(w, store.load())
        if p is None:
            p = prepare(w, release, self.exact)
            store.save(slots(p, w))
        return p

    def new_cache(self, ctx: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, ctx, a.head_dim, self.cache_type)

    def new_caches(self, ctx: int, n: int) -> list[KVCache]:
        a = self.args
        return KVCache.pooled(n, a.n_layers, a.n_kv_heads, ctx, a.head_dim, self.cache_type)

    def embed(self, table, ids: np.ndarray) -> np.ndarray:
        return table.take(ids)

    def rms_norm(self, x, w):
        if x.shape[0] > SMALL_N and not self.kernels:
            return rms_norm(x, w, self.eps)
        out = np.empty(x.shape, np.float32)
        norm = pre.rms_norm if x.shape[0] > SMALL_N else layer.rms_norm_rows
        norm(np.ascontiguousarray(x), w, np.float32(self.eps), out)
        return out

    def matmul(self, x, w):
        return matmul(x, w, rowwise=self.rowwise)

    def split(self, y, sizes):
        out, at = [], 0
        for s in sizes:
            out.append(y[:, at:at + s])
            at += s
        return out

    def _add(self, y, x):
        """x + y, into y (a product's fresh output) when the kernels are on."""
        if not self.kernels or x.shape[0] <= SMALL_N:
            return x + y
        pre.add(y, x)
        return y

    def residual(self, x, a, w):
        """x + a @ w.T"""
        return self._add(self.matmul(a, w), x)

    def ffn(self, ly, h, x):
        """x + the layer's MLP or MoE of h."""
        return self._add(self.moe(ly, h) if ly.router is not None else self.mlp(ly, -1, h), x)

    @staticmethod
    def last(x):
        return x[-1:]

    @staticmethod
    def to_host(x) -> np.ndarray:
        return x

    def silu_mul(self, gu):
        half = gu.shape[1] // 2
        if gu.shape[0] > SMALL_N and not self.kernels:
            return silu(gu[:, :half]) * gu[:, half:]
        out = np.empty((gu.shape[0], half), np.float32)
        (pre.silu_mul if gu.shape[0] > SMALL_N else layer.silu_mul)(gu, out)
        return out

    def _cos_sin(self, p: int, n: int):
        """The RoPE tables of positions p..p+n, computed once a step, not once a layer (a
        batched step has a position per sequence)."""
        if (p, n) not in self._rope_at:
            if len(self._rope_at) >= 64:
                self._rope_at.clear()
            self._rope_at[p, n] = self.rope.cos_sin(np.arange(p, p + n))
        return self._rope_at[p, n]

    def attention_rows(self, li, ly, q, k, v, caches, ps):
        """One kernel for all rows when their caches share a pool (a batch's: new_caches), else a
        row at a time; either way a row runs attend_rows' code for one row."""
        if any(c.pool[0] is not caches[0].pool[0] for c in caches):
            return np.concatenate([self.attention(li, ly, q[i:i + 1], k[i:i + 1], v[i:i + 1], c, p)
                                   for i, (c, p) in enumerate(zip(caches, ps))])
        cos, sin = (np.concatenate(t) for t in zip(*(self._cos_sin(c.rope_offset + p, 1) for c, p in zip(caches, ps))))
        out = np.empty((q.shape[0], self.args.n_heads * self.args.head_dim), np.float32)
        attn.attend_rows(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), ly.q_norm,
                          ly.k_norm, np.float32(self.eps), cos, sin, *caches[0].pool, li,
                          np.array([c.slot for c in caches], np.int64), np.array(ps, np.int64), out)
        return out

    def attention(self, li: int, ly, q, k, v, cache: KVCache, p: int) -> np.ndarray:
        """q/k norms, RoPE, the cache write and causal attention; (n, Hq * D) before the output projection."""
        a = self.args
        n, D, Hq, Hkv = q.shape[0], a.head_dim, a.n_heads, a.n_kv_heads
        cos, sin = self._cos_sin(cache.rope_offset + p, n)  # p is the cache row; RoPE's may be further on
        if n == 1:  # decode: attention_rows' kernel, a row of a pool of one
            out = np.empty((1, Hq * D), np.float32)
            attn.attend_rows(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), ly.q_norm,
                              ly.k_norm, np.float32(self.eps), cos, sin, *cache.pool, li,
                              np.full(1, cache.slot, np.int64), np.full(1, p, np.int64), out)
            return out
        if self.kernels:  # faster than the BLAS path below at every length measured (9-512)
            qh = np.empty((Hq, n, D), np.float32)
            pre.qk_rope_store(q, k, v, ly.q_norm, ly.k_norm, np.float32(self.eps), cos, sin,
                              cache.k, cache.v, cache.ks, cache.vs, li, p, qh)
            out = np.empty((n, Hq * D), np.float32)
            attn.attend(qh, cache.k, cache.v, cache.ks, cache.vs, li, p, out)
            return out
        q = apply_rope(rms_norm(q.reshape(n, Hq, D), ly.q_norm, self.eps), cos, sin)
        k = apply_rope(rms_norm(k.reshape(n, Hkv, D), ly.k_norm, self.eps), cos, sin)
        cache.write(li, p, k.transpose(1, 0, 2), v.reshape(n, Hkv, D).transpose(1, 0, 2))
        T = p + n
        G = Hq // Hkv
        qg = np.ascontiguousarray(q.reshape(n, Hkv, G, D).transpose(1, 2, 0, 3))  # (Hkv, G, n, D)
        out = np.empty((Hkv, G, n, D), np.float32)
        scale = np.float32(D ** -0.5)

        def heads(i: int, m: int) -> None:  # kv heads i, i + m, ...: prefill splits them over threads
            for h in range(i, Hkv, m):
                K, V = cache.read(li, h, T)  # (T, D) float32: the cache's own values, as decode reads them
                for s in range(0, n, Q_CHUNK):
                    e = min(n, s + Q_CHUNK)
                    c = e - s
                    scores = (np.ascontiguousarray(qg[h, :, s:e]).reshape(G * c, D) @ K.T).reshape(G, c, T)
                    scores *= scale
                    if c > 1:  # causal: query i (position p+s+i) sees keys up to its own position
                        future = np.arange(T)[None, :] > (p + np.arange(s, e))[:, None]
                        scores[:, future] = -np.inf
                    out[h, :, s:e] = (softmax(scores).reshape(G * c, T) @ V).reshape(G, c, D)

        threads.run(heads, 1 if n == 1 else min(threads.parts(), Hkv))
        return out.transpose(2, 0, 1, 3).reshape(n, Hq * D)

    def mlp(self, ly, e: int, h: np.ndarray) -> np.ndarray:
        """SwiGLU of the dense MLP (e = -1) or of expert e."""
        def w(t):
            return t if e < 0 else t.expert(e)

        if ly.gate_up is not None:
            gu = self.matmul(h, w(ly.gate_up))
            return self.matmul(self.silu_mul(gu), w(ly.down if e < 0 else ly.down_exps))
        gate, up, down = (ly.gate, ly.up, ly.down) if e < 0 else (ly.gate_exps, ly.up_exps, ly.down_exps)
        return self.matmul(silu(self.matmul(h, w(gate))) * self.matmul(h, w(up)), w(down))

    def route(self, ly, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts per token and their weights: softmax over all experts, then top-k."""
        a = self.args
        probs = softmax(self.matmul(h, ly.router))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :a.n_experts_used]
        wts = np.take_along_axis(probs, top, axis=-1)
        if a.norm_topk_prob:
            wts = wts / wts.sum(axis=-1, keepdims=True)
        return top, wts.astype(np.float32)

    def moe(self, ly, h: np.ndarray) -> np.ndarray:
        """Only the selected experts' weights are touched."""
        top, wts = self.route(ly, h)
        n, k = top.shape
        if n <= SMALL_N:  # decode: every slot's products in one launch per matrix
            ids, tok = top.reshape(-1), np.repeat(np.arange(n), k)
            if ly.gate_up is not None:
                act = self.silu_mul(matmul_experts(h, ly.gate_up, ids, tok))
            else:
                act = silu(matmul_experts(h, ly.gate_exps, ids, tok)) * matmul_experts(h, ly.up_exps, ids, tok)
            y = matmul_experts(act, ly.down_exps, ids, np.arange(n * k))
            return np.einsum("nk,nkh->nh", wts, y.reshape(n, k, -1))
        if _grouped(ly.gate_up) and _grouped(ly.down_exps):
            return self._moe_grouped(ly, h, top, wts)
        out = np.zeros_like(h)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            y = self.mlp(ly, int(e), h[rows])
            out[rows] += wts[rows, slot][:, None] * y
        return out

    def _moe_grouped(self, ly, h: np.ndarray, top: np.ndarray, wts: np.ndarray) -> np.ndarray:
        """Prefill over an int8 stack: the (token, expert) pairs sorted by expert once, then one
        launch per stack for all active experts (int8_moe_gemm_cpu); one GEMM per expert paid a
        dispatch, a quantization and a thread split for a handful of rows each."""
        from quant.kernels import int8_moe_gemm_cpu as moe  # numba kernels: imported when first used

        gu_w, down = ly.gate_up, ly.down_exps
        p = moe.plan(top, gu_w.n_mats)
        gu = np.empty((p.total, gu_w.rows), np.float32)
        gu_w.layout.grouped(h, gu_w.arrays, gu_w.rows, p, True, gu)
        # padding rows: x's zero row, so 0 here and in y. The numba loop, not numpy's silu:
        # n * k rows of temporaries (3 at pp512: ~40 MB) would add to the prefill's peak RSS
        act = np.empty((p.total, gu_w.rows // 2), np.float32)
        layer.silu_mul(gu, act)
        del gu
        y = np.empty((p.total, down.rows), np.float32)
        down.layout.grouped(act, down.arrays, down.rows, p, False, y)
        del act
        return moe.scatter_add(y, p, wts, np.zeros_like(h))

    def moe_dense(self, ly, h: np.ndarray) -> np.ndarray:
        """Reference: every expert on every token, weighted by a dense (mostly zero) routing matrix."""
        top, wts = self.route(ly, h)
        dense = np.zeros((h.shape[0], self.args.n_experts), np.float32)
        np.put_along_axis(dense, top, wts, axis=-1)
        out = np.zeros_like(h)
        for e in range(self.args.n_experts):
            out += dense[:, e:e + 1] * self.mlp(ly, e, h)
        return out
