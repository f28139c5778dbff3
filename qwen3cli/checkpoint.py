"""A Hugging Face checkpoint directory: config, safetensors shards, tensors read on demand.

safetensors' numpy loader cannot read BF16, and real Qwen3 checkpoints are BF16, so the
header is parsed here and each tensor is memory-mapped only while it is read, then
converted to float32. Every shard header is checked against the file size when the
directory is opened, so a truncated download fails before any output is written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant.formats import bf16_to_f32

from .config import ModelArgs
from .errors import CheckpointError

DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
MAX_HEADER = 100 << 20
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one .safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    base = 8 + n
    out: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only BF16, F16 and F32 are supported")
        ref = TensorRef(name, path, dtype, shape, base + int(start))
        if any(d < 0 for d in shape) or int(end) - int(start) != ref.nbytes or int(start) < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent shape and data offsets")
        if base + int(end) > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + int(end)}, file has {size}")
        out[name] = ref
    return out


class Checkpoint:
    """An HF model directory. `tensors` maps names to TensorRefs; `read()` gives float32."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.exists():
            raise CheckpointError(f"{self.dir}: no such directory")
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory (expected a Hugging Face model directory)")
        self.args = ModelArgs.from_hf_dir(self.dir)
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            for name, ref in read_safetensors_header(shard).items():
                if name in self.tensors:
                    raise CheckpointError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = ref

    def _shards(self) -> list[Path]:
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: corrupt index (expected a 'weight_map' object)") from None
            shards = []
            for name in files:
                p = self.dir / name
                if Path(name).name != name or not p.is_file():
                    raise CheckpointError(f"{index}: shard {name!r} is missing")
                shards.append(p)
            return shards
        single = self.dir / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if found:
            return found
        raise CheckpointError(f"{self.dir}: no model.safetensors or {INDEX}")

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, index=()) -> np.ndarray:
        """Tensor `name` (optionally `[index]` of it) as a float32 array.

        The file is mapped for this read only, so pages do not pile up in resident memory
        over a 60 GB checkpoint."""
        ref = self.tensors[name]
        try:
            mm = np.memmap(ref.file, DTYPES[ref.dtype], "r", ref.offset, ref.shape)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ref.file}: cannot read tensor {name!r}: {e}") from None
        part = mm[index] if index != () else mm
        if ref.dtype == "BF16":
            out = bf16_to_f32(np.asarray(part))
        else:
            out = np.array(part, dtype=np.float32)
        del part, mm
        if not np.isfinite(out).all():  # a quantizer would turn these into silent garbage
            raise CheckpointError(f"{ref.file}: tensor {name!r} contains NaN or infinite values")
        return out
