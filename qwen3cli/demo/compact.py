"""The demo model as shipped (a few MB in the package) and as run (a normal checkpoint directory).

The shipped file, data/demo/demo.safetensors, holds the ids of the tokens the training corpus
uses, their embedding rows and the layers, all as bf16 bits (uint16 arrays: numpy has no
bfloat16). The other 151,000-odd embedding rows are zero, so they cost nothing to ship.
`checkpoint()` expands it once into the user's cache as a Hugging Face directory (config.json,
model.safetensors in BF16 with the full vocabulary, the real tokenizer files), which every
command, `quantize` and transformers read as they read any Qwen3 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import ConfigError

VOCAB = 151936
EMBED = "model.embed_tokens.weight"
IDS = "used_ids"


def data_dir() -> Path:
    return Path(str(resources.files("qwen3cli").joinpath("data")))


def tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json), shipped in the package."""
    return data_dir() / "qwen3-tokenizer"


def shipped() -> Path:
    return data_dir() / "demo" / "demo.safetensors"


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (to nearest, ties to even), as uint16 bit patterns."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save(out: Path, ids: np.ndarray, state: dict[str, np.ndarray], config: dict, info: dict) -> None:
    """Write the compact form: `state` is the trained model's float32 tensors by their HF names,
    with the embedding over `ids` only."""
    from safetensors.numpy import save_file

    tensors = {IDS: np.asarray(ids, np.int32)}
    tensors.update({k: bf16_bits(v) for k, v in state.items()})
    save_file(tensors, str(out / "demo.safetensors"), metadata={"dtype": "bf16"})
    (out / "demo.json").write_text(json.dumps({"config": config, "training": info}, indent=1) + "\n")


def write_bf16_safetensors(path: Path, bits: dict[str, np.ndarray]) -> None:
    """A safetensors file of BF16 tensors given as uint16 bit patterns. By hand: safetensors'
    numpy API writes numpy dtypes only (no bfloat16), and its low-level serialize_file changed
    its argument type between releases; the format itself is a length, a JSON header, the bytes."""
    header, off = {}, 0
    for name in sorted(bits):
        n = bits[name].nbytes
        header[name] = {"dtype": "BF16", "shape": list(bits[name].shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(bits):
            f.write(np.ascontiguousarray(bits[name], "<u2").tobytes())


def _config(src: Path) -> dict:
    return json.loads((src.parent / "demo.json").read_text())["config"]


def expand(dst: Path, src: Path | None = None) -> None:
    """Write the checkpoint directory `dst` (which must not exist) from the compact file."""
    from safetensors.numpy import load_file

    src = shipped() if src is None else src
    t = load_file(str(src))
    ids = t.pop(IDS)
    embed = np.zeros((VOCAB, t[EMBED].shape[1]), np.uint16)  # bf16 zero is all-zero bits
    embed[ids] = t[EMBED]
    t[EMBED] = embed
    cfg = _config(src)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
              "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "attention_dropout": 0.0,
              "use_cache": True, "use_sliding_window": False, "sliding_window": None, "rope_scaling": None,
              "max_window_layers": cfg["num_hidden_layers"], "initializer_range": 0.02, **cfg}
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=dst.parent))
    try:
        write_bf16_safetensors(tmp / "model.safetensors", t)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6,
             "top_k": 20, "top_p": 0.95}, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir() / name, tmp / name)
        os.replace(tmp, dst)  # another process may have won the race: then its copy stands
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint(cache: Path) -> Path:
    """The demo model's checkpoint directory under `cache`, expanded on first use. Keyed by the
    shipped file's hash, so an upgraded package never runs stale weights."""
    src = shipped()
    if not src.is_file():
        raise ConfigError(f"{src}: the demo model is missing from this installation")
    key = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dst = cache / "demo" / f"qwen3cli-demo-{key}"
    if not (dst / "model.safetensors").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            expand(dst, src)
        except OSError as e:
            raise ConfigError(f"{dst}: cannot write the demo model: {e.strerror or e}") from None
    return dst
