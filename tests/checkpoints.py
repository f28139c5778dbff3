"""Tiny random Qwen3 / Qwen3-MoE checkpoints with the real tensor names, config keys and
tokenizer, written as Hugging Face directories (BF16/F16/F32, one file or shards)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
TOKENIZER = Path(__file__).parent.parent / "qwen3cli" / "data" / "qwen3-tokenizer"
VOCAB = 151936

ST_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a checkpoint of `dtype` actually holds for `x`."""
    if dtype == "bf16":
        return (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float16).astype(np.float32) if dtype == "f16" else x.astype(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        x = tensors[name]
        raw = to_bf16_bits(x) if dtype == "bf16" else x.astype({"f16": np.float16, "f32": np.float32}[dtype])
        b = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(x.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def make_checkpoint(
    root: Path, *, moe: bool = False, tied: bool = True, dtype: str = "bf16", shards: int = 1,
    dialect: str = "hub", fused_experts: bool = False, hidden: int = 64, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, head_dim: int = 32, ffn: int = 128, experts: int = 4,
    experts_used: int = 2, moe_ffn: int = 64, yarn: bool = False, seed: int = 0, norm_topk: bool = True,
    std: float = 0.2, peaked: bool = False,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write a checkpoint directory; returns it and the float32 values it stores."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def w(*shape, std=std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": w(VOCAB, hidden),
        "model.norm.weight": 1 + w(hidden, std=0.05),
    }
    if not tied:
        t["lm_head.weight"] = w(VOCAB, hidden)
    if peaked:  # real models' logits have clear winners; spread the output rows' norms to get some
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        t[head] *= np.exp(rng.standard_normal((VOCAB, 1)) * 0.7).astype(np.float32)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + w(hidden, std=0.05)
        t[p + "post_attention_layernorm.weight"] = 1 + w(hidden, std=0.05)
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "self_attn.q_norm.weight"] = 1 + w(head_dim, std=0.05)
        t[p + "self_attn.k_norm.weight"] = 1 + w(head_dim, std=0.05)
        if moe:
            t[p + "mlp.gate.weight"] = w(experts, hidden)
            gate, up, down = w(experts, moe_ffn, hidden), w(experts, moe_ffn, hidden), w(experts, hidden, moe_ffn)
            if fused_experts:
                t[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
                t[p + "mlp.experts.down_proj"] = down
            else:
                for e in range(experts):
                    t[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
                    t[p + f"mlp.experts.{e}.up_proj.weight"] = up[e]
                    t[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
        else:
            t[p + "mlp.gate_proj.weight"] = w(ffn, hidden)
            t[p + "mlp.up_proj.weight"] = w(ffn, hidden)
            t[p + "mlp.down_proj.weight"] = w(hidden, ffn)

    cfg = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden,
        "intermediate_size": ffn, "max_position_embeddings": 131072 if yarn else 40960,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, "vocab_size": VOCAB,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
    }
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} if yarn else None
    if dialect == "hub":
        cfg.update(rope_theta=1000000, rope_scaling=scaling)
    else:  # transformers 5
        cfg["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default", **(scaling or {})}
    if moe:
        cfg.update({"num_experts" if dialect == "hub" else "num_local_experts": experts,
                    "num_experts_per_tok": experts_used, "moe_intermediate_size": moe_ffn,
                    "norm_topk_prob": norm_topk, "decoder_sparse_step": 1, "mlp_only_layers": []})
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / "generation_config.json").write_text((DATA / "qwen3-0.6B-configs" / "generation_config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, root / f)

    names = sorted(t)
    if shards == 1:
        write_safetensors(root / "model.safetensors", t, dtype)
    else:
        groups = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        for k, g in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(root / fname, {names[j]: t[names[j]] for j in g}, dtype)
            weight_map.update({names[j]: fname for j in g})
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root, {k: stored(v, dtype) for k, v in t.items()}


def write_imatrix_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], **meta) -> Path:
    """An imatrix GGUF as llama-imatrix writes it: per matrix `<name>.in_sum2` (n_expert rows of
    n_per_row sums) and `<name>.counts` (n_expert x 1), general.type "imatrix" and its keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture")  # llama-imatrix writes none
    w.add_string("general.type", meta.get("type", "imatrix"))
    if meta.get("keys", True):
        w.add_array("imatrix.datasets", ["calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 10)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in sorted(entries.items()):
        sums = np.asarray(sums, np.float32)
        sums = sums.reshape(1, -1) if sums.ndim == 1 else sums
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", np.asarray(counts, np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_imatrix_dat(path: Path, entries: dict[str, tuple[np.ndarray, int]], trailer: bool = True) -> Path:
    """A legacy llama-imatrix .dat file: per matrix its name, call count and values (mean
    importance times the call count), then the chunk count and dataset name."""
    out = [struct.pack("<i", len(entries))]
    for name, (values, ncall) in entries.items():
        v = np.asarray(values, np.float32).reshape(-1)
        out += [struct.pack("<i", len(name.encode())), name.encode(), struct.pack("<ii", ncall, v.size), v.tobytes()]
    if trailer:
        out += [struct.pack("<ii", 10, 8), b"data.txt"]
    path.write_bytes(b"".join(out))
    return path


def imatrix_for(plan, path: Path, skip: tuple[str, ...] = (), seed: int = 1) -> Path:
    """A GGUF imatrix with random data for every matrix of `plan` (a convert.Plan) but `skip`:
    heavy-tailed sums, varied counts, and for expert tensors one expert never seen."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in plan.tensors:
        if len(t.shape) < 2 or t.name in skip or "_norm" in t.name or "ffn_gate_inp" in t.name:
            continue
        n_exp = t.shape[2] if len(t.shape) == 3 else 1
        counts = rng.integers(1, 1000, n_exp).astype(np.float32)
        if n_exp > 1:
            counts[1] = 0
        entries[t.name] = (rng.lognormal(0, 2, (n_exp, t.shape[0])) * counts[:, None], counts)
    return write_imatrix_gguf(path, entries)
