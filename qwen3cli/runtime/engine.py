"""Engine: a loaded model with its context, template and thinking mode, ready to prompt.

The one object the front ends (run, chat, serve) hold: it turns messages into prompt ids
through the model's own template and knows whether the model thinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..io.loader import LoadedModel
from ..model.forward import ContextFull, Model
from ..sampler import Overrides, SamplingParams, default_params
from ..text.chat_template import ChatTemplate
from .generation import starts_in_thinking

DEFAULT_CTX = 8192


@dataclass
class Prompt:
    ids: list[int]
    text: str
    thinks: bool  # the model is expected to think in this turn (sampling defaults follow it)
    opened: bool  # the prompt itself opened the think block


class Engine:
    def __init__(self, loaded: LoadedModel, ctx: int | None = None, device: str = "cpu", exact: bool = False,
                 cache_type: str | None = None):
        """exact: float activations (Model's); cache_type: the KV cache's f32, f16 or q8_0; None
        for the device's default (kv_cache.py)."""
        self.loaded = loaded
        self.args = loaded.args
        self.ctx = int(ctx) if ctx else min(DEFAULT_CTX, loaded.args.context_length)
        packed = None
        if device == "cpu" and not exact and loaded.file is not None:
            from ..model.packed_cache import PackedStore

            packed = PackedStore.for_file(loaded.file)
        self.model = Model(loaded.weights, self.ctx, release=loaded.release, backend=device, exact=exact,
                           cache_type=cache_type, packed=packed)
        self.model.source = loaded.source
        self.template = ChatTemplate(loaded.chat_template, loaded.special_tokens, where=loaded.source)
        self.mode = self.template.thinking_mode()
        self._longest: int | None = None  # bytes of the vocabulary's longest token, when first needed

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def thinks(self, enable_thinking: bool | None) -> bool:
        """Whether a turn thinks: the mode decides for models that cannot switch."""
        if self.mode != "hybrid":
            return self.mode == "always"
        return True if enable_thinking is None else enable_thinking

    def sampling(self, thinks: bool, overrides: Overrides | None = None) -> SamplingParams:
        """The sampling of a turn: Qwen's defaults for its mode, the file's keys (written for
        the model's default mode, so only when the turn is in it), then what the user set."""
        given = overrides.given() if overrides is not None else {}
        return default_params(thinks, self.loaded.metadata, thinks == self.thinks(None), **given)

    def prompt(self, messages: list[dict], enable_thinking: bool | None = None, tools: list | None = None) -> Prompt:
        text = self.template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
        self.check_size(text)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return Prompt(ids, text, self.thinks(enable_thinking), starts_in_thinking(text))

    def longest_token(self) -> int:
        """Bytes (byte-level BPE: characters) of the vocabulary's longest token: no token stands for more."""
        if self._longest is None:
            try:
                self._longest = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
            except Exception:  # a tokenizer without a vocabulary to read: no bound from it
                self._longest = 1 << 30
        return self._longest

    def check_size(self, text: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (a 10 MB prompt takes
        10 s and 1.6 GB to tokenize): no token covers more bytes than the vocabulary's longest."""
        n = len(text.encode("utf-8", "surrogatepass"))
        if n <= self.ctx:  # every token is at least one byte: the common case costs nothing
            return
        if n > self.ctx * self.longest_token():
            raise PromptTooLong(f"the prompt has {n} bytes, more than a {self.ctx}-token context can hold; "
                                "raise --ctx or shorten the prompt")


class PromptTooLong(ContextFull):
    """The prompt's text is longer than the context could hold, whatever it tokenizes to."""
