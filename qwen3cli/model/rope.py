"""Rotary position embedding tables: plain NeoX RoPE, linear scaling and YaRN.

YaRN follows transformers' `_compute_yarn_parameters` (the reference our logits are tested
against), which agrees with llama.cpp's ggml_rope_yarn: frequencies blend between the
original (high-frequency dims) and the scaled (low-frequency dims) with a linear ramp over
the correction range, and cos/sin are multiplied by 0.1 * ln(factor) + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelArgs, RopeScaling


@dataclass(frozen=True)
class Rope:
    inv_freq: np.ndarray  # float64 (head_dim / 2,)
    attn_factor: float

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = np.asarray(positions, np.float64)[:, None] * self.inv_freq[None, :]
        return (np.cos(ang) * self.attn_factor).astype(np.float32), (np.sin(ang) * self.attn_factor).astype(np.float32)


def scaling_for_context(a: ModelArgs, ctx: int) -> RopeScaling | None:
    """The file's scaling, or YaRN over the native length when `ctx` asks for more (Qwen's recipe)."""
    if a.rope_scaling is not None or ctx <= a.context_length:
        return a.rope_scaling
    return RopeScaling("yarn", ctx / a.context_length, a.context_length)


def make_rope(a: ModelArgs, scaling: RopeScaling | None) -> Rope:
    dim, base = a.head_dim, a.rope_theta
    # float32 exponents as in transformers, so the tables agree to the last bit that matters
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    inv = 1.0 / pos_freqs
    if scaling is None:
        return Rope(inv, 1.0)
    if scaling.type == "linear":
        return Rope(inv / scaling.factor, 1.0)
    factor, orig = scaling.factor, scaling.original_context

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(32)), 0), min(math.ceil(corr_dim(1)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv = (inv / factor) * (1 - extrap) + inv * extrap
    attn = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    return Rope(inv, attn)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX style (halves rotate together). x (n, heads, D); cos/sin (n, D/2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
