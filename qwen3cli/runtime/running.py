"""The models held by qwen3cli processes on this machine: what `qwen3cli ps` lists, as
`ollama ps` lists the models its server has loaded.

We have no resident server to ask, so each long-lived process (serve, chat) leaves a small
JSON file named by its pid in the user's runtime directory while it holds a model, and
removes it when it ends. `running()` reads them and deletes the files of processes that died
without removing theirs (kill -9, a crash). The files are the user's own but may be stale,
half-written or from another version: one that does not parse is skipped (and removed when its
process is gone), never an error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Running:
    pid: int
    kind: str  # "serve" or "chat"
    model: str  # the name the process was started with (a path, a repo id)
    ctx: int  # context length in tokens
    device: str  # "cpu" or "cuda"
    started: float  # seconds since the epoch
    url: str | None = None  # serve's address
    rss: int | None = None  # the process's resident memory now, in bytes, where the OS tells us


def runtime_dir() -> Path:
    """Where the entries live: QWEN3CLI_RUNTIME_DIR, else platformdirs' user runtime directory
    (XDG_RUNTIME_DIR on Linux, a per-user temp folder elsewhere), `running` inside it."""
    if os.environ.get("QWEN3CLI_RUNTIME_DIR"):
        return Path(os.environ["QWEN3CLI_RUNTIME_DIR"])
    import platformdirs

    return Path(platformdirs.user_runtime_dir("qwen3cli", appauthor=False)) / "running"


def _alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (a reused pid): not ours, but not ours to delete either
        return True
    return True


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _parse(path: Path) -> Running | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        r = Running(pid=int(d["pid"]), kind=str(d["kind"]), model=str(d["model"]), ctx=int(d["ctx"]),
                    device=str(d["device"]), started=float(d["started"]),
                    url=None if d.get("url") is None else str(d["url"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return r if path.stem == str(r.pid) else None


def running(directory: Path | None = None) -> list[Running]:
    """The live entries, oldest first; stale files are deleted on the way."""
    directory = runtime_dir() if directory is None else directory
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    found = []
    for path in paths:
        r = _parse(path)
        pid = r.pid if r is not None else (int(path.stem) if path.stem.isdigit() else None)
        if pid is None or not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        if r is not None:
            found.append(Running(**{**asdict(r), "rss": _rss(r.pid)}))
    return sorted(found, key=lambda r: r.started)


@contextmanager
def registered(kind: str, model: str, ctx: int, device: str, url: str | None = None,
               directory: Path | None = None):
    """Be listed by `running()` for the duration of the block. A runtime directory that cannot
    be written (read-only home, no XDG_RUNTIME_DIR permission) only means not being listed."""
    directory = runtime_dir() if directory is None else directory
    entry = Running(pid=os.getpid(), kind=kind, model=model, ctx=ctx, device=device, started=time.time(), url=url)
    path = directory / f"{entry.pid}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(entry).items() if k != "rss"}), encoding="utf-8")
        os.replace(tmp, path)  # `ps` never reads half an entry
        written = True
    except OSError:
        written = False
    try:
        yield entry
    finally:
        if written:
            path.unlink(missing_ok=True)
