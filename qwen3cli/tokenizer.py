"""Qwen3's byte-level BPE through the `tokenizers` library: from a tokenizer.json, or rebuilt
from a GGUF's tokenizer metadata (tokens, token types, merges), giving the same ids; and a
streaming detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import CheckpointError, ConfigError
from .vocab import QWEN2_SPLIT


def from_tokenizer_json(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def from_gguf_metadata(md: dict, where: str = "GGUF") -> Tokenizer:
    """Rebuild the tokenizer from `tokenizer.ggml.*` keys (a GGUFFile's metadata)."""
    if md.get("tokenizer.ggml.model") != "gpt2" or md.get("tokenizer.ggml.pre") != "qwen2":
        raise ConfigError(f"{where}: tokenizer {md.get('tokenizer.ggml.model')!r}/{md.get('tokenizer.ggml.pre')!r} "
                          "is not Qwen's gpt2/qwen2 byte-level BPE")
    tokens, types, merges = (md.get(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    if tokens is None or types is None or merges is None or len(types) != len(tokens):
        raise ConfigError(f"{where}: tokenizer tokens, token types or merges are missing")
    tokens, types = list(tokens), [int(t) for t in types]
    added = {TokenType.CONTROL, TokenType.USER_DEFINED}
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TokenType.NORMAL}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ConfigError(f"{where}: malformed merge {m!r}")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in added]
    for i, t, ty in specials:  # in id order, so each added token gets its own id
        if tok.get_vocab_size(with_added_tokens=True) != i:
            raise ConfigError(f"{where}: added token {t!r} at id {i} does not follow the BPE vocabulary")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)]) if ty == TokenType.CONTROL else \
            tok.add_tokens([AddedToken(t, special=False, normalized=False)])
    return tok


class StreamDecoder:
    """Feed token ids one at a time; get back only complete UTF-8 text."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded prefix already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more bytes
            return ""
        out = text[self._sent:]
        self._sent = len(text)
        if len(self._ids) > 64:  # keep decoding cost bounded: restart from a clean boundary
            self._ids, self._sent = [], 0
        return out
