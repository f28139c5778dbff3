"""The GGUF tokenizer of an HF directory: tokens, token types, merges, special token ids, the
chat template and the pre-tokenizer name, decided as llama.cpp's converter (with gguf-py's
SpecialVocab) decides them for Qwen's byte-level BPE.

The tokenizer files come from strangers, so they are read here, once, with a size bound, and
every field the converter uses is checked for its type and range first: the `tokenizers`
library answers a bad merge with a bare Exception or a Rust panic, and gguf-py's SpecialVocab
with a TypeError or by silently skipping the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import Tokenizer

from quant.files import read_text

from ..errors import CheckpointError
from ..meta import MB, Fields, describe, is_int, load_json
from ..model.config import MAX_VOCAB

TOKENIZER_BYTES = 64 * MB
TOKENIZER_CONFIG_BYTES = 16 * MB
TEMPLATE_BYTES = 1 * MB
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # SpecialVocab's, in its order
ADD_FLAGS = ("bos", "eos", "sep")  # the add_*_token keys a GGUF has

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


@dataclass
class TokenizerFile:
    """A checked tokenizer.json and the tokenizer built from it."""
    path: Path
    tokenizer: Tokenizer
    merges: list[str]  # as a GGUF holds them: "a b", spaces inside a token as U+0120
    added: list[dict]  # added_tokens entries, each with an int id and a str content
    pre: str  # llama.cpp's pre-tokenizer name
    byte_level_post: bool  # the post-processor adds no BOS/EOS


def read_tokenizer_json(path: str | Path) -> TokenizerFile:
    path = Path(path)
    spec = load_json(path, TOKENIZER_BYTES, "tokenizer.json", CheckpointError,
                     not_found="not found; the GGUF file needs the model's tokenizer")
    f = Fields(spec, path, error=CheckpointError)
    model = f.section("model", required=True)
    model.text("type", choices=("BPE",))
    vocab = _bpe_vocab(model)
    merges = _merges(model, vocab)
    added = _added_tokens(f)
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), path)
    post = _byte_level_post(spec.get("post_processor"), path)
    try:
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # what is not checked above: tokenizers raises a bare Exception
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    return TokenizerFile(path, tok, merges, added, pre, post)


def _bpe_vocab(model: Fields) -> dict[str, int]:
    vocab = model.raw("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise model.fail("vocab", "an object mapping tokens to ids", vocab)
    seen: dict[int, str] = {}
    for t, i in vocab.items():
        if not is_int(i) or not 0 <= i < MAX_VOCAB:
            raise model.fail(f"vocab[{t!r}]", f"an integer in 0..{MAX_VOCAB - 1}", i)
        if seen.setdefault(i, t) != t:
            raise CheckpointError(f"{model.where}: tokens {seen[i]!r} and {t!r} both have id {i}")
    return vocab


def _merges(model: Fields, vocab: dict[str, int]) -> list[str]:
    merges = model.items("merges", default=[])
    if not merges:
        raise CheckpointError(f"{model.where}: no BPE merges found")
    out = []
    for j, m in enumerate(merges):
        if isinstance(m, str):
            pair, gguf = m.split(" "), m
        elif isinstance(m, list) and all(isinstance(p, str) for p in m):
            # transformers >= 4.45 writes pairs so tokens may hold spaces; GGUF encodes those as U+0120
            pair, gguf = m, " ".join(p.replace(" ", "\u0120") for p in m)
        else:
            pair = []
        if len(pair) != 2 or not all(pair):
            raise model.fail(f"merges[{j}]", "two tokens (\"a b\" or [\"a\", \"b\"])", m)
        # the BPE library panics on a merge whose result it does not know; name the merge instead
        for part in (pair[0], pair[1], pair[0] + pair[1]):
            if part not in vocab:
                raise CheckpointError(f"{model.where}: 'model.merges[{j}]' ({' '.join(pair)!r}) needs the token "
                                      f"{part!r}, which is not in model.vocab")
        out.append(gguf)
    return out


def _added_tokens(f: Fields) -> list[dict]:
    added = f.items("added_tokens", default=[])
    for j, a in enumerate(added):
        if not isinstance(a, dict):
            raise f.fail(f"added_tokens[{j}]", "an object", a)
        entry = Fields(a, f.where, prefix=f"added_tokens[{j}].", error=f.error)
        entry.int("id", 0, MAX_VOCAB - 1)
        if not entry.text("content"):
            raise entry.fail("content", "a non-empty string", "")
        for key in ("special", "normalized", "single_word", "lstrip", "rstrip"):
            entry.flag(key, default=False)
    return added


def _pre_tokenizer(spec: Any, path: Path) -> str:
    parts = spec.get("pretokenizers") if isinstance(spec, dict) else None
    parts = [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
    regexes = [p["pattern"].get("Regex") if isinstance(p.get("pattern"), dict) else None
               for p in parts if p.get("type") == "Split"]
    if regexes == [QWEN2_SPLIT] and any(p.get("type") == "ByteLevel" for p in parts):
        return "qwen2"
    raise CheckpointError(f"{path}: pre-tokenizer is not Qwen's byte-level BPE split; not a Qwen3 tokenizer")


def _byte_level_post(post: Any, path: Path) -> bool:
    """Whether a ByteLevel post-processor is there. Others add BOS/EOS tokens, which Qwen's
    tokenizer never does, so they are refused rather than half understood."""
    if post is None:
        return False
    procs = post.get("processors") if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    if not isinstance(procs, list) or not all(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in procs):
        raise CheckpointError(f"{path}: 'post_processor' must be ByteLevel (Qwen's tokenizer adds no BOS or EOS "
                              f"tokens), got {describe(post)}")
    return bool(procs)


@dataclass
class GGUFVocab:
    tokens: list[str]  # padded to vocab_size with [PAD<i>] entries
    types: list[int]  # gguf.TokenType per token
    pre: str  # llama.cpp's pre-tokenizer name
    byte_level_post: bool  # the post-processor adds no BOS/EOS
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, ... -> token id
    add_special: dict[str, bool] = field(default_factory=dict)  # bos, eos, sep -> add it
    chat_template: str | list[dict] | None = None


def gguf_vocab(directory: Path, vocab_size: int, config: dict | None = None) -> GGUFVocab:
    """The tokenizer files of `directory` as llama.cpp's converter writes them into a GGUF.
    `config` is the directory's config.json, for the special token ids it may hold."""
    directory = Path(directory)
    tf = read_tokenizer_json(directory / "tokenizer.json")
    tok = tf.tokenizer
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{tf.path}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
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
    out = GGUFVocab(tokens, types, tf.pre, tf.byte_level_post, tf.merges)
    tc_path = directory / "tokenizer_config.json"
    tc = None
    if os.path.lexists(tc_path):
        tc = Fields(load_json(tc_path, TOKENIZER_CONFIG_BYTES, "tokenizer_config.json", CheckpointError),
                    tc_path, error=CheckpointError)
    cfg = Fields(config or {}, directory / "config.json", error=CheckpointError)
    out.special_ids = _special_ids(tc, tf.added, cfg, vocab_size)
    if tc is not None and tc.values:  # SpecialVocab reads neither from an empty tokenizer_config
        out.add_special = {t: v for t in ADD_FLAGS if (v := tc.flag(f"add_{t}_token", default=None)) is not None}
        out.chat_template = _chat_template(tc, directory)
    return out


def _special_ids(tc: Fields | None, added: list[dict], cfg: Fields, n_vocab: int) -> dict[str, int]:
    """bos/eos/... ids: tokenizer_config's token strings found among the added tokens first,
    then config.json's *_token_id for the rest."""
    ids: dict[str, int] = {}
    if tc is not None and tc.values:
        content = {t: _token_content(tc, f"{t}_token") for t in SPECIAL_TYPES}
        content["bos"] = content["bos"] or content["cls"]
        content["eos"] = content["eos"] or content["sep"]
        for typ in SPECIAL_TYPES:
            if content[typ]:
                found = next((a["id"] for a in added if a["content"] == content[typ]), None)
                if found is not None:
                    ids[typ] = found  # added ids are checked against vocab_size already
    inner = cfg.section("text_config") if cfg.has("text_config") else None
    for typ in SPECIAL_TYPES:
        key, src = f"{typ}_token_id", cfg
        if not cfg.has(key) and inner is not None:
            src = inner
        v = src.raw(key, None)
        if isinstance(v, list):  # several ids (eos for some models): SpecialVocab uses none of them
            src.ints(key, 0, n_vocab - 1)
        elif v is not None:
            tid = src.int(key, 0, n_vocab - 1)
            ids.setdefault(typ, tid)
    return ids


def _token_content(tc: Fields, key: str) -> str | None:
    v = tc.raw(key, None)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return tc.section(key).text("content")
    raise tc.fail(key, "a string or an object with a 'content' string", v)


def _chat_template(tc: Fields, directory: Path) -> str | list[dict] | None:
    """tokenizer_config's chat_template, else chat_template.jinja (with additional_chat_templates/)
    or chat_template.json, as SpecialVocab picks it; checked to be a string or named strings."""
    if "chat_template" in tc.values:
        return _template_value(tc, "chat_template")
    jinja, as_json = directory / "chat_template.jinja", directory / "chat_template.json"
    if os.path.lexists(jinja):
        text = _read_template(jinja)
        extra = sorted((directory / "additional_chat_templates").glob("*.jinja"))
        if not extra:
            return text
        return [{"name": "default", "template": text}] + [{"name": p.stem, "template": _read_template(p)} for p in extra]
    if os.path.lexists(as_json):
        data = load_json(as_json, TEMPLATE_BYTES, "chat_template.json", CheckpointError)
        return _template_value(Fields(data, as_json, error=CheckpointError), "chat_template")
    return None


def _template_value(f: Fields, key: str) -> str | list[dict] | None:
    v = f.raw(key, None)
    if v is None or isinstance(v, str):
        return v
    want = "a string or a list of {name, template} strings"
    if not isinstance(v, list):
        raise f.fail(key, want, v)
    for j, item in enumerate(v):
        if not isinstance(item, dict):
            raise f.fail(f"{key}[{j}]", "an object", item)
        entry = Fields(item, f.where, prefix=f"{f.prefix}{key}[{j}].", error=f.error)
        entry.text("name")
        entry.text("template")
    return v


def _read_template(path: Path) -> str:
    return read_text(path, TEMPLATE_BYTES, "chat template")
