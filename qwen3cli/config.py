"""ModelArgs: the hyperparameters of a Qwen3 / Qwen3-MoE model, from an HF config.json.

Both config dialects are read: the hub's (`num_experts`, top-level `rope_theta`,
`rope_scaling`) and the one transformers 5 writes (`num_local_experts`, `rope_parameters`).
Nothing is guessed: a missing required key is a ConfigError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "yarn" or "linear"
    factor: float
    original_context: int | None = None


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # GGUF architecture: "qwen3" | "qwen3moe"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    n_experts: int = 0
    n_experts_used: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @classmethod
    def from_hf_dir(cls, directory: Path) -> "ModelArgs":
        path = Path(directory) / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (is {directory} a Hugging Face model directory?)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_config(cfg, str(path))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelArgs":
        def need(key: str, kind: type = int, alt: str | None = None):
            v = cfg.get(key, cfg.get(alt) if alt else None)
            if v is None:
                raise ConfigError(f"{where}: missing {key!r}")
            if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"{where}: {key!r} must be a positive integer, got {v!r}")
            if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"{where}: {key!r} must be a positive number, got {v!r}")
            return kind(v)

        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            got = ", ".join(map(str, archs)) or f"model_type {cfg.get('model_type')!r}"
            raise ConfigError(
                f"{where}: unsupported architecture {got}; expected Qwen3ForCausalLM or Qwen3MoeForCausalLM"
            )
        arch = ARCHITECTURES[known[0]]
        if cfg.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias is true; Qwen3 has no attention biases")

        hidden, n_heads = need("hidden_size"), need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // n_heads
        n_kv = need("num_key_value_heads")
        if n_heads % n_kv:
            raise ConfigError(f"{where}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope parameters must be an object, got {rope!r}")
        theta = cfg.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{where}: missing 'rope_theta'")
        scaling = _rope_scaling(rope, where)

        moe: dict[str, Any] = {}
        if arch == "qwen3moe":
            if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
                raise ConfigError(f"{where}: MoE models with dense layers (mlp_only_layers / decoder_sparse_step) "
                                  "are not supported")
            moe = dict(
                n_experts=need("num_experts", alt="num_local_experts"),
                n_experts_used=need("num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            )
            if moe["n_experts_used"] > moe["n_experts"]:
                raise ConfigError(f"{where}: num_experts_per_tok exceeds the number of experts")

        return cls(
            arch=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=int(head_dim),
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=need("rms_norm_eps", float),
            rope_theta=float(theta),
            context_length=need("max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            **moe,
        )


def _rope_scaling(rope: dict[str, Any], where: str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default"):
        return None
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ConfigError(f"{where}: rope scaling {kind!r} needs a positive 'factor'")
    if kind == "linear":
        return RopeScaling("linear", float(factor))
    if kind == "yarn":
        orig = rope.get("original_max_position_embeddings")
        if not isinstance(orig, int) or orig <= 0:
            raise ConfigError(f"{where}: yarn rope scaling needs 'original_max_position_embeddings'")
        return RopeScaling("yarn", float(factor), orig)
    raise ConfigError(f"{where}: unsupported rope scaling type {kind!r}")


def args_from_gguf(md: dict[str, Any], where: str = "GGUF") -> ModelArgs:
    """ModelArgs from a GGUF's `{arch}.*` keys, checked as strictly as a config.json."""
    arch = md.get("general.architecture")
    if arch not in ("qwen3", "qwen3moe"):
        raise ConfigError(f"{where}: architecture {arch!r} is not supported; expected qwen3 or qwen3moe")

    def get(key: str, kind: type = int, default=None):
        v = md.get(f"{arch}.{key}", default)
        if v is None:
            raise ConfigError(f"{where}: missing metadata key {arch}.{key}")
        try:
            v = kind(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {arch}.{key} has the wrong type ({v!r})") from None
        if kind in (int, float) and not v > 0:
            raise ConfigError(f"{where}: {arch}.{key} must be positive, got {v}")
        return v

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv = get("attention.head_count_kv")
    if n_heads % n_kv:
        raise ConfigError(f"{where}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
    head_dim = get("attention.key_length", default=hidden // n_heads)
    if get("attention.value_length", default=head_dim) != head_dim:
        raise ConfigError(f"{where}: key and value head sizes differ; Qwen3 has equal ones")
    scaling = None
    kind = md.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        factor = get("rope.scaling.factor", float)
        if kind == "linear":
            scaling = RopeScaling("linear", factor)
        elif kind == "yarn":
            scaling = RopeScaling("yarn", factor, get("rope.scaling.original_context_length"))
        else:
            raise ConfigError(f"{where}: unsupported rope scaling type {kind!r}")
    moe: dict[str, Any] = {}
    if arch == "qwen3moe":
        moe = dict(
            n_experts=get("expert_count"),
            n_experts_used=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length"),
            norm_topk_prob=bool(md.get(f"{arch}.expert_weights_norm", True)),  # llama.cpp's default for qwen3moe
        )
        if moe["n_experts_used"] > moe["n_experts"]:
            raise ConfigError(f"{where}: expert_used_count exceeds expert_count")
    tokens = md.get("tokenizer.ggml.tokens")
    return ModelArgs(
        arch=arch,
        vocab_size=len(tokens) if tokens is not None else get("vocab_size"),
        hidden_size=hidden,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=get("feed_forward_length", default=1) if arch == "qwen3moe" else get("feed_forward_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, default=10000.0),
        context_length=get("context_length"),
        tie_word_embeddings=False,  # decided by the loader from the tensors present
        rope_scaling=scaling,
        **moe,
    )
