"""Which GGML type each tensor gets for a requested file type: llama.cpp's rules, in one place.

The float file types follow convert_hf_to_gguf.py; the quantized ones follow what
llama-quantize does to such a file (src/llama-quant.cpp): norms, 1-D tensors and the MoE
router stay F32; the output matrix (or, with tied embeddings, the token embedding that
doubles as it) gets Q6_K under any file type other than Q8_0; a row length a block does not
divide falls back (Q6_K -> Q8_0, then F16).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT


@dataclass(frozen=True)
class FileType:
    name: str  # what the user types: q8_0, q4_0, ...
    ftype: FT  # general.file_type
    default: T  # the type of an ordinary weight matrix


FILE_TYPES = {
    ft.name: ft
    for ft in (
        FileType("f32", FT.ALL_F32, T.F32),
        FileType("f16", FT.MOSTLY_F16, T.F16),
        FileType("bf16", FT.MOSTLY_BF16, T.BF16),
        FileType("q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
        FileType("q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
        FileType("q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
        FileType("q4_k_m", FT.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("q4_k_s", FT.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("q5_k_m", FT.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("q6_k", FT.MOSTLY_Q6_K, T.Q6_K),
    )
}
_MIXES = (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q5_K_M, FT.MOSTLY_Q6_K)

_FLOATS = (T.F32, T.F16, T.BF16)
_FALLBACK = {T.Q6_K: T.Q8_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1}


def _block(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last
    eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _k_mix(name: str, new: T, ft: FT, n_layers: int, n_experts: int) -> T:
    """llama-quantize's per-layer choices in the K-quant mixes (llama_tensor_get_type)."""
    layer = int(name.split(".")[1])
    more = use_more_bits(layer, n_layers)
    M, S = ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M), ft == FT.MOSTLY_Q4_K_S
    if ".attn_v." in name:
        if M and more:
            new = T.Q6_K
        elif S and layer < 4:
            new = T.Q5_K
        return T.Q8_0 if n_experts == 8 else new  # 8-expert models (Qwen3's have 128)
    if ".attn_k." in name and n_experts == 8:
        return T.Q8_0
    if ".attn_output." in name and n_experts == 8 and ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q4_K_S):
        return T.Q5_K
    if ".ffn_down" in name:
        if M and more:
            return T.Q6_K
        if S and layer < n_layers // 8:
            return T.Q5_K
    return new


def tensor_type(name: str, ggml_shape: tuple[int, ...], file_type: FileType, tied_embeddings: bool,
                n_layers: int = 0, n_experts: int = 0, has_imatrix: bool = False) -> T:
    """The GGML type of tensor `name` (GGUF name, GGML-order shape) in a `file_type` file;
    `has_imatrix`: quantized with an importance matrix, which changes one choice (below)."""
    if len(ggml_shape) < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return T.F32
    new = file_type.default
    if new in _FLOATS:
        return new
    ncols = ggml_shape[0]
    is_output = name == "output.weight" or (tied_embeddings and name == "token_embd.weight")
    if is_output:
        if ncols % _block(new):
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif file_type.ftype in _MIXES and name.startswith("blk."):
        new = _k_mix(name, new, file_type.ftype, n_layers, n_experts)
    elif has_imatrix and ".ffn_down" in name and int(name.split(".")[1]) < n_layers // 8:
        # llama.cpp guards the first eighth of ffn_down layers of Q4_0/Q5_0 files, when (and only
        # when) an imatrix is given, with the min-carrying Q4_1/Q5_1
        new = {T.Q4_0: T.Q4_1, T.Q5_0: T.Q5_1}.get(new, new)
    if ncols % _block(new):
        new = _FALLBACK.get(new, new)
        if ncols % _block(new):
            new = T.F16
    return new
