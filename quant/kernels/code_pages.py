"""LLVM's code out of the resident set while numba's kernels run (Linux; a no-op elsewhere).

libllvmlite (~50-70 MB of code and tables once touched) runs only while numba compiles a kernel
or links one read from its cache; the kernels themselves are numba's own memory. A warm run
loads its kernels lazily, during its first prefill and first decode step, that is while the
weights are paged in, so LLVM's pages sat in every run's peak (0.6B Q8_0, pp128: 45 MB of 817).
drop() lets go of them after each load: a page dropped here is a clean copy of the file, so the
next load faults back what it reads from the page cache (~1 ms), the same bytes.

Only the library's read-only mappings that hold no page of their own are dropped: the loader's
relocated tables (RELRO) are private copies, which MADV_DONTNEED would throw away. They are
found once, from /proc/self/smaps (a read that walks every mapping's page tables: ~25 ms once
the weights are resident), and kept: a loaded library's mappings do not move.
"""

from __future__ import annotations

import ctypes
import mmap

LIBRARY = "libllvmlite"

_spans: dict[str, list[tuple[int, int]]] = {}
_madvise = None


def _scan(library: str) -> list[tuple[int, int]]:
    """(start, end) of each read-only mapping of `library` with no private page."""
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    out, head, own = [], None, 0

    def close():
        if head is not None and own == 0:
            out.append(head)

    for line in text.splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
            close()
            head, own = None, 0
            if len(parts) > 5 and library in parts[5] and "w" not in parts[1]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                head = (lo, hi)
        elif head is not None and len(parts) >= 2 and parts[0] == "Anonymous:":
            own = int(parts[1])
    close()
    return out


def spans(library: str = LIBRARY) -> list[tuple[int, int]]:
    if library not in _spans:
        _spans[library] = _scan(library)
    return _spans[library]


def drop(library: str = LIBRARY) -> bool:
    """Let go of `library`'s clean read-only pages; False where that cannot be done here."""
    global _madvise
    if _madvise is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _madvise = False
            return False
        f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise = f
    if _madvise is False or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    ok = False
    for lo, hi in spans(library):
        ok |= _madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0
    return ok
