"""From a model source to a ready engine: the device chosen, the weights loaded, the kernels
compiled before anyone waits on them. What `load()` of the Python API runs; the CLI calls it
with hooks that draw its bars and lines. Nothing here prints.

Hooks are called in this order: `progress` only while the model loads (downloading,
converting), then `warning` and `note` lines, then `stage` around the slow steps after the load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Progress = Callable[[str, int, int], None]  # (what, done, total): the loader's progress


@dataclass
class LoadHooks:
    """How a front end hears about a load; every hook is optional.

    progress(what, done, total): bytes downloaded or converted, only during the load.
    warning(line): an optional input the model was loaded without (llama.cpp would warn too).
    note(line): information, such as auto falling back to the CPU or the GPU backend's summary.
    stage(text): a slow step starts (text says which) or, with None, the step ended."""

    progress: Progress | None = None
    warning: Callable[[str], None] | None = None
    note: Callable[[str], None] | None = None
    stage: Callable[[str | None], None] | None = None


GPU_STAGE = "uploading the weights and compiling the GPU kernels"


def open_engine(source: str, ctx: int | None = None, quant: str = "q8_0", device: str = "auto", exact: bool = False,
                cache_type: str | None = None, hooks: LoadHooks | None = None):
    """Pick the device, load `source` (a GGUF file, a Hugging Face directory or a hub repo id),
    build the Engine, and compile its kernels now if building them showed this process had not
    (a first CPU run, every GPU run): the first token is not the one that waits on the compiler.

    ctx: the context in tokens (None: the model's, at most the default); quant: the type a
    Hugging Face source is converted to; device: auto, cpu or cuda; exact: float activations;
    cache_type: the KV cache's f32, f16 or q8_0 (None: the device's default). Raises the
    library's typed errors (DeviceError, LoadError, ...)."""
    from ..io.early import prestart

    prestart(source)  # a GGUF's header read and its tokenizer's parse started (io/early.py)
    from quant.kernels import code_pages, matmul_cpu

    from ..io.loader import load
    from ..model.compiling import CompileWatch
    from ..model.device import pick
    from . import engine as engine_module

    h = hooks or LoadHooks()
    backend, note = pick(device)
    loaded = load(source, quant=quant, progress=h.progress)
    for line in loaded.warnings:
        _call(h.warning, line)
    for line in loaded.notes:
        _call(h.note, line)
    if note:  # after the load, so that a bad file still fails first
        _call(h.note, note)

    def forward(n: int) -> None:  # a cache of n positions: on a GPU a full-context one is gigabytes
        engine.model.forward([0] * n, engine.model.ops.new_cache(n))

    if backend == "cpu":
        watch = CompileWatch().install()
        try:
            engine = engine_module.Engine(loaded, ctx, exact=exact, cache_type=cache_type)
        finally:
            watch.remove()
        if watch.count:  # packing compiled its kernels: a first run, so compile the rest now
            matmul_cpu.warm_up(forward)
        # the compiler's pages (~70 MB) sat in the peak of every later prefill: the kernels
        # are loaded, and a later compile faults them back (a cache load drops them itself)
        code_pages.drop()
        return engine
    _call(h.stage, GPU_STAGE)
    try:
        engine = engine_module.Engine(loaded, ctx, device=backend, exact=exact, cache_type=cache_type)
        _call(h.note, engine.model.ops.summary)
        matmul_cpu.warm_up(forward)
    finally:
        _call(h.stage, None)
    return engine


def _call(hook, *args) -> None:
    if hook is not None:
        hook(*args)
