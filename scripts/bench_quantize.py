"""Benchmark `qwen3cli quantize` on a random checkpoint with the exact Qwen3-0.6B shapes.

    python scripts/bench_quantize.py [--workdir /tmp/qwen3bench] [--types q8_0 q4_0]

Prints, per type: wall time and peak RSS of the CLI run (/usr/bin/time -v), the in-process
time of our quantizer and of gguf-py's reference quantizer on the same float32 tensors (the
ratio is gguf-py / ours, > 1 means we are faster), and, when llama-cpp-python is installed,
whether llama.cpp loads the file and its speed generating 8 tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_06B = dict(vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=3072)
QWEN3_17B = dict(vocab=151936, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144)
# Qwen3-30B-A3B: 48 MoE layers of 128 experts (8 used), untied output; a bench takes a few layers
QWEN3_30B_A3B = dict(vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, ffn=6144,
                     experts=128, experts_used=8, moe_ffn=768, tied=False)
SHAPES = {"0.6b": QWEN3_06B, "1.7b": QWEN3_17B, "30b-a3b": QWEN3_30B_A3B}


def shapes(c=QWEN3_06B) -> dict[str, tuple[int, ...]]:
    H, q, kv, F = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["ffn"]
    out = {"model.embed_tokens.weight": (c["vocab"], H), "model.norm.weight": (H,)}
    if not c.get("tied", True):
        out["lm_head.weight"] = (c["vocab"], H)
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_norm.weight": (c["head_dim"],), p + "self_attn.k_norm.weight": (c["head_dim"],),
        })
        if "experts" in c:  # the hub's per-expert names, as Qwen3-30B-A3B's safetensors hold them
            E, M = c["experts"], c["moe_ffn"]
            out[p + "mlp.gate.weight"] = (E, H)
            for e in range(E):
                x = f"{p}mlp.experts.{e}."
                out.update({x + "gate_proj.weight": (M, H), x + "up_proj.weight": (M, H),
                            x + "down_proj.weight": (H, M)})
        else:
            out.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                        p + "mlp.down_proj.weight": (H, F)})
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        return (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32))


def write_checkpoint(d: Path, c=QWEN3_06B) -> None:
    """A BF16 single-file checkpoint, written tensor by tensor (never all in memory)."""
    d.mkdir(parents=True, exist_ok=True)
    sh = shapes(c)
    names = sorted(sh)
    header, off = {}, 0
    for n in names:
        size = int(np.prod(sh[n])) * 2
        header[n] = {"dtype": "BF16", "shape": list(sh[n]), "data_offsets": [off, off + size]}
        off += size
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i, n in enumerate(names):
            u = random_tensor(n, sh[n], i).view(np.uint32)
            f.write(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes())
    cfg = json.loads((ROOT / "tests/data/qwen3-0.6B-configs/config.json").read_text())
    cfg.update(hidden_size=c["hidden"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
               num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], intermediate_size=c["ffn"],
               tie_word_embeddings=c.get("tied", True))
    if "experts" in c:
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=c["experts"],
                   num_experts_per_tok=c["experts_used"], moe_intermediate_size=c["moe_ffn"], norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ROOT / "tests/data/qwen3-0.6B-configs/generation_config.json", d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "qwen3cli/data/qwen3-tokenizer" / f, d)


def run_cli(src: Path, out: Path, type_name: str) -> tuple[float, float]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qwen3cli", "quantize", str(src), "-o", str(out),
           "--type", type_name, "--force"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stderr)
    rss_kb = next(int(ln.split(":")[1]) for ln in r.stderr.splitlines() if "Maximum resident set size" in ln)
    return wall, rss_kb / 1024


def kernels_vs_gguf_py(type_name: str) -> tuple[float, float, int]:
    """Seconds for ours and gguf-py's quantizer over every matrix gguf-py can quantize to it."""
    import gguf

    from quant.formats import FORMATS
    from quant.policy import FILE_TYPES

    qtype = FILE_TYPES[type_name].default
    fmt = FORMATS[qtype]
    fmt.encode(np.zeros((4, 256), np.float32))  # compile / load the numba cache outside the timing
    ours = ref = 0.0
    n = 0
    for i, (name, shape) in enumerate(sorted(shapes().items())):
        if len(shape) < 2:
            continue
        x = random_tensor(name, shape, i)
        t0 = time.perf_counter()
        a = fmt.encode(x)
        t1 = time.perf_counter()
        b = gguf.quants.quantize(x, qtype)
        t2 = time.perf_counter()
        if not np.array_equal(a, np.ascontiguousarray(b).view(np.uint8).reshape(a.shape)):
            sys.exit(f"bytes differ from gguf-py on {name}")
        ours += t1 - t0
        ref += t2 - t1
        n += x.size
    return ours, ref, n


def llama_cpp_check(path: Path) -> str:
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed: skipped"
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    t0 = time.perf_counter()
    r = llm.create_completion("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", max_tokens=8,
                              temperature=0.0, top_k=1)
    dt = time.perf_counter() - t0
    return f"llama.cpp loaded it and generated {r['usage']['completion_tokens']} tokens in {dt:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3bench"))
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"])
    args = ap.parse_args()
    src = args.workdir / "Qwen3-0.6B-random"
    if not (src / "model.safetensors").exists():
        t0 = time.perf_counter()
        write_checkpoint(src)
        print(f"wrote {src} ({(src / 'model.safetensors').stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    for type_name in args.types:
        out = args.workdir / f"qwen3-0.6b-{type_name}.gguf"
        wall, rss = run_cli(src, out, type_name)
        ours, ref, n = kernels_vs_gguf_py(type_name)
        print(f"{type_name}: qwen3cli quantize {wall:.1f} s wall, peak RSS {rss:.0f} MB, "
              f"file {out.stat().st_size / 1e6:.0f} MB")
        print(f"{type_name}: quantizer on {n / 1e6:.0f}M weights: ours {ours:.2f} s, gguf-py {ref:.2f} s, "
              f"gguf-py/ours = {ref / ours:.1f}x (bytes identical)")
        print(f"{type_name}: {llama_cpp_check(out)}")


if __name__ == "__main__":
    main()
