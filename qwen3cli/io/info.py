"""A summary of a GGUF file for `qwen3cli info`: read from the header only, so it is fast.
Sizes are Python ints: a crafted shape cannot wrap the parameter count around to a negative."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import LlamaFileType

from quant.gguf_split import open_gguf

from ..meta import Fields
from ..model.config import MAX_VOCAB, gguf_hparam

HPARAMS = [  # (label, key suffix after "<arch>.")
    ("layers", "block_count"),
    ("context length", "context_length"),
    ("embedding", "embedding_length"),
    ("feed forward", "feed_forward_length"),
    ("attention heads", "attention.head_count"),
    ("KV heads", "attention.head_count_kv"),
    ("head dim", "attention.key_length"),
    ("RoPE base", "rope.freq_base"),
    ("RoPE scaling", "rope.scaling.type"),
    ("RoPE scale factor", "rope.scaling.factor"),
    ("RoPE original context", "rope.scaling.original_context_length"),
    ("RMS norm eps", "attention.layer_norm_rms_epsilon"),
    ("experts", "expert_count"),
    ("experts per token", "expert_used_count"),
    ("expert feed forward", "expert_feed_forward_length"),
]


@dataclass
class ModelInfo:
    path: Path
    size: int
    architecture: str
    name: str | None
    file_type: str | None
    hparams: list[tuple[str, Any]]
    tokenizer: list[tuple[str, Any]]
    has_chat_template: bool
    n_tensors: int
    type_counts: Counter = field(default_factory=Counter)
    n_params: int = 0
    data_bytes: int = 0
    tied_embeddings: bool = False


def _shown(v: Any) -> Any:
    # a float32 key printed as float32 holds it (1e-06, not 9.999999974752427e-07)
    return float(np.float32(v)) if isinstance(v, float) else v


def read_info(path: str | Path) -> ModelInfo:
    """The summary; every key it shows is checked as the loader checks it (a ConfigError naming
    the file and key otherwise), so `info` never prints a value that `run` would refuse."""
    with open_gguf(path) as g:
        md = g.metadata
        f = Fields(md, g.path)
        arch = f.text("general.architecture", default="unknown")
        hp = [(label, _shown(gguf_hparam(f, arch, k))) for label, k in HPARAMS if f"{arch}.{k}" in md]
        ft = f.int("general.file_type", 0, (1 << 32) - 1, default=None)
        try:
            ft_name = LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_") if ft is not None else None
        except ValueError:
            ft_name = f"#{ft}"
        tokens = f.texts("tokenizer.ggml.tokens", default=None, max_len=MAX_VOCAB)
        merges = f.texts("tokenizer.ggml.merges", default=None)
        n_tokens = len(tokens) if tokens is not None else 0
        tok: list[tuple[str, Any]] = [
            ("model", f.text("tokenizer.ggml.model", default=None)),
            ("pre-tokenizer", f.text("tokenizer.ggml.pre", default=None)),
            ("tokens", n_tokens),
            ("merges", len(merges) if merges is not None else 0),
        ]
        for label, key in (("BOS", "bos_token_id"), ("EOS", "eos_token_id"), ("padding", "padding_token_id")):
            tid = f.int(f"tokenizer.ggml.{key}", 0, n_tokens - 1 if tokens is not None else (1 << 32) - 1, default=None)
            if tid is not None:
                tok.append((label, f"{tid} {tokens[tid] if tokens is not None else '?'}"))
        add_bos = f.flag("tokenizer.ggml.add_bos_token", default=None)
        if add_bos is not None:
            tok.append(("adds BOS", add_bos))
        template = f.text("tokenizer.chat_template", default=None)
        return ModelInfo(
            path=g.path,
            size=g.size,
            architecture=arch,
            name=f.text("general.name", default=None),
            file_type=ft_name,
            hparams=hp,
            tokenizer=tok,
            has_chat_template=bool(template),
            n_tensors=len(g.tensors),
            type_counts=Counter(t.type_name for t in g.tensors.values()),
            n_params=sum(t.n_elements for t in g.tensors.values()),
            data_bytes=sum(t.nbytes for t in g.tensors.values()),
            tied_embeddings="token_embd.weight" in g.tensors and "output.weight" not in g.tensors,
        )
