import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402


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
