"""HF Qwen3 / Qwen3-MoE checkpoint -> GGUF file, one tensor (or expert, or row chunk) at a time.

`plan(src, type)` opens and validates everything first: config, tokenizer, every tensor's
name and shape. Only then does `write(plan, out)` touch the disk, streaming into a temp file
beside `out` that is renamed at the end, or removed on any error or Ctrl-C.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from quant.formats import get_format
from quant.gguf_file import GGUFStreamWriter
from quant.gguf_split import part_name, plan_parts, split_kv
from quant.imatrix import Imatrix, load_imatrix
from quant.policy import FILE_TYPES, FileType, tensor_type

from ..errors import CheckpointError, OutputError
from ..model.config import ModelArgs
from ..sampler import read_generation_config
from ..text.vocab import gguf_vocab
from .checkpoint import Checkpoint
from .files import atomic_output, check_output
from .model_card import card_metadata

CHUNK_BYTES = 64 << 20  # float32 bytes converted at once: bounds peak memory on any model
_FLOATS = (T.F32, T.F16, T.BF16)

# HF name (per layer, after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}


def expected_hf_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor the checkpoint must hold, with its (torch-order) shape."""
    H, q, kv = a.hidden_size, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    out = {"model.embed_tokens.weight": (a.vocab_size, H), "model.norm.weight": (H,)}
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = (a.vocab_size, H)
    layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H),
        "self_attn.v_proj.weight": (kv, H), "self_attn.o_proj.weight": (H, q),
        "self_attn.q_norm.weight": (a.head_dim,), "self_attn.k_norm.weight": (a.head_dim,),
    }
    if a.is_moe:
        layer["mlp.gate.weight"] = (a.n_experts, H)
    else:
        F = a.intermediate_size
        layer.update({"mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F)})
    for i in range(a.n_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return out


Part = Callable[[], np.ndarray]  # -> float32 (rows, row_length)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # GGML order
    type: T
    parts: list[Part]  # concatenated along rows they give the tensor
    nbytes: int = 0
    # (n_expert, row length) column importance from the imatrix, or None: unweighted
    importance: np.ndarray | None = None

    def part_importance(self, i: int) -> np.ndarray | None:
        """The importance for part i: an expert tensor's parts are its experts."""
        if self.importance is None:
            return None
        return self.importance[i] if len(self.shape) == 3 else self.importance[0]


@dataclass
class Plan:
    src: Path
    args: ModelArgs
    file_type: FileType
    tensors: list[OutTensor]
    metadata: dict[str, gguf.GGUFValue]
    input_bytes: int
    n_params: int
    imatrix: Imatrix | None = None
    warnings: list[str] = field(default_factory=list)  # optional files left out, for the CLI to show

    def imatrix_missing(self) -> tuple[list[str], int]:
        """Quantized tensors the imatrix has no data for (llama-quantize quantizes them
        unweighted), and how many quantized tensors there are."""
        quantized = [t for t in self.tensors if t.type not in _FLOATS]
        return [t.name for t in quantized if t.importance is None], len(quantized)


@dataclass
class Summary:
    out: Path
    input_bytes: int
    output_bytes: int
    n_params: int
    bits_per_weight: float
    seconds: float
    type_counts: Counter = field(default_factory=Counter)
    parts: int = 1  # files written (split GGUF parts; `out` is the first)


def _row_parts(ck: Checkpoint, name: str, shape: tuple[int, ...]) -> list[Part]:
    if len(shape) == 1:
        return [lambda: ck.read(name).reshape(1, -1)]
    rows, k = shape
    step = max(1, CHUNK_BYTES // (4 * k))
    return [lambda r=r: ck.read(name, np.s_[r : r + step]) for r in range(0, rows, step)]


def _expert_parts(ck: Checkpoint, a: ModelArgs, i: int, which: str) -> tuple[list[Part], set[str]]:
    """Per-expert (rows, k) parts of layer i's stacked `which` (gate_proj/up_proj/down_proj),
    and the checkpoint tensors they read. Takes the fused layout when the layer has it."""
    base, E, F, H = f"model.layers.{i}.mlp.experts", a.n_experts, a.moe_intermediate_size, a.hidden_size
    fused = {s: f"{base}.{s}" + (".weight" if f"{base}.{s}.weight" in ck.tensors else "") for s in ("gate_up_proj", "down_proj")}
    if fused["gate_up_proj"] in ck.tensors or fused["down_proj"] in ck.tensors:
        _check_shapes(ck, {fused["gate_up_proj"]: (E, 2 * F, H), fused["down_proj"]: (E, H, F)})
        if which == "down_proj":
            return [lambda e=e: ck.read(fused["down_proj"], np.s_[e]) for e in range(E)], {fused["down_proj"]}
        rows = np.s_[:F] if which == "gate_proj" else np.s_[F:]
        return [lambda e=e: ck.read(fused["gate_up_proj"], (e, rows)) for e in range(E)], {fused["gate_up_proj"]}
    names = [f"{base}.{e}.{which}.weight" for e in range(E)]
    _check_shapes(ck, {n: (H, F) if which == "down_proj" else (F, H) for n in names})
    return [lambda n=n: ck.read(n) for n in names], set(names)


def _check_shapes(ck: Checkpoint, want: dict[str, tuple[int, ...]]) -> None:
    for name, shape in want.items():
        ref = ck.tensors.get(name)
        if ref is None:
            raise CheckpointError(f"{ck.dir}: missing tensor {name!r}")
        if ref.shape != shape:
            raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, expected {list(shape)}")


def _is_ignored(name: str, a: ModelArgs) -> bool:
    # Buffers some exporters save, and a tied checkpoint's redundant copy of the embeddings.
    return name.endswith(".rotary_emb.inv_freq") or (a.tie_word_embeddings and name == "lm_head.weight")


def count_params(tensors: list[OutTensor]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, experts), counted as gguf-py counts them for size labels."""
    total = shared = expert = expert_sum = n_exp = 0
    for t in tensors:
        size = math.prod(t.shape)
        if "_exps." in t.name and len(t.shape) >= 3:
            expert += size // t.shape[2]
            expert_sum += t.shape[2]
            n_exp += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_exp if n_exp else 0)


def file_type_and_imatrix(type_name: str, imatrix) -> tuple[FileType, Imatrix | None, bool]:
    """The requested file type and importance matrix (loaded from its file), checked."""
    if type_name not in FILE_TYPES:
        raise OutputError(f"unknown --type {type_name!r}; choose one of {', '.join(FILE_TYPES)}")
    if imatrix is not None and not isinstance(imatrix, Imatrix):
        imatrix = load_imatrix(imatrix)
    return FILE_TYPES[type_name], imatrix, imatrix is not None and bool(imatrix.entries)


def plan(src: str | Path, type_name: str = "q8_0", imatrix: str | Path | Imatrix | None = None) -> Plan:
    """Validate the checkpoint at `src` and decide every output tensor and metadata key;
    `imatrix` (a llama.cpp importance-matrix file) weights the quantization error per column."""
    file_type, imatrix, has_imatrix = file_type_and_imatrix(type_name, imatrix)
    ck = Checkpoint(src)
    a = ck.args
    want = expected_hf_shapes(a)
    _check_shapes(ck, want)

    tensors: list[OutTensor] = []
    used = set(want)

    def add(gguf_name: str, parts: list[Part], shape: tuple[int, ...]) -> None:
        ttype = tensor_type(gguf_name, shape, file_type, a.tie_word_embeddings, a.n_layers, a.n_experts, has_imatrix)
        fmt = get_format(ttype, gguf_name)
        if fmt.encode is None:
            raise CheckpointError(f"{src}: {gguf_name} would be {fmt.name} in a {type_name} file (its rows of "
                                  f"{shape[0]} do not fit the preset's blocks), which qwen3cli cannot write yet")
        nbytes = fmt.nbytes(shape)
        importance = None
        if has_imatrix and ttype not in _FLOATS:  # llama-quantize looks only these up
            importance = imatrix.for_tensor(gguf_name, shape[0], shape[2] if len(shape) == 3 else 1)
        tensors.append(OutTensor(gguf_name, shape, ttype, parts, nbytes, importance))

    def add_hf(hf: str, gguf_name: str) -> None:
        add(gguf_name, _row_parts(ck, hf, want[hf]), tuple(reversed(want[hf])))

    add_hf("model.embed_tokens.weight", "token_embd.weight")
    for i in range(a.n_layers):
        for suffix, gg in LAYER_NAMES.items():
            hf = f"model.layers.{i}.{suffix}"
            if hf in want:
                add_hf(hf, f"blk.{i}.{gg}")
        if a.is_moe:
            for which, gg in EXPERT_NAMES.items():
                rows, k = (a.hidden_size, a.moe_intermediate_size) if which == "down_proj" else (a.moe_intermediate_size, a.hidden_size)
                parts, names = _expert_parts(ck, a, i, which)
                add(f"blk.{i}.{gg}", parts, (k, rows, a.n_experts))
                used |= names
    add_hf("model.norm.weight", "output_norm.weight")
    if not a.tie_word_embeddings:
        add_hf("lm_head.weight", "output.weight")

    extra = sorted(n for n in ck.tensors if n not in used and not _is_ignored(n, a))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{ck.tensors[extra[0]].file}: unexpected tensor {extra[0]!r}{more}")
    n_params = count_params(tensors)
    metadata, warnings = _metadata(ck, a, file_type, n_params)
    if has_imatrix:
        metadata.update(_imatrix_metadata(imatrix))
    return Plan(ck.dir, a, file_type, tensors, metadata, ck.input_bytes, n_params[0], imatrix, warnings)


def _metadata(ck: Checkpoint, a: ModelArgs, ft: FileType, n_params) -> tuple[dict[str, gguf.GGUFValue], list[str]]:
    """The KV pairs llama.cpp's converter + llama-quantize write, through gguf-py's helpers, and
    warnings about optional files (model card, generation_config.json) that were left out."""
    vocab = gguf_vocab(ck.dir, a.vocab_size, ck.config)
    sampling, warnings = read_generation_config(ck.dir)
    meta, card_warnings = card_metadata(ck.dir, ck.config, n_params, sampling)
    warnings += card_warnings
    w = gguf.GGUFWriter(path=None, arch=a.arch)  # used only to collect typed key/values
    w.add_type(gguf.GGUFType.MODEL)
    if meta.name is None:
        meta.name = ck.dir.name
    if meta.size_label is None and n_params[0] > 0:
        meta.size_label = gguf.size_label(*n_params)
    meta.set_gguf_meta_model(w)
    w.add_block_count(a.n_layers)
    w.add_context_length(a.context_length)
    w.add_embedding_length(a.hidden_size)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    if a.rope_scaling is not None:
        rs = a.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN if rs.type == "yarn" else gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
        if rs.original_context is not None:
            w.add_rope_scaling_orig_ctx_len(rs.original_context)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    if a.is_moe:
        w.add_expert_count(a.n_experts)
        w.add_expert_used_count(a.n_experts_used)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_file_type(ft.ftype)
    if a.is_moe:
        w.add_expert_feed_forward_length(a.moe_intermediate_size)
        if not a.norm_topk_prob:  # llama.cpp assumes true for qwen3moe; say so when it is not
            w.add_expert_weights_norm(False)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for typ, tid in vocab.special_ids.items():
        if hasattr(w, f"add_{typ}_token_id"):  # gguf has no key for a cls token
            getattr(w, f"add_{typ}_token_id")(tid)
    add = dict(vocab.add_special)
    if vocab.byte_level_post:
        # Newer gguf-py (as in llama.cpp) reads a ByteLevel post-processor as "adds no BOS/EOS"
        add.setdefault("bos", False)
        add.setdefault("eos", False)
    for typ, value in add.items():
        getattr(w, f"add_add_{typ}_token")(value)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)
    return dict(w.kv_data[0]), warnings


def _imatrix_metadata(m: Imatrix) -> dict[str, gguf.GGUFValue]:
    """The keys llama-quantize --imatrix adds after all others (from its C buffers of 128 bytes)."""
    VT = gguf.GGUFValueType

    def c_str(v: str) -> str:
        return v.encode()[:127].decode(errors="ignore")

    kv = {"quantize.imatrix.file": gguf.GGUFValue(c_str(m.source), VT.STRING)}
    if m.datasets:
        kv["quantize.imatrix.dataset"] = gguf.GGUFValue(c_str(m.datasets[0]), VT.STRING)
    kv["quantize.imatrix.entries_count"] = gguf.GGUFValue(len(m.entries), VT.UINT32)
    if m.chunk_count > 0:
        kv["quantize.imatrix.chunks_count"] = gguf.GGUFValue(m.chunk_count, VT.UINT32)
    return kv


def write(p: Plan, out: str | Path, force: bool = False,
          progress: Callable[[str, int], None] | None = None, split_max_size: int | None = None) -> Summary:
    """Write the planned file to `out`. `progress(tensor_name, n_elements)` after each part.
    split_max_size: bytes of tensor data per file, written as llama-gguf-split's parts
    (OUT-00001-of-0000N.gguf, the metadata in the first); one part keeps the plain name."""
    out = Path(out)
    t0 = time.perf_counter()
    try:
        groups = plan_parts([t.nbytes for t in p.tensors], split_max_size) if split_max_size else [list(range(len(p.tensors)))]
    except ValueError as e:
        raise OutputError(f"{out}: {e}") from None
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    paths = [out] if len(groups) == 1 else [out.with_name(part_name(stem, i + 1, len(groups))) for i in range(len(groups))]
    paths = [check_output(path, force) for path in paths]  # all refused before any is written
    with ExitStack() as files:  # every part is committed only when all are written
        for no, (path, group) in enumerate(zip(paths, groups)):
            w = GGUFStreamWriter(files.enter_context(atomic_output(path, replace=force)))
            for t in (p.tensors[i] for i in group):
                w.add_tensor(t.name, t.shape, t.type, t.nbytes)
            kv = split_kv(no, len(groups), len(p.tensors)) if len(groups) > 1 else {}
            w.write_header({**p.metadata, **kv} if no == 0 else kv)
            for t in (p.tensors[i] for i in group):
                fmt = get_format(t.type, t.name)
                for i, part in enumerate(t.parts):
                    x = part()
                    w.write(fmt.quantize(x, t.part_importance(i)))
                    if progress:
                        progress(t.name, x.size)
            w.finish()
    size = sum(path.stat().st_size for path in paths)
    data = sum(t.nbytes for t in p.tensors)
    return Summary(paths[0], p.input_bytes, size, p.n_params, 8 * data / max(p.n_params, 1),
                   time.perf_counter() - t0, Counter(t.type.name for t in p.tensors), len(paths))


def quantize(src: str | Path, out: str | Path, type_name: str = "q8_0", force: bool = False,
             progress: Callable[[str, int], None] | None = None,
             imatrix: str | Path | Imatrix | None = None, split_max_size: int | None = None,
             allow_requantize: bool = False) -> Summary:
    """Quantize a checkpoint directory or a GGUF file (requantize.py) to `out`."""
    p = plan_source(src, type_name, imatrix, allow_requantize)
    return write(p, out, force=force, progress=progress, split_max_size=split_max_size)


def plan_source(src: str | Path, type_name: str = "q8_0", imatrix: str | Path | Imatrix | None = None,
                allow_requantize: bool = False) -> Plan:
    """`plan` for a checkpoint directory, requantize.plan_gguf for a GGUF file."""
    from .requantize import is_gguf, plan_gguf

    return plan_gguf(src, type_name, imatrix, allow_requantize) if is_gguf(src) else plan(src, type_name, imatrix)
