import os
import sys
import threading
from pathlib import Path

# The CUDA tests run in numba-cuda's simulator unless asked to use a real GPU; set before numba
# is imported. (qwen3cli's --device auto never picks the simulator.)
if os.environ.get("QWEN3CLI_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# CLI output must not depend on the terminal the tests run in: every rich Console created from
# here on sees 80 columns, what a fresh non-interactive shell gives (rich's default off a terminal).
os.environ["COLUMNS"] = "80"
os.environ.pop("LINES", None)

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402


def _thread_safe_shared_arrays() -> None:
    """numba-cuda's simulator hands a block's threads one array per `cuda.shared.array` line by
    a dict lookup and, on a miss, an insert, with no lock between them: two of the first block's
    threads (each a Python thread) can both miss and take different arrays, so that block's
    reduction reads a private copy. test_cuda's batched decode once got one wrong logit, [0, 0]
    (the first block of the output projection), under a loaded CI; with a sleep in that window
    13 of 40 simulated block sums came out wrong (/tmp scratch script), none with this lock.
    The same keying as the simulator's (the calling line); a simulator defect, not a kernel one."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    stock = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or the stock error
            return stock(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = self._allocations[key] = kernelapi.np.empty(shape, dt)
        return res

    shared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _thread_safe_shared_arrays()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """No test writes to the real per-user cache (tokenizer_cache.py); CLI subprocesses inherit it."""
    os.environ["QWEN3CLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    os.environ["QWEN3CLI_CACHE"] = str(tmp_path_factory.mktemp("conversions"))  # converted checkpoints
    os.environ["QWEN3CLI_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("running"))  # `ps` entries


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """make_checkpoint, cached per set of arguments for the whole session."""
    made = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def gguf_model(ckpt, tmp_path_factory):
    """A tiny checkpoint converted by our quantize: gguf_model("f32", moe=True, ...) -> (gguf, hf_dir)."""
    from qwen3cli.io.convert import quantize

    made = {}

    def get(type_name: str = "f32", **kw):
        key = (type_name, tuple(sorted(kw.items())))
        if key not in made:
            src, _ = ckpt(**kw)
            out = tmp_path_factory.mktemp("gguf") / f"model-{type_name}.gguf"
            quantize(src, out, type_name)
            made[key] = (out, src)
        return made[key]

    return get
