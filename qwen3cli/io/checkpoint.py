"""A Hugging Face checkpoint directory: config, safetensors shards, tensors read on demand.

safetensors' numpy loader cannot read BF16, and real Qwen3 checkpoints are BF16, so the
header is parsed here and each tensor is memory-mapped only while it is read, then
converted to float32. Every shard header is checked against the file size when the
directory is opened, so a truncated download fails before any output is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant.files import open_regular
from quant.formats import bf16_to_f32

from ..errors import CheckpointError
from ..meta import MB, Fields, describe, is_int, load_json
from ..model.config import ModelArgs, read_hf_config

DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
MAX_HEADER = 100 << 20  # the safetensors format's own limit
MAX_DIMS = 8
INDEX = "model.safetensors.index.json"
INDEX_BYTES = 64 * MB


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(DTYPES[self.dtype]).itemsize  # exact, never a wrapped int64


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one .safetensors file's header: every entry's dtype, shape and
    offsets are checked for type, against each other and against the file's size."""
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors header: its length field says {n} bytes, "
                                  f"more than the format allows ({MAX_HEADER})")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({n} bytes from byte 8, "
                                  f"file has {size})")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and integers of too many digits
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorRef] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ref, start, end = _entry(path, name, info, base)
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        out[name] = ref
        if end > start:
            spans.append((start, end, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:  # two tensors on the same bytes: a small file posing as a large model
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")
    return out


def _entry(path: Path, name: str, info, base: int) -> tuple[TensorRef, int, int]:
    """One header entry as (ref, start, end), its fields checked for type and consistency."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {describe(info)}, not an object")
    f = Fields(info, path, prefix=f"{name}.", error=CheckpointError)
    dtype = f.raw("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {describe(dtype)}; "
                              "only BF16, F16 and F32 are supported")
    shape, offsets = f.items("shape"), f.items("data_offsets")
    if len(shape) > MAX_DIMS or not all(is_int(d) and d >= 0 for d in shape):
        raise f.fail("shape", f"a list of at most {MAX_DIMS} non-negative integers", shape)
    if len(offsets) != 2 or not all(is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]:
        raise f.fail("data_offsets", "[start, end] with 0 <= start <= end", offsets)
    start, end = offsets
    ref = TensorRef(name, path, dtype, tuple(shape), base + start)
    if end - start != ref.nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} has inconsistent shape and data offsets "
                              f"(shape {list(shape)} of {dtype} is {ref.nbytes} bytes, offsets span {end - start})")
    return ref, start, end


class Checkpoint:
    """An HF model directory. `tensors` maps names to TensorRefs; `read()` gives float32."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.exists():
            raise CheckpointError(f"{self.dir}: no such directory")
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory (expected a Hugging Face model directory)")
        self.config = read_hf_config(self.dir)
        self.args = ModelArgs.from_hf_config(self.config, str(self.dir / "config.json"))
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            for name, ref in read_safetensors_header(shard).items():
                if name in self.tensors:
                    raise CheckpointError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = ref

    def _shards(self) -> list[Path]:
        index = self.dir / INDEX
        if os.path.lexists(index):
            data = load_json(index, INDEX_BYTES, "safetensors index", CheckpointError)
            f = Fields(data, index, error=CheckpointError)
            weight_map = f.section("weight_map", required=True)
            files = set()
            for tensor, name in weight_map.values.items():
                if not isinstance(name, str) or not name or Path(name).name != name:
                    raise weight_map.fail(tensor, "a file name in the model directory", name)
                files.add(name)
            shards = []
            for name in sorted(files):
                p = self.dir / name
                if not p.is_file():
                    raise CheckpointError(f"{index}: shard {name!r} is missing")
                shards.append(p)
            if not shards:
                raise CheckpointError(f"{index}: 'weight_map' names no shards")
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
