"""How much memory this process can still get, so that sizes computed from a file or a flag
are refused with one line before an allocation fails (a MemoryError, or the OOM killer)."""

from __future__ import annotations

import os
import resource

from ..errors import Qwen3CliError


class MemoryLimitError(Qwen3CliError):
    """Something the input asks for cannot fit in the memory this machine has."""


def _meminfo(*keys: str) -> int | None:
    """The sum of /proc/meminfo's `keys` in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            rows = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(rows[k].split()[0]) * 1024 for k in keys)
    except (OSError, KeyError, ValueError):
        return None


def _address_space_left() -> int | None:
    """What RLIMIT_AS leaves to map, when a limit is set: mmap fails beyond it whatever RAM is free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available() -> int | None:
    """Bytes a new allocation can get: MemAvailable (free plus reclaimable cache) and free swap,
    capped by the address-space limit; None where neither can be known."""
    avail = _meminfo("MemAvailable", "SwapFree")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            avail = None
    left = _address_space_left()
    if left is not None:
        avail = left if avail is None else min(avail, left)
    return avail


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def require(nbytes: int, what: str, hint: str = "") -> None:
    """Raise MemoryLimitError unless `nbytes` (a Python int) fits in what is available."""
    avail = available()
    if avail is not None and nbytes > avail:
        raise MemoryLimitError(f"{what} needs {human(nbytes)} of memory, more than the {human(avail)} available"
                               + (f"; {hint}" if hint else ""))


def trim_heap() -> None:
    """Hand the C heap's freed pages back to the system. Building the tokenizer leaves tens of
    MB of freed parse buffers (151,387 merges) that glibc keeps for reuse, and nothing reuses
    them: numpy maps its large arrays (the packed weights) apart from the heap. Kept, they count
    in the process's peak for its whole life. A no-op where there is no malloc_trim."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
