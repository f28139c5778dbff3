"""The GGUF tokenizer of an HF directory: tokens, token types and pre-tokenizer name,
decided as llama.cpp's converter decides them (gguf-py's SpecialVocab adds merges,
special token ids and the chat template)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType
from tokenizers import Tokenizer

from .errors import CheckpointError

# The Qwen2 / Qwen3 pre-tokenizer regex; llama.cpp knows it as "qwen2".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _looks_special(tok: str) -> bool:
    # llama.cpp's does_token_look_special: added tokens marked non-special that still are
    return (
        tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or (tok.startswith("<unused") and tok.endswith(">"))
    )


def _pre_tokenizer(spec: dict, path: Path) -> str:
    parts = spec.get("pretokenizers", []) if isinstance(spec, dict) else []
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if isinstance(p, dict) and p.get("type") == "Split"]
    if regexes == [QWEN2_SPLIT] and any(p.get("type") == "ByteLevel" for p in parts):
        return "qwen2"
    raise CheckpointError(f"{path}: pre-tokenizer is not Qwen's byte-level BPE split; not a Qwen3 tokenizer")


@dataclass
class GGUFVocab:
    tokens: list[str]  # padded to vocab_size with [PAD<i>] entries
    types: list[int]  # gguf.TokenType per token
    pre: str  # llama.cpp's pre-tokenizer name
    byte_level_post: bool  # the post-processor adds no BOS/EOS


def gguf_vocab(directory: Path, vocab_size: int) -> GGUFVocab:
    """The tokenizer.json of `directory` as llama.cpp's converter writes it into a GGUF."""
    path = Path(directory) / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(spec))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; the GGUF file needs the model's tokenizer") from None
    except Exception as e:  # OSError, bad JSON, or the bare Exception tokenizers raises
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    if (spec.get("model") or {}).get("type") != "BPE":
        raise CheckpointError(f"{path}: expected a BPE tokenizer")
    pre = _pre_tokenizer(spec.get("pre_tokenizer") or {}, path)

    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            a = added[i]
            if not a.normalized:  # llama.cpp expects added tokens in normalized form
                t = tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.special or _looks_special(t):
                types.append(TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(t)
        else:
            tokens.append(t)
            types.append(TokenType.NORMAL)
    post = spec.get("post_processor") or {}
    byte_level = any(p.get("type") == "ByteLevel" for p in post.get("processors", [post]) if isinstance(p, dict))
    return GGUFVocab(tokens, types, pre, byte_level)
