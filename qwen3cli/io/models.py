"""The models on this machine, as ollama's list / rm / show see theirs: GGUF files and
checkpoints in the Hugging Face cache (huggingface_hub's own scan of it), and the GGUF files
qwen3cli converted from checkpoints (hub.cache_dir()).

Every entry has the name that runs it (`Qwen/Qwen3-8B-GGUF:Q8_0`, `Qwen/Qwen3-0.6B`), so
`list` shows what `run` takes, and `remove` takes the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


class ModelNotFound(ConfigError):
    """No cached model has that name."""


@dataclass(frozen=True)
class CachedModel:
    name: str  # what run / chat / serve take
    kind: str  # "gguf" (a repo's file), "checkpoint" (a repo's safetensors), "converted" (ours, from a checkpoint)
    path: Path  # the GGUF file (the first part of a split one) or the checkpoint directory
    size: int  # bytes, all parts
    type: str | None  # Q8_0, Q4_K_M, ... (a checkpoint: None)
    files: tuple[Path, ...] = ()  # what `remove` deletes: snapshot entries, or our converted file


def _file_type(path: Path) -> str | None:
    from gguf import LlamaFileType

    from quant.gguf_file import GGUFFile

    try:
        with GGUFFile(path) as g:
            ft = g.metadata.get("general.file_type")
    except Exception:  # a broken file is listed without a type; running it says what is wrong
        return None
    try:
        return LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None


def _hf_models() -> list[CachedModel]:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from . import hub
    from quant.gguf_split import PART_NAME

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)[:1]:  # the newest snapshot
            files = {f.file_name if f.file_path.parent == rev.snapshot_path else
                     f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
            ggufs = sorted(n for n in files if n.endswith(".gguf") and "mmproj" not in n.lower())
            for n in ggufs:
                m = PART_NAME.match(Path(n).name)
                if m and int(m["no"]) != 1:
                    continue  # the first part stands for the set
                parts = [n] if m is None else [p for p in ggufs if p.startswith(n[:-len("00001-of-00000.gguf")])]
                ftype = _file_type(files[n].file_path)
                name = f"{repo.repo_id}:{ftype}" if ftype and hub.pick_gguf(repo.repo_id, ggufs, ftype) == n \
                    else f"{repo.repo_id}:{Path(n).name}"
                out.append(CachedModel(name, "gguf", files[n].file_path, sum(files[p].size_on_disk for p in parts),
                                       ftype, tuple(files[p].file_path for p in parts)))
            if not ggufs and "config.json" in files:
                out.append(CachedModel(repo.repo_id, "checkpoint", rev.snapshot_path, rev.size_on_disk, None,
                                       tuple(f.file_path for f in rev.files)))
    return out


def _converted() -> list[CachedModel]:
    """hub._quantized's files: OWNER--NAME--SNAPSHOT--QUANT.gguf."""
    from . import hub

    d = hub.cache_dir()
    out = []
    for p in sorted(d.glob("*--*--*--*.gguf")) if d.is_dir() else []:
        parts = p.name[:-5].split("--")
        repo, quant = f"{parts[0]}/{'--'.join(parts[1:-2])}", parts[-1]
        out.append(CachedModel(f"{repo} --quant {quant}", "converted", p, p.stat().st_size, quant.upper(), (p,)))
    for p in sorted((d / "local").glob("*--*--*.gguf")) if (d / "local").is_dir() else []:
        parts = p.name[:-5].split("--")  # hub.converted's DIRNAME--KEY--QUANT.gguf
        name, quant = "--".join(parts[:-2]), parts[-1]
        out.append(CachedModel(f"local:{name} --quant {quant}", "converted", p, p.stat().st_size, quant.upper(),
                               (p,)))
    return out


def cached_models() -> list[CachedModel]:
    """Every model this machine can run without a download."""
    return _hf_models() + _converted()


def find(name: str) -> list[CachedModel]:
    """The cached models `name` means: an exact name, a repo id (all of its files), or a path."""
    from .hub import normalize

    name = normalize(name)
    models = cached_models()
    exact = [m for m in models if m.name == name or str(m.path) == name]
    if exact:
        return exact
    return [m for m in models if m.name.split(":")[0].split(" ")[0] == name]


def remove(name: str) -> list[CachedModel]:
    """Delete the cached model(s) `name` means (a repo's snapshot entries and the blobs only
    they use; our converted file); returns what was removed."""
    found = find(name)
    if not found:
        raise ModelNotFound(f"{name}: no such model in the caches (`qwen3cli list` shows them)")
    for m in found:
        for f in m.files:
            _unlink(Path(f))
        if m.kind == "checkpoint":
            _prune(Path(m.path))
    return found


def _unlink(entry: Path) -> None:
    """A snapshot entry is a link to a blob that other snapshots may share: the blob goes
    only when no other entry of the repo points to it."""
    try:
        target = entry.resolve() if entry.is_symlink() else None
        entry.unlink()
    except FileNotFoundError:
        return
    if target is None or not target.is_file():
        return
    repo_root = next((p for p in entry.parents if p.name.startswith("models--")), None)
    if repo_root is None:
        return
    for snap_file in (repo_root / "snapshots").rglob("*"):
        if snap_file.is_symlink() and snap_file.resolve() == target:
            return
    target.unlink(missing_ok=True)


def _prune(directory: Path) -> None:
    """Empty directories left in a snapshot."""
    for d in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
