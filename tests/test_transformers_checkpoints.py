"""Checkpoints written by transformers' own save_pretrained (BF16, sharded) convert, and the
F32 file holds exactly the model's state_dict: proof that our name table is the real one."""

import shutil

import numpy as np
import pytest

from checkpoints import TOKENIZER, VOCAB
from quant.gguf_file import GGUFFile
from qwen3cli.io import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _model(moe: bool, tied: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=4096,
                  tie_word_embeddings=tied)
    if moe:
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=64, norm_topk_prob=True)
        return transformers.Qwen3MoeForCausalLM(cfg)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))


@pytest.mark.parametrize("moe,tied", [(False, True), (False, False), (True, False)])
def test_save_pretrained_checkpoint_converts_exactly(tmp_path, moe, tied):
    model = _model(moe, tied).to(torch.bfloat16)
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="5MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, src / f)
    assert (src / "model.safetensors.index.json").exists()  # really sharded
    out = tmp_path / "m.gguf"
    convert.quantize(src, out, "f32")

    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    with GGUFFile(out) as g:
        emb = g.raw("token_embd.weight").view(np.float32).reshape(VOCAB, 64)
        np.testing.assert_array_equal(emb, sd["model.embed_tokens.weight"])
        assert ("output.weight" in g.tensors) == (not tied)
        q = g.raw("blk.1.attn_q.weight").view(np.float32).reshape(128, 64)
        np.testing.assert_array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
        kn = g.raw("blk.0.attn_k_norm.weight").view(np.float32).reshape(-1)
        np.testing.assert_array_equal(kn, sd["model.layers.0.self_attn.k_norm.weight"])
        if moe:
            # in memory transformers 5 keeps experts fused: gate_up (E, 2F, H), down (E, H, F)
            gu = sd.get("model.layers.1.mlp.experts.gate_up_proj")
            if gu is None:
                gate = np.stack([sd[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(4)])
                down = np.stack([sd[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(4)])
            else:
                gate, down = gu[:, :64], sd["model.layers.1.mlp.experts.down_proj"]
            np.testing.assert_array_equal(g.raw("blk.1.ffn_gate_exps.weight").view(np.float32).reshape(4, 64, 64), gate)
            np.testing.assert_array_equal(g.raw("blk.1.ffn_down_exps.weight").view(np.float32).reshape(4, 64, 64), down)
            r = g.raw("blk.0.ffn_gate_inp.weight").view(np.float32).reshape(4, 64)
            np.testing.assert_array_equal(r, sd["model.layers.0.mlp.gate.weight"])
        else:
            d = g.raw("blk.0.ffn_down.weight").view(np.float32).reshape(64, 128)
            np.testing.assert_array_equal(d, sd["model.layers.0.mlp.down_proj.weight"])
