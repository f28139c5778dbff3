"""A summary of a GGUF file for `qwen3cli info`: read from the header only, so it is fast."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import LlamaFileType

from quant.gguf_file import GGUFFile

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


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return float(np.float32(v))
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_info(path: str | Path) -> ModelInfo:
    with GGUFFile(path) as g:
        md = g.metadata
        arch = str(md.get("general.architecture", "unknown"))
        hp = [(label, _scalar(md[f"{arch}.{k}"])) for label, k in HPARAMS if f"{arch}.{k}" in md]
        ft = md.get("general.file_type")
        try:
            ft_name = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_") if ft is not None else None
        except ValueError:
            ft_name = f"#{int(ft)}"
        tokens = md.get("tokenizer.ggml.tokens")
        merges = md.get("tokenizer.ggml.merges")
        tok: list[tuple[str, Any]] = [
            ("model", md.get("tokenizer.ggml.model")),
            ("pre-tokenizer", md.get("tokenizer.ggml.pre")),
            ("tokens", len(tokens) if tokens is not None else 0),
            ("merges", len(merges) if merges is not None else 0),
        ]
        for label, key in (("BOS", "bos_token_id"), ("EOS", "eos_token_id"), ("padding", "padding_token_id")):
            tid = md.get(f"tokenizer.ggml.{key}")
            if tid is not None:
                tid = int(tid)
                text = tokens[tid] if tokens is not None and 0 <= tid < len(tokens) else "?"
                tok.append((label, f"{tid} {text}"))
        if "tokenizer.ggml.add_bos_token" in md:
            tok.append(("adds BOS", bool(md["tokenizer.ggml.add_bos_token"])))
        template = md.get("tokenizer.chat_template")
        n_params = sum(t.n_elements for t in g.tensors.values())
        return ModelInfo(
            path=g.path,
            size=g.size,
            architecture=arch,
            name=md.get("general.name"),
            file_type=ft_name,
            hparams=hp,
            tokenizer=tok,
            has_chat_template=isinstance(template, str) and bool(template),
            n_tensors=len(g.tensors),
            type_counts=Counter(t.type_name for t in g.tensors.values()),
            n_params=n_params,
            data_bytes=sum(t.nbytes for t in g.tensors.values()),
            tied_embeddings="token_embd.weight" in g.tensors and "output.weight" not in g.tensors,
        )
