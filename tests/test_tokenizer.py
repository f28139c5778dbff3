"""The tokenizer, from tokenizer.json and rebuilt from a GGUF we wrote, against the official ids."""

import json

import pytest

from checkpoints import DATA, TOKENIZER
from quant.gguf_file import GGUFFile
from qwen3cli.io import convert
from qwen3cli.errors import ConfigError
from qwen3cli.text.tokenizer import StreamDecoder, from_gguf_metadata, from_tokenizer_json

CASES = json.loads((DATA / "expected_encodings.json").read_text())


@pytest.fixture(scope="module")
def tokenizers(ckpt, tmp_path_factory):
    d, _ = ckpt(moe=False, tied=True)
    out = tmp_path_factory.mktemp("tok") / "m.gguf"
    convert.quantize(d, out, "q8_0")
    with GGUFFile(out) as g:
        from_gguf = from_gguf_metadata(g.metadata)
    return {"tokenizer.json": from_tokenizer_json(TOKENIZER / "tokenizer.json"), "gguf": from_gguf}


@pytest.mark.parametrize("source", ["tokenizer.json", "gguf"])
def test_official_ids(tokenizers, source):
    tok = tokenizers[source]
    for case in CASES["encodings"]:
        assert tok.encode(case["text"]).ids == case["ids"], case["text"]
    for render in CASES["chat_renders"]:
        assert tok.encode(render["text"]).ids == render["ids"]
        assert tok.decode(render["ids"], skip_special_tokens=False) == render["text"]


def test_stream_decoder_never_emits_half_a_character(tokenizers):
    tok = tokenizers["gguf"]
    text = "naïve 你好 🦙🦙 😶‍🌫️ done\n" * 30
    ids = tok.encode(text).ids
    assert len(ids) > 64  # exercises the decoder's restart as well
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens carry only part of a character


def test_non_qwen_tokenizer_metadata_is_refused():
    with pytest.raises(ConfigError, match="not Qwen's"):
        from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default"})
