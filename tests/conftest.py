import os
import sys
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
