"""The weights in the kernels' layouts, on the host: what every backend starts from.

The CPU backend keeps the result; the CUDA one uploads it a layer at a time (ops_cuda.py),
so both run the layouts quant/kernels/layouts.py registers and the CPU tests check.
"""

from __future__ import annotations

from dataclasses import fields, replace

from quant.kernels.layouts import Mat, int8_layout, pack_int8
from quant.kernels.matmul_cpu import Packed, fuse, pack
from quant.qtensor import QTensor

from .backend import Release
from .weights import LayerWeights, Weights

RELEASE_STEP = 8 << 20  # file bytes packed between two releases of the file's pages


def pack_tensor(t, release: Release | None = None, exact: bool = True):
    """t in the kernels' layout (vectors and unpackable types as they are)."""
    if not isinstance(t, QTensor):
        return t
    if (not exact and release is not None and t.n_mats == 1 and t.raw.nbytes > RELEASE_STEP
            and int8_layout(t) is not None):
        return _pack_in_steps(t, release)
    p = pack(t, exact)
    if p is not t and release is not None:
        release(t.name)
    return p


def _pack_in_steps(t: QTensor, release: Release) -> Mat:
    """A large matrix (the 151,936-row embedding / output) packed RELEASE_STEP of file bytes at
    a time, each slice's file pages let go once it is packed: packing all of it first held the
    file's copy and the packed one at once, the load's peak (+165 MB on a 0.6B Q8_0 file)."""
    step = max(1, RELEASE_STEP // t.raw.shape[1])
    parts = [QTensor(t.name, t.type, min(step, t.rows - lo), t.k, t.raw[lo:lo + step])
             for lo in range(0, t.rows, step)]
    return pack_int8(*parts, after=lambda at, n: release(t.name, (at, at + n)), name=t.name)


def prepare_layer(ly: LayerWeights, release: Release | None = None, exact: bool = True) -> LayerWeights:
    """A layer in the kernels' layout: q|k|v and gate|up stacked into one matrix each (one
    launch, one read of the input) where the parts agree in type, the parts then dropped;
    quantized formats repacked (exact: float32 scales and float activations; else the int8
    layouts of quant/kernels/layouts.py); `release(name)` is told of each tensor copied, so
    the file's pages can go and memory stays near the file size."""
    stacked, dropped = {}, {}
    for key, names in ly.fused_parts().items():
        f = fuse([getattr(ly, n) for n in names], exact)
        stacked[key] = pack_tensor(f, release, exact)
        if f is not None:  # keep only the stacked copy
            dropped.update({n: None for n in names})
            for n in names:
                if release is not None:
                    release(getattr(ly, n).name)
    rest = {f.name: pack_tensor(getattr(ly, f.name), release, exact)
            for f in fields(ly) if f.name not in dropped and f.name not in stacked}
    return replace(ly, **rest, **dropped, **stacked)


def prepare(w: Weights, release: Release | None = None, exact: bool = True) -> Weights:
    """The same weights in the kernels' layout, layer by layer (see prepare_layer)."""
    layers = [prepare_layer(ly, release, exact) for ly in w.layers]
    output = pack_tensor(w.output, release, exact)
    # tied: look tokens up in the packed matrix, so the file's copy is not kept in memory too
    embd = output if w.output is w.token_embd and isinstance(output, (Packed, Mat)) else w.token_embd
    return replace(w, layers=layers, output=output, token_embd=embd)
