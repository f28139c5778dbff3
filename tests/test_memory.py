"""quant.kernels.code_pages: LLVM's pages go, after a compile and after every cache load, and
compiling and loading still work after."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LIB_RSS = r"""
def lib_rss(name):
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = len(parts) > 5 and name in parts[5]
        elif inside and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total
"""

CHILD = LIB_RSS + r"""
import numba, numpy as np
from quant.kernels import code_pages

@numba.njit
def before(x):
    return x * 2.0

x = np.arange(1000, dtype=np.float64)
assert before(x).sum() == 2 * x.sum()
held = lib_rss("libllvmlite")
assert code_pages.drop()
after = lib_rss("libllvmlite")
assert not code_pages.drop("no-such-library")
assert before(x).sum() == 2 * x.sum()  # compiled code is numba's own memory

@numba.njit
def later(x):  # a compile after the release faults LLVM's pages back in
    return np.sqrt(x).sum()

assert abs(later(x) - np.sqrt(x).sum()) < 1e-9
print(held, after, lib_rss("libllvmlite"))
"""

# a kernel with cache=True, compiled by the first child and loaded from the cache by the second
CACHED = LIB_RSS + r"""
import sys
import numba, numpy as np
import quant.kernels  # the light cache loads, which drop LLVM's pages after a hit
sys.path.insert(0, sys.argv[1])
from cached_kernel import twice
x = np.arange(1000, dtype=np.float64)
assert twice(x).sum() == 2 * x.sum()
print(len(twice.stats.cache_hits), lib_rss("libllvmlite"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_drop_after_a_compile_and_compiling_still_works():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    held, after, recompiled = map(int, r.stdout.split())
    assert held > 20 << 20  # LLVM's resident code after a compile: tens of MB
    assert after < held // 2
    assert recompiled > after  # the compile read them back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_a_cache_load_leaves_llvm_out_of_the_resident_set(tmp_path):
    (tmp_path / "cached_kernel.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return x * 2.0\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", CACHED, str(tmp_path)], capture_output=True, text=True,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(tuple(map(int, r.stdout.split())))
    (hits0, compiled), (hits1, loaded) = runs
    assert hits0 == 0 and hits1 == 1  # compiled, then loaded
    assert compiled > 20 << 20  # a compile leaves LLVM resident (nothing drops it here)
    assert loaded < compiled // 4  # the load dropped what linking the kernel read
