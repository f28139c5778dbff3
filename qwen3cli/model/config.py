"""ModelArgs: the hyperparameters of a Qwen3 / Qwen3-MoE model, from an HF config.json.

Both config dialects are read: the hub's (`num_experts`, top-level `rope_theta`,
`rope_scaling`) and the one transformers 5 writes (`num_local_experts`, `rope_parameters`).
Nothing is guessed: a missing required key is a ConfigError naming it, and every value is
checked for its type and a plausible range (meta.Fields) before anything is sized from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..meta import MB, REQUIRED, Fields, describe, load_json

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}
CONFIG_BYTES = 1 * MB

# Plausible ranges: the largest published models sit well inside them, and a crafted file
# fails here, before anything is allocated from these numbers.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17  # hidden size
MAX_FFN = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 1 << 12
MAX_ROPE_THETA = 1e12  # and more than 1: YaRN divides by log(theta)
MAX_ROPE_FACTOR = 1024.0

# A GGUF's `<arch>.*` hyperparameters: how each is checked (args_from_gguf and `info` share this)
GGUF_HPARAMS: dict[str, tuple] = {
    "block_count": ("int", 1, MAX_LAYERS),
    "context_length": ("int", 1, MAX_CONTEXT),
    "embedding_length": ("int", 1, MAX_WIDTH),
    "feed_forward_length": ("int", 1, MAX_FFN),
    "attention.head_count": ("int", 1, MAX_HEADS),
    "attention.head_count_kv": ("int", 1, MAX_HEADS),
    "attention.key_length": ("int", 2, MAX_HEAD_DIM),
    "attention.value_length": ("int", 2, MAX_HEAD_DIM),
    "rope.freq_base": ("number", 1, MAX_ROPE_THETA, True, False),
    "rope.scaling.type": ("text",),
    "rope.scaling.factor": ("number", 0, MAX_ROPE_FACTOR, True, False),
    "rope.scaling.original_context_length": ("int", 1, MAX_CONTEXT),
    "attention.layer_norm_rms_epsilon": ("number", 0, 1, True, True),
    "expert_count": ("int", 1, MAX_EXPERTS),
    "expert_used_count": ("int", 1, MAX_EXPERTS),
    "expert_feed_forward_length": ("int", 1, MAX_FFN),
    "expert_weights_norm": ("flag",),
    "vocab_size": ("int", 1, MAX_VOCAB),
}


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
        return cls.from_hf_config(read_hf_config(directory), str(Path(directory) / "config.json"))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelArgs":
        f = Fields(cfg, where)
        archs = f.texts("architectures", default=[])
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            got = ", ".join(archs) or f"model_type {describe(cfg.get('model_type'))}"
            raise ConfigError(
                f"{where}: unsupported architecture {got}; expected Qwen3ForCausalLM or Qwen3MoeForCausalLM"
            )
        arch = ARCHITECTURES[known[0]]
        if f.flag("attention_bias", default=False):
            raise ConfigError(f"{where}: attention_bias is true; Qwen3 has no attention biases")

        hidden, n_heads = f.int("hidden_size", 1, MAX_WIDTH), f.int("num_attention_heads", 1, MAX_HEADS)
        n_kv = f.int("num_key_value_heads", 1, n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{where}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
        head_dim = _head_dim(f, "head_dim", hidden, n_heads)

        # transformers 5 keeps theta and scaling in rope_parameters; the hub's files in rope_scaling
        rope = f.section("rope_parameters" if f.has("rope_parameters") else "rope_scaling")
        theta = (f if f.has("rope_theta") else rope).number("rope_theta", 1, MAX_ROPE_THETA, open_lo=True)
        scaling = _rope_scaling(rope)

        moe: dict[str, Any] = {}
        if arch == "qwen3moe":
            if f.items("mlp_only_layers", default=[]) or f.int("decoder_sparse_step", 0, MAX_LAYERS, default=1) != 1:
                raise ConfigError(f"{where}: MoE models with dense layers (mlp_only_layers / decoder_sparse_step) "
                                  "are not supported")
            n_experts = f.int("num_experts" if f.has("num_experts") else "num_local_experts", 1, MAX_EXPERTS)
            moe = dict(
                n_experts=n_experts,
                n_experts_used=f.int("num_experts_per_tok", 1, n_experts),
                moe_intermediate_size=f.int("moe_intermediate_size", 1, MAX_FFN),
                norm_topk_prob=f.flag("norm_topk_prob", default=False),
            )

        return cls(
            arch=arch,
            vocab_size=f.int("vocab_size", 1, MAX_VOCAB),
            hidden_size=hidden,
            n_layers=f.int("num_hidden_layers", 1, MAX_LAYERS),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=f.int("intermediate_size", 1, MAX_FFN),
            rms_norm_eps=f.number("rms_norm_eps", 0, 1, open_lo=True, open_hi=True),
            rope_theta=theta,
            context_length=f.int("max_position_embeddings", 1, MAX_CONTEXT),
            tie_word_embeddings=f.flag("tie_word_embeddings", default=False),
            rope_scaling=scaling,
            **moe,
        )


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of an HF directory as a JSON object (bounded read, no checks of its keys)."""
    return load_json(Path(directory) / "config.json", CONFIG_BYTES, "config.json",
                     not_found=f"not found (is {directory} a Hugging Face model directory?)")


def _head_dim(f: Fields, key: str, hidden: int, n_heads: int) -> int:
    """The head size: the file's, or hidden / heads; even, because RoPE rotates pairs of dimensions."""
    if f.has(key):
        d = f.int(key, 2, MAX_HEAD_DIM)
    else:
        d = hidden // n_heads
        if not 2 <= d <= MAX_HEAD_DIM:
            raise ConfigError(f"{f.where}: no {f.name(key)}, and {hidden} / {n_heads} heads gives a head size of {d}")
    if d % 2:
        raise ConfigError(f"{f.where}: {f.name(key)} must be even (RoPE rotates pairs of dimensions), got {d}")
    return d


def _rope_scaling(rope: Fields) -> RopeScaling | None:
    kind = rope.text("rope_type" if rope.has("rope_type") else "type", default=None)
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"{rope.where}: unsupported rope scaling type {kind!r}")
    factor = rope.number("factor", 0, MAX_ROPE_FACTOR, open_lo=True)
    if kind == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling("yarn", factor, rope.int("original_max_position_embeddings", 1, MAX_CONTEXT))


def _hparam(f: Fields, key: str, suffix: str, default: Any = REQUIRED):
    kind, *limits = GGUF_HPARAMS[suffix]
    if kind == "int":
        return f.int(key, *limits, default=default)
    if kind == "number":
        lo, hi, open_lo, open_hi = limits
        return f.number(key, lo, hi, default=default, open_lo=open_lo, open_hi=open_hi)
    if kind == "flag":
        return f.flag(key, default=default)
    return f.text(key, default=default)


def gguf_hparam(f: Fields, arch: str, suffix: str, default: Any = REQUIRED):
    """`<arch>.<suffix>` of a GGUF, checked against GGUF_HPARAMS."""
    return _hparam(f, f"{arch}.{suffix}", suffix, default)


def args_from_gguf(md: dict[str, Any], where: str = "GGUF") -> ModelArgs:
    """ModelArgs from a GGUF's `{arch}.*` keys, checked as strictly as a config.json."""
    f = Fields(md, where)
    arch = f.text("general.architecture")
    if arch not in ("qwen3", "qwen3moe"):
        raise ConfigError(f"{where}: architecture {arch!r} is not supported; expected qwen3 or qwen3moe")

    def get(suffix: str, default: Any = REQUIRED):
        return gguf_hparam(f, arch, suffix, default)

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv = get("attention.head_count_kv")
    if n_kv > n_heads or n_heads % n_kv:
        raise ConfigError(f"{where}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
    head_dim = _head_dim(f, f"{arch}.attention.key_length", hidden, n_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{where}: key and value head sizes differ; Qwen3 has equal ones")
    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling("linear", get("rope.scaling.factor"))
    elif kind == "yarn":
        scaling = RopeScaling("yarn", get("rope.scaling.factor"), get("rope.scaling.original_context_length"))
    elif kind != "none":
        raise ConfigError(f"{where}: unsupported rope scaling type {kind!r}")
    moe: dict[str, Any] = {}
    if arch == "qwen3moe":
        moe = dict(
            n_experts=get("expert_count"),
            n_experts_used=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length"),
            norm_topk_prob=get("expert_weights_norm", True),  # llama.cpp's default for qwen3moe
        )
        if moe["n_experts_used"] > moe["n_experts"]:
            raise ConfigError(f"{where}: expert_used_count exceeds expert_count")
    tokens = f.texts("tokenizer.ggml.tokens", default=None, max_len=MAX_VOCAB)
    vocab_size = get("vocab_size", None)
    if tokens is not None:
        if not tokens or (vocab_size is not None and vocab_size != len(tokens)):
            raise ConfigError(f"{where}: {arch}.vocab_size is {vocab_size} but tokenizer.ggml.tokens "
                              f"holds {len(tokens)} tokens")
        vocab_size = len(tokens)
    elif vocab_size is None:
        raise ConfigError(f"{where}: missing 'tokenizer.ggml.tokens' (and {arch}.vocab_size)")
    return ModelArgs(
        arch=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=get("feed_forward_length", 1 if arch == "qwen3moe" else REQUIRED),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
        context_length=get("context_length"),
        tie_word_embeddings=False,  # decided by the loader from the tensors present
        rope_scaling=scaling,
        **moe,
    )
