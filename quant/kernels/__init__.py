"""Kernels: functions of arrays and ints only, one per (format, operation).

numba's OpenMP threads spin-wait after each parallel region (GNU default: 300,000 spins); an
OpenBLAS pool working beside them is starved (measured 2-13x slower prefill). So numpy's
OpenBLAS is pinned to one thread here and prefill splits its products over threads of our
own (threads.py); numba keeps its default spin, which decode's ~150 launches a token want.
Where numpy's BLAS is not OpenBLAS (cannot be pinned), a short spin (GOMP_SPINCOUNT=1000)
serves both as before. Either must happen before the OpenMP runtime starts, hence here, on
first import; a value the user set wins.

numba's array maths (numba.np.arraymath, imported with the first kernel a process loads)
imports scipy.linalg where scipy is installed, only to pick BLAS or a plain loop for
np.correlate / np.convolve; np.dot and np.linalg import it themselves when compiled. That
import was half of numba's first-kernel cost (~0.17 s of CPU at every start, measured with
scipy 1.17), for nothing these kernels use: it happens here with scipy hidden.

numba also refreshes its whole CPU target (every typing and lowering registry, imported and
installed in Python: ~0.1 s of CPU) before its first cache load, which a kernel loaded from the
cache never uses; a cache load here sets up numba's runtime alone (_light_cache_loads), and lets go of LLVM's code
pages once the kernel is linked (code_pages.py).
"""

import os

from . import code_pages
from .threads import pin_blas


def _numba_cache_dir() -> None:
    """numba's disk cache checks a kernel against its own file's time stamp only, but the
    machine code it keeps has the functions it calls from other modules compiled in: after an
    edit of int8_cpu.py alone, int8_gemm_cpu's cached kernels kept the old quantizer. So the
    cache lives in a folder named by a hash of every kernel source, and any edit starts a fresh
    one (the four newest are kept: worktrees and versions side by side). A NUMBA_CACHE_DIR the
    user set wins; QWEN3CLI_NUMBA_CACHE moves the folders' parent."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    import hashlib
    import shutil
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    base = os.environ.get("QWEN3CLI_NUMBA_CACHE")
    if not base:
        import platformdirs
        base = os.path.join(platformdirs.user_cache_dir("qwen3cli"), "numba")
    d = Path(base) / h.hexdigest()[:16]
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.utime(d)  # the newest used, for pruning
        for old in sorted(Path(base).iterdir(), key=lambda p: p.stat().st_mtime)[:-4]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:  # no writable cache: numba's default place, as before
        return
    os.environ["NUMBA_CACHE_DIR"] = str(d)
    if "numba.core.config" in sys.modules:  # numba read its settings already
        sys.modules["numba.core.config"].CACHE_DIR = str(d)


def _array_maths_without_scipy() -> None:
    import sys

    if "numba.np.arraymath" in sys.modules or "scipy" in sys.modules:  # too late, or scipy is paid for
        return
    sys.modules["scipy"] = None  # `import scipy...` raises ImportError: numba takes its loop
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if "scipy" in sys.modules and sys.modules["scipy"] is None:
            del sys.modules["scipy"]


def _light_cache_loads() -> None:
    """numba's Cache.load_overload refreshes the target context before it reads the cache. A
    cached kernel is machine code linked against numba's runtime (NRT) only: rebuilding it
    needs the runtime's symbols, not the registries the compiler types and lowers with. So a
    load sets up the runtime alone; a miss compiles through numba's pipeline, which refreshes
    the whole target itself first. Loads run under numba's compiler lock, as every refresh
    does, so the method shadowed for one call is seen by no other thread. After a hit, LLVM's
    code pages go (code_pages.py): a warm run's kernels load during its first forward, as the
    weights come in, and would otherwise keep LLVM in the run's peak."""
    from numba.core import caching
    from numba.core.cpu import CPUContext
    from numba.core.runtime import rtsys

    load = caching.Cache.load_overload
    if getattr(load, "light", False):  # a reload of this module
        return

    def load_overload(self, sig, target_context):
        if type(target_context) is not CPUContext:  # another target: numba's own way
            return load(self, sig, target_context)
        target_context.refresh = lambda: rtsys.initialize(target_context)
        try:
            hit = load(self, sig, target_context)
        finally:
            del target_context.refresh
        if hit is not None:
            code_pages.drop()
        return hit

    load_overload.light = True
    caching.Cache.load_overload = load_overload


_numba_cache_dir()
_array_maths_without_scipy()
_light_cache_loads()
BLAS_PINNED = pin_blas()
if not BLAS_PINNED and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
