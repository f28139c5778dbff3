"""The tensor type policy against llama.cpp's rules (convert_hf_to_gguf.py + llama-quantize)."""

import pytest
from gguf import GGMLQuantizationType as T

from quant.policy import FILE_TYPES, tensor_type


def tt(name, shape, ft, tied=False):
    return tensor_type(name, shape, FILE_TYPES[ft], tied)


@pytest.mark.parametrize("ft", list(FILE_TYPES))
def test_norms_router_and_1d_tensors_stay_f32(ft):
    assert tt("blk.0.attn_norm.weight", (1024,), ft) == T.F32
    assert tt("blk.3.attn_q_norm.weight", (128,), ft) == T.F32
    assert tt("output_norm.weight", (1024,), ft) == T.F32
    assert tt("blk.0.ffn_gate_inp.weight", (2048, 128), ft) == T.F32


@pytest.mark.parametrize("ft,want", [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_weight_matrices_get_the_file_type(ft, want):
    for name, shape in [("blk.0.attn_q.weight", (1024, 2048)), ("blk.5.ffn_down.weight", (3072, 1024)),
                        ("blk.1.ffn_up_exps.weight", (2048, 768, 128)), ("token_embd.weight", (1024, 151936))]:
        assert tt(name, shape, ft, tied=False) == want


def test_output_matrix_is_q6_k_except_under_q8_0():
    # tied 0.6B under Q4_0: token_embd doubles as the output and gets Q6_K (llama.cpp's choice)
    assert tt("token_embd.weight", (1024, 151936), "q4_0", tied=True) == T.Q6_K
    assert tt("token_embd.weight", (1024, 151936), "q8_0", tied=True) == T.Q8_0
    # untied: the output matrix gets Q6_K, the embedding stays Q4_0
    assert tt("output.weight", (4096, 151936), "q4_0") == T.Q6_K
    assert tt("token_embd.weight", (4096, 151936), "q4_0") == T.Q4_0
    assert tt("output.weight", (4096, 151936), "q8_0") == T.Q8_0
    assert tt("output.weight", (4096, 151936), "bf16") == T.BF16


def test_row_lengths_a_block_does_not_divide_fall_back():
    # Q6_K needs rows of 256: 64 falls back to Q8_0
    assert tt("token_embd.weight", (64, 151936), "q4_0", tied=True) == T.Q8_0
    # a row Q4_0's 32 does not divide: the output goes Q8_0, which does not fit either -> F16
    assert tt("output.weight", (48, 1000), "q4_0") == T.F16
    assert tt("blk.0.attn_q.weight", (48, 64), "q8_0") == T.F16


def test_q4_k_m_mix_matches_llama_quantize():
    # Qwen3-8B-like: 36 layers. attn_v and ffn_down get Q6_K where use_more_bits says (first and last
    # eighth, every third between), the rest Q4_K; the output Q6_K; norms F32.
    from quant.policy import use_more_bits

    n = 36
    more = [i for i in range(n) if use_more_bits(i, n)]
    assert more[:6] == [0, 1, 2, 3, 6, 9] and more[-5:] == [31, 32, 33, 34, 35]
    for i in range(n):
        want = T.Q6_K if i in more else T.Q4_K
        assert tensor_type(f"blk.{i}.attn_v.weight", (4096, 1024), FILE_TYPES["q4_k_m"], False, n) == want
        assert tensor_type(f"blk.{i}.ffn_down.weight", (12288, 4096), FILE_TYPES["q4_k_m"], False, n) == want
        assert tensor_type(f"blk.{i}.attn_q.weight", (4096, 4096), FILE_TYPES["q4_k_m"], False, n) == T.Q4_K
        assert tensor_type(f"blk.{i}.ffn_down_exps.weight", (768, 2048, 128), FILE_TYPES["q4_k_m"], False, n,
                           128) == want
    assert tt("output.weight", (4096, 151936), "q4_k_m") == T.Q6_K
    assert tt("token_embd.weight", (4096, 151936), "q4_k_m") == T.Q4_K
    assert tt("token_embd.weight", (1024, 151936), "q4_k_m", tied=True) == T.Q6_K
    # 8-expert models get llama.cpp's special cases
    ft = FILE_TYPES["q4_k_m"]
    assert tensor_type("blk.3.attn_k.weight", (2048, 512), ft, False, 16, 8) == T.Q8_0
    assert tensor_type("blk.3.attn_output.weight", (2048, 2048), ft, False, 16, 8) == T.Q5_K


def test_other_k_mixes():
    n = 24  # use_more_bits: 0-2, 5, 8, 11, 14, 17, 20, 21-23
    ft = {k: FILE_TYPES[k] for k in ("q4_k_s", "q5_k_m", "q6_k")}
    assert tensor_type("blk.3.attn_v.weight", (2048, 512), ft["q4_k_s"], False, n) == T.Q5_K
    assert tensor_type("blk.4.attn_v.weight", (2048, 512), ft["q4_k_s"], False, n) == T.Q4_K
    assert tensor_type("blk.2.ffn_down.weight", (6144, 2048), ft["q4_k_s"], False, n) == T.Q5_K
    assert tensor_type("blk.3.ffn_down.weight", (6144, 2048), ft["q4_k_s"], False, n) == T.Q4_K
    assert tensor_type("blk.5.attn_v.weight", (2048, 512), ft["q5_k_m"], False, n) == T.Q6_K
    assert tensor_type("blk.6.attn_v.weight", (2048, 512), ft["q5_k_m"], False, n) == T.Q5_K
    assert tensor_type("blk.6.attn_q.weight", (2048, 2048), ft["q6_k"], False, n) == T.Q6_K
