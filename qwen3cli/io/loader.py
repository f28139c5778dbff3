"""load(source): a GGUF file, a Hugging Face directory or a hub repo id -> a runnable model.

A GGUF is memory-mapped and its matrices stay quantized views of the file. A directory is
validated and converted in memory by the same plan `qwen3cli quantize` uses, so both paths
see identical tensors, metadata and checks. Repo ids are resolved by `hub` to one of these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer

from quant.files import check_regular
from quant.formats import get_format
from quant.gguf_split import open_gguf

from ..model import memory
from ..model.config import ModelArgs, args_from_gguf
from ..errors import ConfigError
from ..meta import Fields
from ..sampler import file_params
from ..text.tokenizer import from_tokenizer_json
from ..text.tokenizer_cache import Pending, start_tokenizer
from . import early
from ..model.weights import Weights, build_weights

Progress = Callable[[str, int, int], None]  # (what, done, total)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class LoadedModel:
    source: str
    args: ModelArgs
    weights: Weights
    _tokenizer: Tokenizer | Pending  # a GGUF's may still be parsing (tokenizer_cache.start_tokenizer)
    metadata: dict[str, Any]
    chat_template: str | None
    eos_id: int | None  # the file's EOS id, a stop token besides STOP_TOKENS
    special_ids: dict[str, int] = field(default_factory=dict)  # bos_token, eos_token, ... -> their ids
    _keep: Any = None  # the open GGUFFile whose map the weights view
    warnings: list[str] = field(default_factory=list)  # optional inputs left out; the CLI shows them
    notes: list[str] = field(default_factory=list)  # what the load did that a user should know of

    @property
    def tokenizer(self) -> Tokenizer:
        if isinstance(self._tokenizer, Pending):
            self._tokenizer = self._tokenizer.result()
        return self._tokenizer

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        stop = frozenset(i for i in map(tok.token_to_id, STOP_TOKENS) if i is not None)
        return stop | {self.eos_id} if self.eos_id is not None else stop

    @cached_property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as text, for templates."""
        texts = {name: self.tokenizer.id_to_token(tid) for name, tid in self.special_ids.items()}
        return {name: text for name, text in texts.items() if text is not None}

    def release(self, tensor: str, rows: tuple[int, int] | None = None) -> None:
        """The engine copied this tensor (or its raw rows lo:hi) into its own layout: let the
        file's pages go."""
        if self._keep is not None and tensor in self._keep.tensors:
            self._keep.release_pages(tensor, rows)

    @property
    def file(self) -> Path | None:
        """The GGUF file the weights are views of; None for weights converted in memory."""
        return getattr(self._keep, "path", None)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or Path(self.source).name)


def load(source: str | Path, quant: str = "q8_0", progress: Progress | None = None) -> LoadedModel:
    """Load a model. `quant` is the type a directory's weights are converted to."""
    path = Path(source)
    if path.is_dir():
        return _load_dir(path, quant, progress)
    if os.path.lexists(path):  # a file, a FIFO, a device, a dangling or looping link: not a repo id
        check_regular(path, "GGUF file")
        return load_gguf(path)
    from . import hub  # a repo id, or a typo: hub decides which

    return load(hub.resolve(str(source), quant, progress), quant, progress)


def _load_dir(path: Path, quant: str, progress: Progress | None) -> LoadedModel:
    """A checkpoint directory, converted to `quant` once and kept (hub.converted): a later run
    loads the file in a second instead of converting again. Where the cache cannot be written,
    it is converted in memory, as before."""
    from . import hub
    from ..errors import OutputError

    try:
        gguf_path, warnings = hub.converted(path, quant, progress)
    except (OSError, OutputError):
        return load_hf_dir(path, quant, progress)
    loaded = load_gguf(gguf_path)
    loaded.source = str(path)
    if warnings is not None:
        loaded.warnings = list(warnings)
        loaded.notes.append(f"converted {path} to {quant} once, kept as {gguf_path} "
                            "(later runs load it; `qwen3cli list` and `rm` manage it)")
    return loaded


def load_gguf(path: str | Path) -> LoadedModel:
    started = early.take(path)  # the header, and the tokenizer's parse, begun before the imports
    g = started.file if started else open_gguf(path)
    md = g.metadata
    args = args_from_gguf(md, str(g.path))
    embd = g.tensors.get("token_embd.weight")
    if embd is not None and len(embd.shape) == 2 and embd.shape[1] != args.vocab_size:
        raise ConfigError(f"{g.path}: token_embd.weight has {embd.shape[1]} rows but the vocabulary "
                          f"has {args.vocab_size} tokens")

    def lookup(name: str):
        t = g.tensors[name]
        return t.shape, t.type, g.raw(name)

    weights = build_weights(args, lookup, set(g.tensors), str(g.path))
    if started and started.tokenizer:
        tok = started.tokenizer
    else:
        # the header's freed buffers go back before the parse starts: malloc_trim takes every
        # heap's lock, so a trim beside the parse waited for all of it (0.25 s). The parse's
        # own buffers go back at its end, on its thread.
        memory.trim_heap()
        tok = start_tokenizer(md, str(g.path), done=memory.trim_heap)
    loaded = _finish(str(g.path), args, weights, tok, md, keep=g)
    g.release_header()  # hashed (and, on a first run, built from): the tokenizer is its own copy
    return loaded


def load_hf_dir(directory: str | Path, quant: str = "q8_0", progress: Progress | None = None) -> LoadedModel:
    from . import convert  # a directory's path only: its imports (imatrix, policy, model card) cost a GGUF's start

    p = convert.plan(directory, quant)
    md = {k: v.value for k, v in p.metadata.items()}
    total = sum(t.nbytes for t in p.tensors)
    memory.require(total, f"converting {p.src} to {quant} in memory",
                   "convert it to a GGUF file with `qwen3cli quantize` and run that")
    done = 0
    tensors: dict[str, tuple[tuple[int, ...], int, np.ndarray]] = {}
    for t in p.tensors:
        fmt = get_format(t.type, t.name)
        buf = np.empty(t.nbytes, np.uint8)
        at = 0
        for part in t.parts:
            enc = fmt.encode(part()).reshape(-1)
            buf[at:at + enc.size] = enc
            at += enc.size
        tensors[t.name] = (t.shape, t.type, buf)
        done += t.nbytes
        if progress:
            progress("converting", done, total)
    args = args_from_gguf(md, str(p.src))
    weights = build_weights(args, tensors.get, set(tensors), str(p.src))
    tok = from_tokenizer_json(p.src / "tokenizer.json")
    return _finish(str(p.src), args, weights, tok, md, warnings=p.warnings)


def _finish(source, args, weights, tok, md, keep=None, warnings=()) -> LoadedModel:
    """The model with its stop tokens, special tokens and template; the keys these come from,
    and the sampling defaults, are checked here so that a bad one names the file at load time."""
    args = _with_tie(args, weights)
    f = Fields(md, source)
    last_id = args.vocab_size - 1
    eos = f.int("tokenizer.ggml.eos_token_id", 0, last_id, default=None)
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        tid = f.int(f"tokenizer.ggml.{key}", 0, last_id, default=None)
        if tid is not None:
            specials[name] = tid
    f.text("general.name", default=None)
    file_params(md, source)
    template = f.text("tokenizer.chat_template", default=None)
    return LoadedModel(source, args, weights, tok, md, template or None, eos, specials, keep, list(warnings))


def _with_tie(args: ModelArgs, w: Weights) -> ModelArgs:
    return replace(args, tie_word_embeddings=w.output is w.token_embd)
