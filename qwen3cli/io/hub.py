"""Hugging Face repo ids -> local files, through huggingface_hub and its cache.

`Qwen/Qwen3-8B-GGUF:Q8_0` picks the GGUF file whose name carries the tag; a repo of
safetensors (`Qwen/Qwen3-0.6B`) is downloaded once and quantized once to the requested type,
the GGUF kept in our cache for next time, as ollama does. HF_HUB_OFFLINE and HF_HUB_CACHE are
honoured (huggingface_hub reads them); offline, only what the cache holds is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from quant.gguf_split import part_paths

from ..errors import ConfigError

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<tag>[\w.-]+))?$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json"]
# The GGUF picked when no tag is given: what runs best here, most accurate first.
PREFERRED = ["Q8_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q4_0", "BF16", "F16"]

Progress = Callable[[str, int, int], None]


class HubError(ConfigError):
    """A repo id that cannot be resolved: unknown, offline and not cached, no matching file."""


def cache_dir() -> Path:
    """Where converted checkpoints are kept: QWEN3CLI_CACHE, else qwen3cli's cache directory
    (paths.cache_dir: QWEN3CLI_CACHE_DIR, else ~/.cache/qwen3cli on Linux, ...)."""
    if os.environ.get("QWEN3CLI_CACHE"):
        return Path(os.environ["QWEN3CLI_CACHE"])
    from ..paths import cache_dir as ours

    return ours()


def _tqdm_class(progress: Progress | None, what: str):
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Bar(hf_tqdm):
        def __init__(self, *a, **kw):
            kw["disable"] = True  # we render; huggingface_hub's own bars stay quiet
            super().__init__(*a, **kw)
            self._done = 0

        def update(self, n=1):
            self._done += n or 0
            if progress and self.total:
                progress(what, self._done, int(self.total))

    return Bar


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _files(repo: str) -> tuple[list[str], str | None]:
    """The repo's file names and the cached snapshot dir (offline: only what is cached)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if not _offline():
        try:  # model_info is one request, without list_repo_files' retries on a dead network
            return [s.rfilename for s in HfApi().model_info(repo, timeout=10).siblings or []], None
        except RepositoryNotFoundError:
            raise HubError(f"{repo}: no such model on the Hugging Face hub (or it is private)") from None
        except Exception:  # no network (the HTTP stack's errors vary): fall back to the cache
            pass
    try:
        snap = snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise HubError(f"{repo}: not in the local Hugging Face cache and {why}") from None
    files = [str(p.relative_to(snap)) for p in Path(snap).rglob("*") if p.is_file()]
    return files, snap


def pick_gguf(repo: str, ggufs: list[str], tag: str | None) -> str:
    def has(name: str, t: str) -> bool:
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", Path(name).name, re.I) is not None

    if tag:
        match = [g for g in ggufs if has(g, tag)]
        if not match:
            raise HubError(f"{repo}: no GGUF file for {tag!r}; it has " + ", ".join(Path(g).name for g in ggufs))
        return sorted(match)[0]
    for t in PREFERRED:
        match = [g for g in ggufs if has(g, t)]
        if match:
            return sorted(match)[0]
    return sorted(ggufs)[0]


def _with_parts(repo: str, name: str, ggufs: list[str]) -> list[str]:
    """The file, or every part of a split file (llama.cpp loads them from one directory)."""
    parts = part_paths(name)
    if parts is None:
        return [name]
    names = [p.as_posix() for p in parts]
    missing = [n for n in names if n not in ggufs]
    if missing:
        raise HubError(f"{repo}: {Path(name).name} is split into {len(names)} parts but "
                       f"{Path(missing[0]).name} is not in the repo")
    return names


HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")


def normalize(spec: str) -> str:
    """ollama's `hf.co/OWNER/REPO:TAG` (and a pasted huggingface.co address) as a repo id."""
    for prefix in HUB_PREFIXES:
        if spec.startswith(prefix):
            return spec[len(prefix):].rstrip("/")
    return spec


def fetch(spec: str, progress: Progress | None = None) -> Path:
    """A repo id's files on disk: the GGUF file its tag picks (with every part of a split
    one), or its checkpoint directory."""
    spec = normalize(spec)
    m = REPO_ID.match(spec)
    if not m or spec.endswith(".gguf") or spec.startswith(("./", "../", "/", "~")):
        raise ConfigError(f"{spec}: no such file or directory")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, tag = m["repo"], m["tag"]
    files, _ = _files(repo)
    ggufs = [f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower()]
    try:
        if ggufs:
            names = _with_parts(repo, pick_gguf(repo, ggufs, tag), ggufs)
            return [Path(hf_hub_download(repo, n, local_files_only=_offline(),
                                         tqdm_class=_tqdm_class(progress, f"downloading {Path(n).name}")))
                    for n in names][0]
        if "config.json" not in files:
            raise HubError(f"{repo}: neither GGUF files nor a Hugging Face checkpoint (no config.json)")
        if tag:
            raise HubError(f"{repo}: has no GGUF files, so no {tag!r} to pick; use --quant for the type to convert to")
        return Path(snapshot_download(repo, allow_patterns=CHECKPOINT_FILES, local_files_only=_offline(),
                                      tqdm_class=_tqdm_class(progress, f"downloading {repo}")))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise HubError(f"{repo}: download failed: {str(e).splitlines()[0][:160]}") from None


def resolve(spec: str, quant: str = "q8_0", progress: Progress | None = None) -> Path:
    """A local GGUF file for a repo id: a checkpoint repo is quantized to `quant` once."""
    path = fetch(spec, progress)
    if path.is_dir():
        return _quantized(REPO_ID.match(normalize(spec))["repo"], path, quant, progress)
    return path


def converted(directory: Path, quant: str, progress: Progress | None = None) -> tuple[Path, list[str] | None]:
    """A local checkpoint directory quantized once to `quant` (ollama keeps its own copy too):
    the GGUF is cached under a key of the directory's path and its files' sizes and times, so
    an edited checkpoint is converted again. Returns (file, the conversion's warnings), the
    warnings None when the file was already there."""
    import hashlib

    d = Path(directory).resolve()
    h = hashlib.sha256(str(d).encode())
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    out = cache_dir() / "local" / f"{d.name}--{h.hexdigest()[:12]}--{quant}.gguf"
    if out.is_file():
        return out, None
    return _write(d, out, quant, progress)


def _quantized(repo: str, snap: Path, quant: str, progress: Progress | None) -> Path:
    """Quantize a downloaded checkpoint once; the GGUF is cached per snapshot and type."""
    out = cache_dir() / f"{repo.replace('/', '--')}--{snap.name[:12]}--{quant}.gguf"
    if out.is_file():
        return out
    return _write(snap, out, quant, progress)[0]


def _write(src: Path, out: Path, quant: str, progress: Progress | None) -> tuple[Path, list[str]]:
    """Quantize the checkpoint `src` into `out` (atomically); returns it and the plan's warnings."""
    from . import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    p = convert.plan(src, quant)
    total, done = p.input_bytes, 0
    per_elem = p.input_bytes / max(p.n_params, 1)

    def step(name: str, n: int) -> None:
        nonlocal done
        done += int(n * per_elem)
        if progress:
            progress(f"quantizing to {quant}", done, total)

    convert.write(p, out, force=True, progress=step)
    return out, p.warnings
