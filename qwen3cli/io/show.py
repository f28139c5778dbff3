"""`show`: what a model is, as ollama's show tells it: the file's summary (info.py), the chat
template's thinking mode, and the sampling each mode gets by default (sampler.default_params,
the same rule run applies). Reads the GGUF header only: no weights, no tokenizer build."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quant.gguf_split import open_gguf

from ..meta import Fields
from ..sampler import default_params
from ..text.chat_template import ChatTemplate
from .info import ModelInfo, read_info

SHOWN = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty")


@dataclass
class Description:
    info: ModelInfo
    thinking_mode: str  # hybrid | always | never
    template_source: str  # "file", or "built-in" when the file has none
    template: str
    sampling: dict[str, dict[str, float]]  # mode -> the defaults that mode samples with

    def as_dict(self, with_template: bool = False) -> dict[str, Any]:
        i = asdict(self.info)
        i["path"] = str(self.info.path)
        i["type_counts"] = dict(self.info.type_counts)
        d = {"info": i, "thinking_mode": self.thinking_mode, "template_source": self.template_source,
             "sampling": self.sampling}
        if with_template:
            d["template"] = self.template
        return d


def model_path(model: str) -> Path:
    """A GGUF file for `model`: a path, a cached name (models.py) or a repo id (resolved as run does)."""
    p = Path(model).expanduser()
    if os.path.lexists(p):
        return p
    from . import hub, models

    found = [m for m in models.find(model) if m.kind != "checkpoint"]
    if found:
        return found[0].path
    return hub.resolve(model)


def describe(model: str) -> Description:
    path = model_path(model)
    info = read_info(path)
    with open_gguf(path) as g:
        md = g.metadata
        f = Fields(md, str(g.path))
        tokens = f.texts("tokenizer.ggml.tokens", default=None)
        specials = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            tid = f.int(f"tokenizer.ggml.{key}", 0, len(tokens) - 1, default=None) if tokens is not None else None
            if tid is not None:
                specials[name] = tokens[tid]
        source = f.text("tokenizer.chat_template", default=None)
        tpl = ChatTemplate(source, specials, where=str(g.path))
        mode = tpl.thinking_mode()
        modes = {"hybrid": (("thinking", True), ("non-thinking", False)), "always": (("thinking", True),),
                 "never": (("non-thinking", False),)}[mode]
        default_thinks = mode != "never"
        sampling = {}
        for label, thinking in modes:
            p = default_params(thinking, md, thinking == default_thinks, where=str(g.path))
            sampling[label] = {k: getattr(p, k) for k in SHOWN}
    return Description(info, mode, "built-in" if tpl.builtin else "file", tpl.source, sampling)
