"""The forward pass against transformers (the reference), through GGUFs our quantize wrote."""

import numpy as np
import pytest
import torch
import transformers

from qwen3cli.io.loader import load
from qwen3cli.model.config import ModelArgs, RopeScaling
from qwen3cli.model.forward import ContextFull, Model
from qwen3cli.model.rope import make_rope, scaling_for_context

PROMPT = [9707, 1879, 11, 151644, 872, 198, 3838, 374]  # prefill
STEPS = [int(t) for t in np.random.default_rng(1).integers(0, 151936, 32)]  # decoded one at a time

CASES = {
    "dense-gqa2": dict(dtype="f32"),
    "untied-gqa4-headdim": dict(dtype="f32", tied=False, hidden=64, heads=8, kv_heads=2, head_dim=16),
    "yarn": dict(dtype="f32", yarn=True),
    "moe-norm": dict(dtype="f32", moe=True, experts=8, experts_used=2),
    "moe-nonorm": dict(dtype="f32", moe=True, experts=8, experts_used=3, norm_topk=False),
}


def reference_logits(hf_dir) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([PROMPT + STEPS])).logits[0].numpy()


def our_logits(model: Model) -> np.ndarray:
    cache = model.new_cache()
    first = model.forward(PROMPT, cache, all_logits=True)
    return np.concatenate([first, np.stack([model.forward([t], cache) for t in STEPS])])


@pytest.mark.parametrize("case", CASES)
def test_f32_logits_match_transformers(gguf_model, case):
    path, hf_dir = gguf_model("f32", **CASES[case])
    ref = reference_logits(hf_dir)
    m = load(path)
    assert m.args.tie_word_embeddings == CASES[case].get("tied", True)
    got = our_logits(Model(m.weights, ctx=64, exact=True, cache_type="f32"))  # f16's rounding alone is ~4e-4 of the range
    err = np.abs(got - ref).max() / (ref.max() - ref.min())
    assert err <= 1e-4, f"max abs diff {err:.2e} of the logit range"


def reference_with(hf_dir, w) -> np.ndarray:
    """transformers' logits with our (dequantized) weights put in: isolates the engine from quantization."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sd = hf.state_dict()

    def put(name, x):
        assert sd[name].shape == x.shape, name
        sd[name].copy_(torch.from_numpy(np.array(x, np.float32)))

    put("model.embed_tokens.weight", w.token_embd.dequant())
    if "lm_head.weight" in sd:
        put("lm_head.weight", w.output.dequant())
    put("model.norm.weight", w.output_norm)
    for i, ly in enumerate(w.layers):
        p = f"model.layers.{i}."
        for hf_name, t in (("self_attn.q_proj", ly.q), ("self_attn.k_proj", ly.k), ("self_attn.v_proj", ly.v),
                           ("self_attn.o_proj", ly.o), ("mlp.gate_proj", ly.gate), ("mlp.up_proj", ly.up),
                           ("mlp.down_proj", ly.down), ("mlp.gate", ly.router)):
            if t is not None:
                put(p + hf_name + ".weight", t.dequant())
        for hf_name, x in (("input_layernorm", ly.attn_norm), ("post_attention_layernorm", ly.ffn_norm),
                           ("self_attn.q_norm", ly.q_norm), ("self_attn.k_norm", ly.k_norm)):
            put(p + hf_name + ".weight", x)
        if ly.router is not None:
            E = ly.gate_exps.n_mats
            put(p + "mlp.experts.gate_up_proj", np.stack([np.concatenate(
                [ly.gate_exps.expert(e).dequant(), ly.up_exps.expert(e).dequant()]) for e in range(E)]))
            put(p + "mlp.experts.down_proj", np.stack([ly.down_exps.expert(e).dequant() for e in range(E)]))
    with torch.no_grad():
        return hf(torch.tensor([PROMPT + STEPS])).logits[0].numpy()


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
@pytest.mark.parametrize("case", ["untied-gqa4-headdim", "moe-norm"])
def test_quantized_logits_match_transformers_on_the_same_weights(gguf_model, case, type_name):
    path, hf_dir = gguf_model(type_name, **CASES[case])
    w = load(path).weights
    ref = reference_with(hf_dir, w)
    got = our_logits(Model(w, ctx=64, exact=True, cache_type="f32"))  # a float32 reference: the f32 cache
    assert np.abs(got - ref).max() / (ref.max() - ref.min()) <= 1e-4
    # the default int8 activations move the logits, but by what 8-bit rounding of x can do
    # (measured 1.3-1.5% of the range; MoE layers can also route a token differently, so there
    # only the exact path is bounded)
    fast = our_logits(Model(w, ctx=64))
    err = np.abs(fast - ref).max() / (ref.max() - ref.min())
    assert err > 0 and (case.startswith("moe") or err <= 0.05), f"int8 path: max abs diff {err:.2e} of the range"


# Random weights at std 0.2 amplify any perturbation layer by layer, and 151,936 random logits
# have near-ties; a small std and output rows of varied norms give logits with clear winners, as
# a trained model has, so argmax agreement measures the quantization and not the coin flips.
WELL_CONDITIONED = dict(dtype="f32", std=0.05, peaked=True)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("moe", [False, True])
def test_q8_0_argmax_agrees_with_f32_transformers(gguf_model, moe, exact):
    kw = dict(WELL_CONDITIONED, moe=moe, experts=8) if moe else WELL_CONDITIONED
    path, hf_dir = gguf_model("q8_0", **kw)
    ref = reference_logits(hf_dir)
    got = our_logits(Model(load(path).weights, ctx=64, exact=exact))
    # 8-bit activations (llama.cpp's numerics) may flip a near-tie: one position in 40 measured
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (0.99 if exact else 0.95)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("type_name", ["f32", "q8_0", "q4_0"])
def test_prefill_equals_step_decode(gguf_model, type_name, exact):
    path, _ = gguf_model(type_name, **CASES["untied-gqa4-headdim"])
    model = Model(load(path).weights, ctx=64, exact=exact)
    ids = PROMPT + STEPS[:8]
    batch = model.forward(ids, model.new_cache(), all_logits=True)
    cache = model.new_cache()
    steps = np.stack([model.forward([t], cache) for t in ids])
    assert np.abs(batch - steps).max() <= 1e-4 * (batch.max() - batch.min())


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("type_name", "case"), [("f32", "untied-gqa4-headdim"), ("q8_0", "untied-gqa4-headdim"),
                                               ("q4_0", "moe-norm")])
def test_chunked_prefill_equals_one_pass(gguf_model, type_name, case, exact):
    """A long prompt in chunks through the stack (16, 16, then 8: the last on the few-row
    kernels) gives the one pass's logits and cache, after a prefix already in the cache too."""
    path, _ = gguf_model(type_name, **CASES[case])
    model = Model(load(path).weights, ctx=64, exact=exact)
    ids = PROMPT + STEPS[:32]
    assert model.chunk is not None  # the CPU chunks long prefills by default

    def run(chunk):
        model.chunk = chunk
        cache = model.new_cache()
        model.forward(STEPS[-3:], cache)
        return model.forward(ids, cache, all_logits=True), model.forward(ids[:20], model.new_cache()), cache

    (one, one_last, c1), (got, got_last, c2) = run(None), run(16)
    tol = 1e-4 * (one.max() - one.min())
    assert np.abs(got - one).max() <= tol
    assert np.abs(got_last - one_last).max() <= tol
    assert c1.n == c2.n == 43
    for a, b in ((c1.k, c2.k), (c1.v, c2.v)):
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-3 * np.abs(a.astype(np.float32)).max()


def test_hf_directory_runs_directly(gguf_model):
    path, hf_dir = gguf_model("f32", **CASES["moe-norm"])
    from_dir = Model(load(hf_dir, quant="f32").weights, ctx=32)
    from_file = Model(load(path).weights, ctx=32)
    a = from_dir.forward(PROMPT, from_dir.new_cache())
    b = from_file.forward(PROMPT, from_file.new_cache())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_moe_sparse_routing_equals_dense_reference(gguf_model):
    path, _ = gguf_model("q8_0", **CASES["moe-nonorm"])
    model = Model(load(path).weights, ctx=64)
    h = np.random.default_rng(0).standard_normal((16, model.args.hidden_size)).astype(np.float32)
    for ly in model.w.layers:
        top, _ = model.route(ly, h)
        assert len(np.unique(top)) > model.args.n_experts_used  # tokens really pick different experts
        np.testing.assert_allclose(model.moe(ly, h), model.ops.moe_dense(ly, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_moe_grouped_prefill_equals_per_expert_products(gguf_model, monkeypatch, quant):
    """The int8 path's prefill runs all experts of a stack in one grouped launch
    (int8_moe_gemm_cpu); one GEMM per expert (decode kernel for single tokens) is the check."""
    import qwen3cli.model.ops_cpu as ops

    path, _ = gguf_model(quant, **CASES["moe-nonorm"])
    model = Model(load(path).weights, ctx=64)
    h = np.random.default_rng(1).standard_normal((16, model.args.hidden_size)).astype(np.float32)
    for ly in model.w.layers:
        assert ops._grouped(ly.gate_up) and ops._grouped(ly.down_exps)  # the int8 stacks take it
        got = model.moe(ly, h)
        with monkeypatch.context() as m:
            m.setattr(ops, "_grouped", lambda w: False)
            ref = model.moe(ly, h)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_context_limit_is_an_error(gguf_model):
    path, _ = gguf_model("q8_0", **CASES["dense-gqa2"])
    model = Model(load(path).weights, ctx=8)
    cache = model.new_cache()
    model.forward(PROMPT[:6], cache)
    with pytest.raises(ContextFull):
        model.forward(PROMPT[:3], cache)
    assert cache.n == 6


def _args(**kw) -> ModelArgs:
    base = dict(arch="qwen3", vocab_size=10, hidden_size=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=128,
                intermediate_size=8, rms_norm_eps=1e-6, rope_theta=1e6, context_length=32768,
                tie_word_embeddings=True)
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_yarn_tables_match_transformers_at_long_positions(factor):
    cfg = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=128, max_position_embeddings=int(32768 * factor),
                                   rope_parameters={"rope_type": "yarn", "factor": factor, "rope_theta": 1e6,
                                                    "original_max_position_embeddings": 32768})
    emb = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(cfg)
    # transformers multiplies positions by frequencies in float32 (0.004 rad off at 60k); compare
    # the YaRN part itself: the blended frequencies and the attention factor.
    for scaling in (RopeScaling("yarn", factor, 32768), scaling_for_context(_args(), int(32768 * factor))):
        rope = make_rope(_args(), scaling)
        np.testing.assert_allclose(rope.inv_freq, emb.inv_freq.numpy(), rtol=1e-6)
        assert rope.attn_factor == pytest.approx(emb.attention_scaling, rel=1e-7)
    pos = torch.tensor([[0, 1, 1000, 5000]])
    cos, sin = emb(torch.zeros(1, 1, 128), pos)
    c, s = rope.cos_sin(pos[0].numpy())
    np.testing.assert_allclose(np.concatenate([c, c], -1), cos[0].numpy(), atol=5e-4)
    np.testing.assert_allclose(np.concatenate([s, s], -1), sin[0].numpy(), atol=5e-4)
    assert scaling_for_context(_args(), 32768) is None


def _rope_in_float64(self, x, position_ids):
    """transformers' Qwen3RotaryEmbedding.forward with the angles position * inv_freq in float64
    (the attention scaling is its own)."""
    freqs = position_ids[..., None].double() * self.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


# A query 33K or 100K positions past a key is what YaRN is for. A real prefill that long costs
# minutes (one thread, 2 layers of 64: 33K tokens 9 s here and 4 s in transformers, 101K 211 s and
# 90 s), so both sides leave the positions between out: the prompt at 0..7, then the rest from
# `start` on (our skip_positions, transformers' position_ids), through the same tables and
# kernels (a prefill chunk, then decode steps). transformers computes its angles in float32: its
# inv_freq (1e-7 off ours, which test_yarn_tables checks) times 1e5 positions, rounded to float32
# (0.008 rad at 1e5 rad), moves its logits by 1.6e-4 of the range here at 33K and 4.7e-4 at 100K
# (ours: 6e-7 at both from the reference). So the reference is transformers with its table in
# float64 (ours) and float64 angles; stock transformers is held to twice what was measured.
@pytest.mark.parametrize("start", [32_768 + 1_000, 100_000 + 7])
def test_yarn_logits_match_transformers_past_32k_and_100k(gguf_model, monkeypatch, start):
    path, hf_dir = gguf_model("f32", **CASES["yarn"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 4.0
    ids = torch.tensor([PROMPT + STEPS])
    # the mask given: transformers would take a jump in position_ids for a new (packed) sequence
    kw = dict(position_ids=torch.cat([torch.arange(len(PROMPT)), torch.arange(start, start + len(STEPS))])[None],
              attention_mask=torch.ones_like(ids))
    w = load(path).weights
    table = Model(w, ctx=64, exact=True).rope.inv_freq
    emb = hf.model.rotary_emb
    np.testing.assert_allclose(emb.inv_freq.numpy(), table, rtol=2e-7)  # the same table, rounded to float32
    with torch.no_grad():
        stock = hf(ids, **kw).logits[0].numpy()
        monkeypatch.setattr(transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding, "forward",
                            _rope_in_float64)
        emb.inv_freq = torch.from_numpy(table)
        ref = hf(ids, **kw).logits[0].numpy()
    span = ref.max() - ref.min()
    for exact in (True, False):  # the BLAS prefill and the prefill kernels; one decode kernel
        model = Model(w, ctx=64, exact=exact, cache_type="f32")
        assert model.rope.attn_factor > 1  # the file's YaRN, not plain RoPE
        cache = model.new_cache()
        got = [model.forward(PROMPT, cache, all_logits=True)]
        model.skip_positions(cache, start - len(PROMPT))
        got.append(model.forward(STEPS[:16], cache, all_logits=True))
        got.append(np.stack([model.forward([t], cache) for t in STEPS[16:]]))
        got = np.concatenate(got)
        assert cache.n == len(PROMPT + STEPS)  # the cache holds only the tokens run
        err = np.abs(got - ref).max() / span
        assert err <= 1e-4, f"exact={exact}: max abs diff {err:.2e} of the logit range past {start}"
        assert np.abs(got - stock).max() / span <= 1e-8 * start
        # the distance reaches the logits: without the gap they are another model's
        assert np.abs(our_logits(model)[len(PROMPT):] - ref[len(PROMPT):]).max() / span > 100 * max(err, 1e-6)


def test_skip_positions_is_checked(gguf_model):
    path, _ = gguf_model("f32", **CASES["yarn"])
    model = Model(load(path).weights, ctx=16, exact=True, cache_type="f32")
    cache = model.new_cache()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="positions to skip"):
            model.skip_positions(cache, bad)
    model.skip_positions(cache, 5)
    model.skip_positions(cache, 2)
    assert cache.rope_offset == 7 and model.new_cache().rope_offset == 0
