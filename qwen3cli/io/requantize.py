"""Quantizing from a GGUF file, as llama-quantize does: a BF16 / F16 / F32 GGUF (what
convert_hf_to_gguf.py writes, and what hub repos ship beside their quantized files) becomes a
`convert.Plan` like a checkpoint's, so `write` and everything after it are shared.

The model's metadata (tokenizer, template, hyperparameters, model card) is carried over key by
key with its stored types; only the keys that describe the old file's quantization are
replaced. Re-quantizing already-quantized weights compounds two rounding errors, so it is
refused unless asked for (llama-quantize's --allow-requantize).
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from quant.formats import FORMATS, get_format
from quant.gguf_split import open_gguf
from quant.imatrix import Imatrix
from quant.policy import tensor_type

from ..model.config import args_from_gguf
from .convert import _FLOATS, OutTensor, Plan, _imatrix_metadata, count_params, file_type_and_imatrix
from ..errors import CheckpointError

# Keys that describe the source file, not the model: written anew (or not at all).
_REPLACED = ("general.file_type", "general.quantization_version", "split.", "quantize.imatrix.")
ROWS_PER_PART = 4096  # rows decoded to float32 at a time: bounded memory for a 151,936-row embedding


class RequantizeError(CheckpointError):
    """A GGUF file that cannot be quantized as asked."""


def _row_parts(g, name: str, shape: tuple[int, ...], ttype: T) -> list:
    """float32 row blocks of tensor `name`: one per expert for a 3-D stack (the imatrix and
    the writer take an expert at a time), else slices of ROWS_PER_PART rows."""
    fmt, k = FORMATS[ttype], shape[0]
    raw = g.raw(name)
    if len(shape) == 3:
        per = shape[1]
        return [lambda e=e: fmt.decode(raw[e * per:(e + 1) * per], k) for e in range(shape[2])]
    return [lambda lo=lo: fmt.decode(raw[lo:lo + ROWS_PER_PART], k) for lo in range(0, raw.shape[0], ROWS_PER_PART)]


def plan_gguf(src: str | Path, type_name: str = "q8_0", imatrix: str | Path | Imatrix | None = None,
              allow_requantize: bool = False) -> Plan:
    """The plan that quantizes the GGUF file at `src` (any part of a split file) to `type_name`."""
    file_type, imatrix, has_imatrix = file_type_and_imatrix(type_name, imatrix)
    g = open_gguf(src)
    a = args_from_gguf(g.metadata, str(g.path))
    quantized = sorted({t.type_name for t in g.tensors.values() if T(t.type) not in _FLOATS})
    if quantized and not allow_requantize:
        raise RequantizeError(f"{g.path}: already quantized ({', '.join(quantized)}); quantizing it again adds a "
                              "second rounding error: start from the BF16/F16/F32 file or the checkpoint, or "
                              "pass --allow-requantize")
    tied = "output.weight" not in g.tensors
    tensors: list[OutTensor] = []
    for name, t in g.tensors.items():
        ttype = tensor_type(name, t.shape, file_type, tied, a.n_layers, a.n_experts, has_imatrix)
        fmt = get_format(ttype, name)
        if fmt.encode is None:
            raise RequantizeError(f"{g.path}: {name} would be {fmt.name} in a {type_name} file, which qwen3cli "
                                  "cannot write yet")
        if FORMATS[T(t.type)].decode is None:
            raise RequantizeError(f"{g.path}: {name} is {t.type_name}, which qwen3cli cannot read back to floats")
        importance = None
        if has_imatrix and ttype not in _FLOATS:
            importance = imatrix.for_tensor(name, t.shape[0], t.shape[2] if len(t.shape) == 3 else 1)
        tensors.append(OutTensor(name, t.shape, ttype, _row_parts(g, name, t.shape, T(t.type)), fmt.nbytes(t.shape),
                                 importance))
    metadata = {k: gguf.GGUFValue(v, *g.value_types[k]) for k, v in g.metadata.items()
                if not k.startswith(_REPLACED)}
    metadata["general.file_type"] = gguf.GGUFValue(int(file_type.ftype), gguf.GGUFValueType.UINT32)
    metadata["general.quantization_version"] = gguf.GGUFValue(gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    if has_imatrix:
        metadata.update(_imatrix_metadata(imatrix))
    n_params = count_params(tensors)
    return Plan(g.path, a, file_type, tensors, metadata, g.size, n_params[0], imatrix)


def is_gguf(src: str | Path) -> bool:
    """A file (not a checkpoint directory) that starts as a GGUF file does."""
    p = Path(src)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False
