"""The CUDA backend: the weights live on the GPU in their quantized (packed) form, the KV cache
too (f32, f16 or q8_0, in the CPU cache's bytes: kv_cache.py), and a step runs as a chain of
kernel launches (quant/kernels/cuda.py) on the default stream. The host sends token embeddings
(one row a token) and gets the logits back; nothing else crosses, MoE routing included.

Weights are packed on the host a layer at a time (prepare.prepare_layer, the layouts the CPU
tests check), uploaded, and the host copy dropped; only the token embeddings stay on the host.
Which kernel multiplies by a matrix, fed which of its arrays, is the type's entry in the layout
registry (quant/kernels/layouts.py: `LAYOUTS[type].cuda`); a type without one is refused, by
name, before anything is uploaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from quant.kernels import cuda as K
from quant.kernels.layouts import cuda_kernel
from quant.kernels.matmul_cpu import packed_nbytes

from .backend import Q_CHUNK, Release
from ..errors import Qwen3CliError
from .kv_cache import DEFAULT, QK, KVCache, row_nbytes
from .prepare import pack_tensor, prepare_layer
from .rope import Rope
from .weights import LayerWeights, Weights

from numba import cuda  # noqa: E402  (after the package imports: cuda is an optional extra)


class DeviceMemoryError(Qwen3CliError):
    """The model does not fit in the GPU's free memory."""


@dataclass
class DevMat:
    """A matrix (or expert stack) on the device: `kernel` (a launcher of quant/kernels/cuda.py)
    runs it as kernel[grid](x, xdiv, ids, *args, acc, out); `args` are its device arrays and
    scalars, from its type's registry entry."""
    name: str
    kernel: object
    rows: int
    k: int
    n_mats: int
    args: tuple = ()

    def _device_arrays(self) -> list:
        return list({id(x): x for x in self.args if hasattr(x, "copy_to_host")}.values())

    @property
    def q(self):  # what Weights.nbytes tells tied matrices apart by
        return self._device_arrays()[0]

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in self._device_arrays())


DECODE_ROWS = 64  # outputs of up to this many rows (a decode step, MoE slots included) reuse buffers


def cache_alloc(shape: tuple[int, ...], dtype):
    """KVCache's allocator on the device. The host cache keeps f16 values (and q8_0 scales) as
    uint16 bits, numba having no float16 on the CPU; the GPU has float16, so the same bits are
    kept as float16 and the kernels convert with the hardware's instructions."""
    return cuda.device_array(shape, np.float16 if np.dtype(dtype) == np.uint16 else dtype)


def upload(t) -> DevMat:
    """t (in the exact layout: matmul_cpu.Packed, or a float QTensor) on the device; raises
    UnsupportedQuantType for a type without a CUDA kernel."""
    spec = cuda_kernel(t)
    up: dict[int, object] = {}  # one device copy of an array the kernel takes twice (Q4_0's d)

    def device(v):
        if not isinstance(v, np.ndarray):
            return v
        if id(v) not in up:
            up[id(v)] = cuda.to_device(np.ascontiguousarray(v))
        return up[id(v)]

    args = tuple(device(v) for v in spec.args(t))
    return DevMat(t.name, getattr(K, spec.kernel), t.rows, t.k, t.n_mats, args)


def device_nbytes(t) -> int:
    if t is None or isinstance(t, np.ndarray):
        return 0 if t is None else t.nbytes
    spec = cuda_kernel(t)  # a type the GPU cannot run fails here, before anything is uploaded
    return spec.nbytes(t) if spec.nbytes is not None else packed_nbytes(t)


class CudaOps:
    """The Backend of one NVIDIA GPU: device arrays, numba-cuda kernels, the exact layouts."""

    rowwise = False  # unused: every product here computes each row alone already

    name = "cuda"
    summary = ""  # what the GPU holds, once the weights are up (check_fits)

    def __init__(self, args, rope: Rope, ctx: int, cache_type: str = DEFAULT["cuda"]):
        self.args, self.eps, self.ctx = args, np.float32(args.rms_norm_eps), ctx
        self.cache_type = cache_type  # f32, f16 or q8_0 (kv_cache.py; checked by kv_cache.check_type)
        self._no_scales = cuda.device_array((1, 1, 1, 1), np.float16)  # what f32 / f16 caches pass as scales
        cos, sin = rope.cos_sin(np.arange(ctx))
        self.cos, self.sin = cuda.to_device(cos), cuda.to_device(sin)
        self._zeros: dict[int, object] = {}
        self._bufs: dict[tuple, object] = {}
        self._scores = None

    # -- memory ---------------------------------------------------------------------------
    def _kv_nbytes(self, ctx: int) -> int:
        """One KV cache of ctx positions in this backend's cache type."""
        a = self.args
        return 2 * a.n_layers * a.n_kv_heads * ctx * row_nbytes(self.cache_type, a.head_dim)

    def cache_nbytes(self, ctx: int) -> int:
        """The KV cache plus attention's score scratch (a chunk of queries against the context)."""
        a = self.args
        return self._kv_nbytes(ctx) + a.n_heads * min(Q_CHUNK, ctx) * ctx * 4

    def _smaller(self) -> str:
        """The hint of a memory refusal: a cache type that takes less, where there is one."""
        if self.cache_type == "q8_0" or self.args.head_dim % QK:
            return ""
        return " or --cache-type q8_0"

    def check_fits(self, w: Weights) -> None:
        need = sum(device_nbytes(t) for ly in w.layers for t in vars(ly).values())
        need += device_nbytes(w.output) + self.cache_nbytes(self.ctx)
        free, total = cuda.current_context().get_memory_info()
        name = getattr(cuda.get_current_device(), "name", "the GPU")  # the simulator's has none
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.summary = (f"{name}: {need / 1e9:.2f} GB for the weights and a {self.ctx}-token KV cache, "
                        f"{free / 1e9:.1f} of {total / 1e9:.1f} GB were free")
        if need > 0.95 * free:
            raise DeviceMemoryError(
                f"the model needs {need / 1e9:.1f} GB on the GPU (weights and a {self.ctx}-token {self.cache_type} "
                "KV cache), "
                f"{free / 1e9:.1f} GB of {total / 1e9:.1f} GB is free: try a smaller --ctx{self._smaller()} "
                "or --device cpu")

    def prepare(self, w: Weights, release: Release | None = None) -> Weights:
        self.check_fits(w)

        def up(v):
            if isinstance(v, np.ndarray):
                return cuda.to_device(v)
            return upload(v) if v is not None else None

        def on_device(ly: LayerWeights) -> LayerWeights:
            return replace(ly, **{f.name: up(getattr(ly, f.name)) for f in fields(ly)})

        layers = [on_device(prepare_layer(ly, release)) for ly in w.layers]  # host copies go layer by layer
        out = pack_tensor(w.output)
        # the embeddings stay on the host (one row a token is sent); tied ones in the packed form
        embd = out if w.token_embd is w.output else w.token_embd
        return replace(w, layers=layers, output=upload(out), token_embd=embd, output_norm=cuda.to_device(w.output_norm))

    def new_cache(self, ctx: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, ctx, a.head_dim, self.cache_type, alloc=cache_alloc)

    def new_caches(self, ctx: int, n: int) -> list[KVCache]:
        """n caches (attention_rows takes their rows one by one); refused up front, typed, when
        they do not fit in the GPU's free memory."""
        need = self._kv_nbytes(ctx) * n
        free, total = cuda.current_context().get_memory_info()
        if need > 0.95 * free:
            raise DeviceMemoryError(f"{n} KV caches of {ctx} tokens in {self.cache_type} need {need / 1e9:.1f} GB "
                                    f"on the GPU, {free / 1e9:.1f} GB of {total / 1e9:.1f} GB is free: try a "
                                    f"smaller --ctx or --parallel{self._smaller()}")
        return [self.new_cache(ctx) for _ in range(n)]

    # -- steps ------------------------------------------------------------------------------
    def embed(self, table, ids):
        return cuda.to_device(np.ascontiguousarray(table.take(ids), np.float32))

    def _out(self, key, shape: tuple[int, ...]):
        """An output buffer: in decode steps (few rows) one per call site and shape, kept across
        steps (allocations cost as much as the small kernels); fresh ones for prefills. Reuse
        is safe because every kernel runs in order on one stream."""
        if shape[0] > DECODE_ROWS:
            return cuda.device_array(shape, np.float32)
        k = (key, shape)
        if k not in self._bufs:
            self._bufs[k] = cuda.device_array(shape, np.float32)
        return self._bufs[k]

    def rms_norm(self, x, w):
        out = self._out("norm", x.shape)  # dead before the next norm of the layer is taken
        K.rms_norm[x.shape[0], K.TPB](x, w, self.eps, out)
        return out

    def _ids(self, n: int):
        if n not in self._zeros:
            self._zeros[n] = cuda.to_device(np.zeros(n, np.int32))
        return self._zeros[n]

    def _mv(self, x, w: DevMat, ids, xdiv: int, n_out: int, into=None):
        """x @ W.T per output row (see the kernels); added into `into` when given."""
        out = self._out(id(w), (n_out, w.rows)) if into is None else into
        w.kernel[(w.rows, n_out), K.TPB](x, xdiv, ids, *w.args, into is not None, out)
        return out

    def matmul(self, x, w: DevMat):
        if x.shape[1] != w.k:
            raise ValueError(f"{w.name}: input has {x.shape[1]} features, weight expects {w.k}")
        return self._mv(x, w, self._ids(x.shape[0]), 1, x.shape[0])

    @staticmethod
    def split(y, sizes):
        out, at = [], 0
        for s in sizes:
            out.append(y[:, at:at + s])
            at += s
        return out

    def residual(self, x, a, w: DevMat):
        return self._mv(a, w, self._ids(a.shape[0]), 1, a.shape[0], into=x)

    def ffn(self, ly, h, x):
        return self.moe(ly, h, into=x) if ly.router is not None else self.mlp(ly, -1, h, into=x)

    @staticmethod
    def last(x):
        return x[x.shape[0] - 1:]

    @staticmethod
    def to_host(x) -> np.ndarray:
        return x.copy_to_host()

    def _silu_mul(self, g, u):
        out = self._out("silu", g.shape)
        K.silu_mul[(math.ceil(g.shape[0] / 4), math.ceil(g.shape[1] / 32)), (4, 32)](g, u, out)
        return out

    def attention(self, li: int, ly, q, k, v, cache: KVCache, p: int):
        a = self.args
        n, D, Hq, Hkv = q.shape[0], a.head_dim, a.n_heads, a.n_kv_heads
        qh, kh = self._out("qh", (n, Hq, D)), self._out("kh", (n, Hkv, D))
        q8 = cache.type == "q8_0"
        ks, vs = (cache.ks, cache.vs) if q8 else (self._no_scales, self._no_scales)
        K.qkv_rope_store[(n, Hq + 2 * Hkv), K.TPB](q, k, v, ly.q_norm, ly.k_norm, self.eps, self.cos, self.sin,
                                                   p, li, qh, kh, cache.k, cache.v, ks, vs, q8)
        out = self._out("attn", (n, Hq * D))
        m = min(n, Q_CHUNK)
        if self._scores is None or self._scores.shape[1] < m:
            self._scores = cuda.device_array((Hq, m, self.ctx), np.float32)
        scale = np.float32(D ** -0.5)
        qq = q8 and n == 1 and D <= K.MAX_QD  # decode quantizes q, as the CPU's (kv_cpu.kv_scores)
        for s in range(0, n, Q_CHUNK):
            K.attention[(Hq, min(n, s + Q_CHUNK) - s), K.TPB](qh, cache.k, cache.v, ks, vs, q8, qq, li, p, s, scale,
                                                              self._scores, out)
        return out

    def attention_rows(self, li, ly, q, k, v, caches, ps):
        # attention() writes into a buffer kept per shape: each row's is copied out before the next
        out = cuda.device_array((q.shape[0], self.args.n_heads * self.args.head_dim), np.float32)
        for i, (cache, p) in enumerate(zip(caches, ps)):
            out[i:i + 1].copy_to_device(self.attention(li, ly, q[i:i + 1], k[i:i + 1], v[i:i + 1], cache, p))
        return out

    def _swiglu(self, h, gate_up, gate, up, ids, xdiv: int, n_out: int):
        if gate_up is not None:
            gu = self._mv(h, gate_up, ids, xdiv, n_out)
            half = gate_up.rows // 2
            return self._silu_mul(gu[:, :half], gu[:, half:])
        return self._silu_mul(self._mv(h, gate, ids, xdiv, n_out), self._mv(h, up, ids, xdiv, n_out))

    def mlp(self, ly, e: int, h, into=None):
        ids = self._ids(h.shape[0])
        act = self._swiglu(h, ly.gate_up, ly.gate, ly.up, ids, 1, h.shape[0])
        return self._mv(act, ly.down, ids, 1, h.shape[0], into)

    def _route(self, ly, h):
        a = self.args
        n, k = h.shape[0], a.n_experts_used
        logits = self.matmul(h, ly.router)
        probs = self._out("probs", logits.shape)
        ids, wts = cuda.device_array(n * k, np.int32), cuda.device_array(n * k, np.float32)
        K.route[math.ceil(n / 32), 32](logits, k, a.norm_topk_prob, probs, ids, wts)
        return ids, wts

    def route(self, ly, h):
        ids, wts = self._route(ly, cuda.to_device(np.ascontiguousarray(h, np.float32)))
        k = self.args.n_experts_used
        return ids.copy_to_host().reshape(-1, k).astype(np.int64), wts.copy_to_host().reshape(-1, k)

    def moe(self, ly, h, into=None):
        n, k = h.shape[0], self.args.n_experts_used
        ids, wts = self._route(ly, h)
        act = self._swiglu(h, ly.gate_up, ly.gate_exps, ly.up_exps, ids, k, n * k)
        y = self._mv(act, ly.down_exps, ids, 1, n * k)
        out = cuda.device_array(h.shape, np.float32) if into is None else into
        K.weighted_sum[(math.ceil(n / 4), math.ceil(h.shape[1] / 32)), (4, 32)](y, wts, k, into is not None, out)
        return out
