"""A KV cache that remembers which tokens it holds, so the next prompt sharing a prefix with
them prefills only the rest. The chat keeps one per conversation; the server keeps one for
all requests (a client resending its history hits the same prefix)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..model.forward import Model
from .generation import Event, Token, generate


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    def __init__(self, model: Model):
        self.model = model
        self.kv = model.new_cache()
        self.ids: list[int] = []  # the tokens whose keys and values `kv` holds

    def clear(self) -> None:
        self.kv.truncate(0)
        self.ids = []

    def generate(self, tokenizer, prompt_ids: list[int], sampler, **kw) -> Iterator[Event]:
        """generate() over this cache, keeping the shared prefix; what was computed is
        remembered even when the caller stops early (Ctrl-C, a client that went away)."""
        self.kv.truncate(common_prefix(self.ids, prompt_ids))
        out: list[int] = []
        try:
            for ev in generate(self.model, tokenizer, prompt_ids, sampler, cache=self.kv, **kw):
                if isinstance(ev, Token):
                    out.append(ev.id)
                yield ev
        finally:
            self.ids = (list(prompt_ids) + out)[: self.kv.n]
