"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (a token's text, bytes,
logprob and its top alternatives as a list) and completions' legacy columns (`tokens`,
`token_logprobs`, `top_logprobs` as {text: logprob}, `text_offset`), as llama-server and vLLM
return them. The values come from runtime (sampler.token_logprob); this module only names the
tokens."""

from __future__ import annotations

from functools import lru_cache


def _gpt2_bytes() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes: each byte is stored as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _gpt2_bytes()


class TokenNames:
    """A token's bytes and text. A token may hold part of a UTF-8 character: its bytes are
    exact, its text has U+FFFD where it cannot be decoded alone (as OpenAI's)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, tid: int) -> bytes:
        piece = self.tok.id_to_token(tid)
        if piece is not None and all(c in _BYTES for c in piece):
            return bytes(_BYTES[c] for c in piece)
        return self.tok.decode([tid], skip_special_tokens=False).encode("utf-8")

    def text(self, tid: int) -> str:
        return self.bytes(tid).decode("utf-8", "replace")


def chat(entries, names: TokenNames) -> list[dict]:
    """OpenAI chat's list for `logprobs.content` (or `logprobs.reasoning_content`)."""
    def one(tid: int, lp: float) -> dict:
        return {"token": names.text(tid), "logprob": lp, "bytes": list(names.bytes(tid))}

    return [{**one(e.id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]


def completion(entries, names: TokenNames, offset: int, first_id: int | None = None) -> tuple[dict, int]:
    """The legacy columns for these tokens, their text starting at character `offset` of the
    reply; and the offset after them. A None entry is the prompt's first token (`first_id`),
    which nothing predicts: null, as OpenAI's echo gives it. The top dict holds the chosen token
    too (as vLLM's), so `logprob == max(top)` says whether it was the greedy choice. `content`
    has the scored tokens again in chat's shape, which is what llama-server answers here (its
    clients read that; OpenAI's and lm-eval read the columns)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
           "content": chat([e for e in entries if e is not None], names)}
    for e in entries:
        tid = first_id if e is None else e.id
        text = names.text(tid)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e.logprob)
        top: dict[str, float] = {}
        for i, v in (*e.top, (e.id, e.logprob)):
            top.setdefault(names.text(i), v)
        out["top_logprobs"].append(top)
    return out, offset
