"""Qwen3's byte-level BPE through the `tokenizers` library: from a tokenizer.json, or rebuilt
from a GGUF's tokenizer metadata (tokens, token types, merges), giving the same ids; and a
streaming detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..model.config import MAX_VOCAB
from ..errors import ConfigError
from ..meta import Fields, describe
from .vocab import QWEN2_SPLIT, read_tokenizer_json


def from_tokenizer_json(path: str | Path) -> Tokenizer:
    """A tokenizer.json, checked as the converter checks it (see vocab.read_tokenizer_json)."""
    return read_tokenizer_json(path).tokenizer


def from_gguf_metadata(md: dict, where: str = "GGUF") -> Tokenizer:
    """Rebuild the tokenizer from `tokenizer.ggml.*` keys (a GGUFFile's metadata)."""
    f = Fields(md, where)
    model, pre = f.text("tokenizer.ggml.model", default=None), f.text("tokenizer.ggml.pre", default=None)
    if model != "gpt2" or pre != "qwen2":
        raise ConfigError(f"{where}: tokenizer {model!r}/{pre!r} is not Qwen's gpt2/qwen2 byte-level BPE")
    tokens = list(f.texts("tokenizer.ggml.tokens", max_len=MAX_VOCAB))
    types = f.ints("tokenizer.ggml.token_type", int(min(TokenType)), int(max(TokenType))).tolist()
    merges = f.texts("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise ConfigError(f"{where}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TokenType.NORMAL:
            if vocab.setdefault(t, i) != i:  # the later id would silently be lost
                raise ConfigError(f"{where}: token {t!r} appears at ids {vocab[t]} and {i}")
    pairs = []
    for j, m in enumerate(merges):
        a, b = _merge_parts(m)
        if a is None:
            raise ConfigError(f"{where}: tokenizer.ggml.merges[{j}] is {describe(m)}, not two tokens joined by a space")
        # the BPE library panics on a merge whose result it does not know; say which merge instead
        for part in (a, b, a + b):
            if part not in vocab:
                raise ConfigError(f"{where}: tokenizer.ggml.merges[{j}] ({m!r}) needs the token {part!r}, "
                                  "which is not in the vocabulary")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = {TokenType.CONTROL, TokenType.USER_DEFINED}
    specials = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in added]
    for i, t, ty in specials:  # in id order, so each added token gets its own id
        if tok.get_vocab_size(with_added_tokens=True) != i:
            raise ConfigError(f"{where}: added token {t!r} at id {i} does not follow the BPE vocabulary")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)]) if ty == TokenType.CONTROL else \
            tok.add_tokens([AddedToken(t, special=False, normalized=False)])
        if tok.get_vocab_size(with_added_tokens=True) != i + 1:  # empty, or a repeat of another token
            raise ConfigError(f"{where}: added token {t!r} at id {i} is empty or appears twice")
    return tok


def _merge_parts(m) -> tuple[str | None, str | None]:
    """A GGUF merge "a b" as (a, b); (None, None) when it is not exactly two tokens."""
    parts = m.split(" ") if isinstance(m, str) else []
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else (None, None)


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
