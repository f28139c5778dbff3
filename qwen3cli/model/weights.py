"""The model's tensors, by role, checked against the hyperparameters: name, shape, type.

`build_weights(args, lookup)` takes a function giving (GGML shape, type, raw bytes) for a
GGUF tensor name, so GGUF files (memory-mapped) and HF directories (converted in memory)
share one set of checks. Matrices stay in their encoding as QTensors; norm vectors are small
and become float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from quant.errors import UnsupportedQuantType
from quant.formats import FORMATS
from quant.qtensor import QTensor

from ..errors import ConfigError
from .config import ModelArgs

Lookup = Callable[[str], "tuple[tuple[int, ...], int, np.ndarray] | None"]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    q: QTensor
    k: QTensor
    v: QTensor
    o: QTensor
    q_norm: np.ndarray
    k_norm: np.ndarray
    ffn_norm: np.ndarray
    gate: QTensor | None = None  # dense MLP
    up: QTensor | None = None
    down: QTensor | None = None
    router: QTensor | None = None  # MoE
    gate_exps: QTensor | None = None
    up_exps: QTensor | None = None
    down_exps: QTensor | None = None
    # Filled by preparation (prepare.py), which then drops the parts: matrices that multiply the
    # same input stacked into one (one launch, one read of it). None before, and where the parts
    # cannot stack (their types differ). Preparation also swaps every QTensor above for the
    # backend's layout of it (matmul_cpu.Packed, layouts.Mat, ops_cuda.DevMat).
    qkv: Any = None  # q|k|v: (n_heads + 2 n_kv_heads) * head_dim rows
    gate_up: Any = None  # gate|up (2 I rows), or gate_exps|up_exps interleaved per expert

    def fused_parts(self) -> dict[str, tuple[str, ...]]:
        """The fields each stacked field holds, in their order in the stack."""
        ffn = ("gate_exps", "up_exps") if self.router is not None else ("gate", "up")
        return {"qkv": ("q", "k", "v"), "gate_up": ffn}


@dataclass
class Weights:
    args: ModelArgs
    token_embd: QTensor
    output_norm: np.ndarray
    output: QTensor  # token_embd itself when the embeddings are tied
    layers: list[LayerWeights]

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in [self.token_embd, self.output, *[v for ly in self.layers for v in vars(ly).values()]]:
            # a QTensor, the exact packed form or an int8 layout's matrix
            key = getattr(t, "raw", getattr(t, "q", getattr(t, "arrays", None)))
            if key is not None and id(key) not in seen:
                seen.add(id(key))
                total += t.nbytes
        return total


def expected_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3 GGUF with its GGML-order shape (output.weight is optional)."""
    H, D, V = a.hidden_size, a.head_dim, a.vocab_size
    want = {"token_embd.weight": (H, V), "output_norm.weight": (H,), "output.weight": (H, V)}
    for i in range(a.n_layers):
        b = f"blk.{i}."
        want.update({
            b + "attn_norm.weight": (H,), b + "ffn_norm.weight": (H,),
            b + "attn_q.weight": (H, a.n_heads * D), b + "attn_k.weight": (H, a.n_kv_heads * D),
            b + "attn_v.weight": (H, a.n_kv_heads * D), b + "attn_output.weight": (a.n_heads * D, H),
            b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,),
        })
        if a.is_moe:
            E, I = a.n_experts, a.moe_intermediate_size
            want.update({
                b + "ffn_gate_inp.weight": (H, E), b + "ffn_gate_exps.weight": (H, I, E),
                b + "ffn_up_exps.weight": (H, I, E), b + "ffn_down_exps.weight": (I, H, E),
            })
        else:
            I = a.intermediate_size
            want.update({b + "ffn_gate.weight": (H, I), b + "ffn_up.weight": (H, I), b + "ffn_down.weight": (I, H)})
    return want


def build_weights(a: ModelArgs, lookup: Lookup, names: set[str], where: str) -> Weights:
    """Check every tensor in `names` against `a` and wrap it. `where` names the source in errors."""
    want = expected_shapes(a)
    extra = sorted(names - set(want))
    if extra:
        raise ConfigError(f"{where}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def get(name: str) -> tuple[tuple[int, ...], T, np.ndarray]:
        found = lookup(name) if name in names else None
        if found is None:
            raise ConfigError(f"{where}: missing tensor {name!r}")
        shape, ttype, raw = found
        if tuple(shape) != want[name]:
            raise ConfigError(f"{where}: tensor {name!r} has shape {list(shape)}, expected {list(want[name])}")
        try:
            t = T(ttype)
        except ValueError:
            t = None
        if t not in FORMATS:
            tname = t.name if t is not None else f"#{ttype}"
            raise UnsupportedQuantType(f"{where}: tensor {name!r} has type {tname}, which qwen3cli cannot run yet")
        return shape, t, raw

    def mat(name: str) -> QTensor:
        shape, t, raw = get(name)
        n_mats = shape[2] if len(shape) == 3 else 1
        return QTensor(name, t, shape[1], shape[0], raw.reshape(n_mats * shape[1], -1), n_mats)

    def vec(name: str) -> np.ndarray:
        shape, t, raw = get(name)
        x = FORMATS[t].decode(raw.reshape(1, -1), shape[0])[0]
        if not np.all(np.isfinite(x)):
            raise ConfigError(f"{where}: tensor {name!r} holds NaN or infinite values")
        return np.ascontiguousarray(x, np.float32)

    layers = []
    for i in range(a.n_layers):
        b = f"blk.{i}."
        ly = LayerWeights(
            attn_norm=vec(b + "attn_norm.weight"), q=mat(b + "attn_q.weight"), k=mat(b + "attn_k.weight"),
            v=mat(b + "attn_v.weight"), o=mat(b + "attn_output.weight"), q_norm=vec(b + "attn_q_norm.weight"),
            k_norm=vec(b + "attn_k_norm.weight"), ffn_norm=vec(b + "ffn_norm.weight"),
        )
        if a.is_moe:
            ly.router, ly.gate_exps = mat(b + "ffn_gate_inp.weight"), mat(b + "ffn_gate_exps.weight")
            ly.up_exps, ly.down_exps = mat(b + "ffn_up_exps.weight"), mat(b + "ffn_down_exps.weight")
        else:
            ly.gate, ly.up, ly.down = mat(b + "ffn_gate.weight"), mat(b + "ffn_up.weight"), mat(b + "ffn_down.weight")
        layers.append(ly)
    embd = mat("token_embd.weight")
    output = mat("output.weight") if "output.weight" in names else embd
    return Weights(a, embd, vec("output_norm.weight"), output, layers)
