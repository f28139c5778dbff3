"""Options shared by `run`, `chat`, `bench`, `eval` and `serve`, declared once, and their checks."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from .base import UsageError

Model = Annotated[str, typer.Argument(help="A GGUF file, a Hugging Face model directory, or a hub repo id "
                                           "(Qwen/Qwen3-0.6B, Qwen/Qwen3-8B-GGUF:Q8_0).")]
DEFAULT_MODEL = "Qwen/Qwen3-0.6B-GGUF:Q8_0"  # the smallest Qwen3, in the format that runs best here
OptionalModel = Annotated[Optional[str], typer.Argument(
    help=f"A GGUF file, a Hugging Face model directory, or a hub repo id (default: {DEFAULT_MODEL}).")]


def model_or_default(model: str | None) -> str:
    """MODEL, or with one line saying so: the default model where it is already downloaded,
    else the demo model shipped in the package (a fresh install runs offline, and nothing is
    downloaded that the user did not ask for)."""
    if model is not None:
        return model
    from ..errors import ConfigError
    from ..io.models import find
    from .base import err

    if not find(DEFAULT_MODEL):
        from ..demo.compact import checkpoint
        from ..paths import cache_dir

        try:
            demo = checkpoint(cache_dir())
        except ConfigError:  # an installation without the demo's weights: the default, downloaded
            pass
        else:
            err.print(f"[dim]no MODEL given: using the demo model, a tiny Qwen3 trained on a CPU that adds, "
                      f"subtracts and calls tools (`qwen3cli pull {DEFAULT_MODEL}` gets a real one)[/dim]",
                      highlight=False)
            return str(demo)
    err.print(f"[dim]no MODEL given: using {DEFAULT_MODEL} (downloaded once; `qwen3cli list` shows what "
              "you have)[/dim]", highlight=False)
    return DEFAULT_MODEL


def looks_like_model(text: str) -> bool:
    """Whether run's first argument names a model (a path that exists, a repo id) or is the prompt."""
    import os

    from ..io.hub import REPO_ID, normalize

    return os.path.lexists(os.path.expanduser(text)) or text.endswith(".gguf") or \
        REPO_ID.match(normalize(text)) is not None
System = Annotated[Optional[str], typer.Option("--system", "--system-prompt", "-sys", help="System prompt.")]
Ctx = Annotated[Optional[int], typer.Option("--ctx", "--ctx-size", "-c", help="Context size in tokens (default: 8192, or the "
                                                               "model's if less); past the native length YaRN is applied.")]
Temp = Annotated[Optional[float], typer.Option("--temp", help="Temperature (0 = greedy). Default by mode: 0.6 "
                                                             "thinking, 0.7 not.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Top-k (0 = off). Default 20.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Top-p. Default 0.95 thinking, 0.8 not.")]
MinP = Annotated[Optional[float], typer.Option("--min-p", help="Min-p. Default 0.")]
Presence = Annotated[Optional[float], typer.Option("--presence-penalty", help="Presence penalty (0-2). Default 0.")]
Repeat = Annotated[Optional[float], typer.Option("--repeat-penalty", help="Repetition penalty (1 = off). Default 1.")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed, for reproducible sampling.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all cores).")]
Quant = Annotated[str, typer.Option("--quant", help="Type a Hugging Face directory or repo is converted to.")]
Device = Annotated[str, typer.Option("--device", help="auto (a CUDA GPU when numba-cuda finds one, else the CPU), "
                                                     "cpu or cuda.")]
Exact = Annotated[bool, typer.Option("--exact", help="Float activations in every product: the reference "
                                                   "implementation's numerics, slower. Default: quantized weights meet "
                                                   "8-bit activations, as in llama.cpp.")]


class CacheType(str, Enum):  # kv_cache.CACHE_TYPES (not imported here: it loads numba)
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"


Cache = Annotated[Optional[CacheType], typer.Option(
    "--cache-type", help="KV cache type: f16 (the default, as llama.cpp's: half of f32's memory), "
                         "q8_0 (about a quarter) or f32.")]


def cache_value(c: CacheType | None) -> str | None:
    return c.value if c is not None else None


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import numba

    if n < 1:
        raise UsageError(f"--threads must be at least 1, got {n}")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def user_sampling(seed: int | None = None, **flags) -> tuple[dict, int | None]:
    """The sampling flags the user set, checked before any model loads; --seed -1 means a
    random seed, as in llama.cpp. Returns (flags that were set, seed)."""
    from ..sampler import SamplingError, SamplingParams

    if seed == -1:
        seed = None
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        SamplingParams(**{**SamplingParams().__dict__, **given, "seed": seed}).validate()
    except SamplingError as e:
        raise UsageError(str(e)) from None
    return given, seed

THINKING_DISPLAYS = ("show", "collapse", "hide")  # chat_ui.DISPLAYS: the chat draws them
ThinkingBudget = Annotated[Optional[int], typer.Option(
    "--thinking-budget", help="Close the thinking after N tokens (Qwen's note, then the answer); not counted in -n.")]
ThinkingDisplay = Annotated[str, typer.Option("--thinking", help="Thinking display: show, collapse (one summary "
                                                                "line) or hide.")]


def mode_note(engine, think: bool | None) -> str | None:
    """A line when --think / --no-think asks what the model cannot do (it always or never thinks)."""
    if think is None or engine.mode == "hybrid" or (think == (engine.mode == "always")):
        return None
    return f"this model {engine.mode} thinks: --{'no-' if not think else ''}think has no effect"
