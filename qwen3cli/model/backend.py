"""The backend interface: what `Model` asks of a device, declared once.

`Model.forward` strings these steps together and nothing else; CpuOps (ops_cpu.py) and
CudaOps (ops_cuda.py) implement them, each keeping activations, weights and the KV cache in its
own memory (numpy arrays or device arrays: `Act` below), so one forward serves both. The
backend is chosen once, by `open_backend`; it imports the chosen module only, so the CPU
modules never load numba.cuda and the CUDA module never imports the CPU backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from .device import DeviceError

if TYPE_CHECKING:
    from .config import ModelArgs
    from .kv_cache import KVCache
    from .rope import Rope
    from .weights import LayerWeights, Weights

Act = Any  # activations (n, features): a float32 numpy array on the CPU, a device array on CUDA
Release = Callable[..., None]  # release(tensor name, rows=None): the file's pages may go

Q_CHUNK = 256  # query rows per attention block: bounds the score matrix in long prefills


class Backend(Protocol):
    """The steps of a forward pass on one device. Shapes: x, h (n, hidden); ids (n,) int64."""

    name: str  # "cpu" or "cuda": what --device names
    summary: str  # a line on what the device holds once the weights are up ("" when nothing to say)

    def prepare(self, w: Weights, release: Release | None = None) -> Weights:
        """The weights in this backend's layout and memory, q|k|v and gate|up stacked where
        they can be (LayerWeights.qkv / gate_up); `release` hears of each file tensor copied."""

    def new_cache(self, ctx: int) -> KVCache:
        """An empty KV cache of ctx positions, where this backend's attention reads it."""

    def new_caches(self, ctx: int, n: int) -> list[KVCache]:
        """n of them for a batch (attention_rows reaches their rows together where it can)."""

    def embed(self, table: Any, ids: np.ndarray) -> Act:
        """Rows `ids` of the token embeddings (the table stays on the host)."""

    def rms_norm(self, x: Act, w: Any) -> Act: ...

    def matmul(self, x: Act, w: Any) -> Act:
        """x @ W.T for a prepared weight W (rows, k): (n, rows)."""

    def split(self, y: Act, sizes: Sequence[int]) -> list[Act]:
        """Column blocks of y: a stacked product's parts (q, k, v)."""

    def residual(self, x: Act, a: Act, w: Any) -> Act:
        """x + a @ W.T (possibly written into x)."""

    def attention(self, li: int, ly: LayerWeights, q: Act, k: Act, v: Act, cache: KVCache, p: int) -> Act:
        """q/k norms, RoPE, the cache write at positions p.., causal attention: (n, heads * head_dim)."""

    def attention_rows(self, li: int, ly: LayerWeights, q: Act, k: Act, v: Act, caches: Sequence[KVCache],
                       ps: Sequence[int]) -> Act:
        """attention() of row i over caches[i] at position ps[i]: a decode step of several sequences."""

    rowwise: bool  # set by Model.decode: products of few rows compute each row as a lone row would

    def ffn(self, ly: LayerWeights, h: Act, x: Act) -> Act:
        """x + the layer's MLP or MoE of h."""

    def last(self, x: Act) -> Act:
        """The last row, still (1, features)."""

    def to_host(self, x: Act) -> np.ndarray: ...

    def route(self, ly: LayerWeights, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k expert ids (n, k) and their weights (n, k) for host rows h."""

    def moe(self, ly: LayerWeights, h: Act) -> Act:
        """The layer's mixture of experts of h (only the selected experts' weights are read)."""


BACKENDS = ("cpu", "cuda")


def open_backend(name: str, args: ModelArgs, rope: Rope, ctx: int, cache_type: str, exact: bool = False) -> Backend:
    """The backend `name` for a model of `args` and a context of ctx tokens. cache_type: the KV
    cache's type (already checked, kv_cache.check_type); exact: float
    activations on the CPU (the GPU's kernels are always exact)."""
    if name == "cuda":
        from .ops_cuda import CudaOps
        return CudaOps(args, rope, ctx, cache_type)
    if name == "cpu":
        from .ops_cpu import CpuOps
        return CpuOps(args, rope, cache_type, exact)
    raise DeviceError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
