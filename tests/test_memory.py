"""memory.release_code_pages: the compiler's pages go, and compiling still works after."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import numba, numpy as np
from qwen3cli.model.memory import release_code_pages

def lib_rss(name):
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = len(parts) > 5 and name in parts[5]
        elif inside and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total

@numba.njit
def before(x):
    return x * 2.0

x = np.arange(1000, dtype=np.float64)
assert before(x).sum() == 2 * x.sum()
held = lib_rss("libllvmlite")
dropped = release_code_pages()
after = lib_rss("libllvmlite")
assert release_code_pages("no-such-library") == 0
assert before(x).sum() == 2 * x.sum()  # compiled code is numba's own memory

@numba.njit
def later(x):  # a compile after the release faults LLVM's pages back in
    return np.sqrt(x).sum()

assert abs(later(x) - np.sqrt(x).sum()) < 1e-9
print(held, dropped, after, lib_rss("libllvmlite"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_release_code_pages_drops_llvm_and_compiling_still_works():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    held, dropped, after, recompiled = map(int, r.stdout.split())
    assert held > 20 << 20  # LLVM's resident code after a compile: tens of MB
    assert dropped > held // 2 and after < held - dropped // 2
    assert recompiled > after  # the compile read them back
