"""quantize on tiny checkpoints: keys, names, shapes, types and bytes of the file it writes."""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from checkpoints import TOKENIZER, VOCAB
from quant.formats import FORMATS
from quant.gguf_file import GGUFFile
from qwen3cli.io import convert
from qwen3cli.io.info import read_info

DENSE = dict(moe=False, tied=True)
MOE = dict(moe=True, tied=False)


def quantize(ckpt_dir, tmp_path, type_name, name="out.gguf"):
    out = tmp_path / name
    convert.quantize(ckpt_dir, out, type_name)
    return out


def expected_tensors(values, moe, tied, layers=2):
    """GGUF name -> float32 array in numpy order, built straight from the HF tensors."""
    want = {"token_embd.weight": values["model.embed_tokens.weight"], "output_norm.weight": values["model.norm.weight"]}
    if not tied:
        want["output.weight"] = values["lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        for hf, gg in convert.LAYER_NAMES.items():
            if p + hf in values:
                want[f"blk.{i}.{gg}"] = values[p + hf]
        if moe:
            if p + "mlp.experts.gate_up_proj" in values:
                gu = values[p + "mlp.experts.gate_up_proj"]
                f = gu.shape[1] // 2
                stacks = {"gate_proj": gu[:, :f], "up_proj": gu[:, f:], "down_proj": values[p + "mlp.experts.down_proj"]}
            else:
                n = sum(1 for k in values if k.startswith(p + "mlp.experts.") and k.endswith("gate_proj.weight"))
                stacks = {w: np.stack([values[f"{p}mlp.experts.{e}.{w}.weight"] for e in range(n)])
                          for w in ("gate_proj", "up_proj", "down_proj")}
            for w, gg in convert.EXPERT_NAMES.items():
                want[f"blk.{i}.{gg}"] = stacks[w]
    return want


@pytest.mark.parametrize("kind", [DENSE, MOE, dict(moe=False, tied=False), dict(moe=True, tied=False, fused_experts=True)])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_f32_file_holds_exactly_the_checkpoint_values(ckpt, tmp_path, kind, dtype):
    d, values = ckpt(dtype=dtype, **kind)
    out = quantize(d, tmp_path, "f32")
    want = expected_tensors(values, kind["moe"], kind["tied"])
    with GGUFFile(out) as g:
        assert set(g.tensors) == set(want)
        for name, x in want.items():
            t = g.tensors[name]
            assert t.shape == tuple(reversed(x.shape)), name
            assert t.type == T.F32
            np.testing.assert_array_equal(g.raw(name).view(np.float32).reshape(x.shape), x, err_msg=name)


@pytest.mark.parametrize("type_name,qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("bf16", T.BF16), ("f16", T.F16)])
@pytest.mark.parametrize("kind", [DENSE, MOE])
def test_quantized_bytes_equal_gguf_py(ckpt, tmp_path, kind, type_name, qtype):
    d, values = ckpt(**kind)
    out = quantize(d, tmp_path, type_name)
    want = expected_tensors(values, kind["moe"], kind["tied"])
    with GGUFFile(out) as g:
        for name, x in want.items():
            t = g.tensors[name]
            if x.ndim == 1 or "ffn_gate_inp" in name:
                assert t.type == T.F32, name
                continue
            # hidden 64 is no multiple of 256: the output matrix falls back from Q6_K to Q8_0
            is_output = name == "output.weight" or (kind["tied"] and name == "token_embd.weight")
            expect = T.Q8_0 if is_output and qtype == T.Q4_0 else qtype
            assert t.type == expect, name
            ref = gguf.quants.quantize(x.reshape(-1, x.shape[-1]), expect)
            assert np.array_equal(g.raw(name), np.ascontiguousarray(ref).view(np.uint8).reshape(g.raw(name).shape)), name


def test_q6_k_output_for_q4_0_and_its_error(ckpt, tmp_path):
    d, values = ckpt(hidden=256, layers=1, tied=True)
    out = quantize(d, tmp_path, "q4_0")
    with GGUFFile(out) as g:
        t = g.tensors["token_embd.weight"]
        assert t.type == T.Q6_K
        x = values["model.embed_tokens.weight"][:4096]
        y = FORMATS[T.Q6_K].decode(g.raw("token_embd.weight")[:4096], 256)
        np.testing.assert_array_equal(y, gguf.quants.dequantize(g.raw("token_embd.weight")[:4096], T.Q6_K))
        blocks = np.abs(x).reshape(-1, 16).max(-1, keepdims=True)
        assert (np.abs(y - x).reshape(-1, 16) <= blocks / 20 + 1e-6).all()


def test_gguf_py_reads_our_file(ckpt, tmp_path):
    d, values = ckpt(**MOE)
    out = quantize(d, tmp_path, "q8_0")
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "qwen3moe"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert (f["qwen3moe.block_count"], f["qwen3moe.embedding_length"], f["qwen3moe.feed_forward_length"]) == (2, 64, 128)
    assert (f["qwen3moe.attention.head_count"], f["qwen3moe.attention.head_count_kv"]) == (4, 2)
    assert (f["qwen3moe.attention.key_length"], f["qwen3moe.attention.value_length"]) == (32, 32)
    assert (f["qwen3moe.expert_count"], f["qwen3moe.expert_used_count"], f["qwen3moe.expert_feed_forward_length"]) == (4, 2, 64)
    assert f["qwen3moe.rope.freq_base"] == 1e6 and f["qwen3moe.context_length"] == 40960
    assert f["qwen3moe.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["tokenizer.chat_template"] == json.loads((TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    tensors = {t.name: t for t in r.tensors}
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [64, 64, 4]
    assert tensors["blk.1.ffn_down_exps.weight"].shape.tolist() == [64, 64, 4]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32
    assert tensors["output.weight"].tensor_type == T.Q8_0
    assert len(tensors) == 1 + 1 + 1 + 2 * 12


def test_tokenizer_metadata_is_llama_cpps(ckpt, tmp_path):
    d, _ = ckpt(**DENSE)
    with GGUFFile(quantize(d, tmp_path, "q8_0")) as g:
        md = g.metadata
        tokens, types = list(md["tokenizer.ggml.tokens"]), md["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == VOCAB
        counts = {t: int((types == t).sum()) for t in (1, 3, 4, 5)}
        assert counts == {1: 151643, 3: 20, 4: 6, 5: 267}
        assert tokens[151669] == "[PAD151669]" and tokens[-1] == "[PAD151935]"
        assert tokens[9707] == "Hello" and tokens[151644] == "<|im_start|>"
        user_defined = {tokens[i] for i in np.flatnonzero(types == 4)}
        assert user_defined == {"<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"}
        assert len(md["tokenizer.ggml.merges"]) == 151387
        assert md["tokenizer.ggml.merges"][0] == "Ġ Ġ"
        assert (int(md["tokenizer.ggml.bos_token_id"]), int(md["tokenizer.ggml.eos_token_id"]),
                int(md["tokenizer.ggml.padding_token_id"])) == (151643, 151645, 151643)
        assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.add_eos_token"] is False
        # generation_config.json's sampling defaults travel as general.sampling.*
        assert int(md["general.sampling.top_k"]) == 20
        assert md["general.sampling.temp"] == pytest.approx(0.6)


def _file_facts(path):
    with GGUFFile(path) as g:
        md = {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in g.metadata.items()
              if k not in ("general.name", "general.basename")}
        md = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in md.items()}
        return md, {n: (t.shape, t.type, g.raw(n).tobytes()) for n, t in g.tensors.items()}


@pytest.mark.parametrize("variant", [dict(shards=3), dict(dialect="transformers5"), dict(fused_experts=True)])
def test_layouts_and_dialects_give_the_same_file(ckpt, tmp_path, variant):
    base, _ = ckpt(**MOE)
    other, _ = ckpt(**MOE, **variant)
    a = _file_facts(quantize(base, tmp_path, "q4_0", "a.gguf"))
    b = _file_facts(quantize(other, tmp_path, "q4_0", "b.gguf"))
    assert a == b


def test_yarn_and_size_label(ckpt, tmp_path):
    d, _ = ckpt(yarn=True, dialect="transformers5", **DENSE)
    with GGUFFile(quantize(d, tmp_path, "q8_0")) as g:
        md = g.metadata
        assert md["qwen3.rope.scaling.type"] == "yarn"
        assert md["qwen3.rope.scaling.factor"] == 4.0
        assert int(md["qwen3.rope.scaling.original_context_length"]) == 32768
        assert md["general.size_label"] == "10M"


def test_info_shows_the_same_facts(ckpt, tmp_path):
    d, _ = ckpt(**MOE)
    out = quantize(d, tmp_path, "q4_0")
    i = read_info(out)
    hp = dict(i.hparams)
    assert (i.architecture, i.file_type) == ("qwen3moe", "Q4_0")
    assert (hp["layers"], hp["embedding"], hp["experts"], hp["experts per token"], hp["head dim"]) == (2, 64, 4, 2, 32)
    assert dict(i.tokenizer)["tokens"] == VOCAB and dict(i.tokenizer)["merges"] == 151387
    assert dict(i.tokenizer)["EOS"] == "151645 <|im_end|>"
    assert i.has_chat_template and not i.tied_embeddings
    assert i.n_tensors == 27 and i.type_counts == {"F32": 11, "Q4_0": 15, "Q8_0": 1}
    with GGUFFile(out) as g:
        assert i.n_params == sum(t.n_elements for t in g.tensors.values())


def test_peak_memory_is_bounded_by_chunks(ckpt, tmp_path, monkeypatch):
    """Parts never hand the quantizer more than CHUNK_BYTES of float32 (one expert at most)."""
    monkeypatch.setattr(convert, "CHUNK_BYTES", 1 << 20)
    d, _ = ckpt(**MOE)
    p = convert.plan(d, "q8_0")
    embd = next(t for t in p.tensors if t.name == "token_embd.weight")
    assert len(embd.parts) == -(-VOCAB * 64 * 4 // (1 << 20))
    sizes = [part().nbytes for t in p.tensors for part in t.parts[:3]]
    assert max(sizes) <= 1 << 20


@pytest.mark.parametrize("kind,type_name", [(dict(moe=False, tied=True, layers=8, hidden=256), "q4_0"),
                                            (dict(moe=True, tied=False, hidden=256), "q4_k_m")])
def test_imatrix_weights_each_tensor_with_its_own_slice(ckpt, tmp_path, kind, type_name):
    """Every quantized tensor's bytes are its format's quantizer given that tensor's (for expert
    tensors: that expert's) importance; a tensor the imatrix lacks is quantized unweighted."""
    from checkpoints import imatrix_for
    from quant.imatrix import load_imatrix

    d, values = ckpt(dtype="f32", **kind)
    skip = ("blk.1.attn_k.weight",)
    m = load_imatrix(imatrix_for(convert.plan(d, type_name), tmp_path / "m.gguf", skip))
    p = convert.plan(d, type_name, m)
    missing, n = p.imatrix_missing()
    assert missing == list(skip) and n > 10
    out = tmp_path / "out.gguf"
    convert.write(p, out)
    want = expected_tensors(values, kind["moe"], kind["tied"], kind.get("layers", 2))
    if not kind["moe"]:  # llama.cpp's guard, only with an imatrix: the first eighth of ffn_down in Q4_1
        assert [t.type for t in p.tensors if t.name == "blk.0.ffn_down.weight"] == [T.Q4_1]
        assert [t.type for t in p.tensors if t.name == "blk.1.ffn_down.weight"] == [T.Q4_0]
        assert [t.type for t in convert.plan(d, type_name).tensors if t.name == "blk.0.ffn_down.weight"] == [T.Q4_0]
    with GGUFFile(out) as g:
        for t in p.tensors:
            if t.type in (T.F32, T.F16, T.BF16):
                continue
            x = want[t.name]
            fmt = FORMATS[t.type]
            imp = m.for_tensor(t.name, t.shape[0], t.shape[2] if len(t.shape) == 3 else 1)
            if t.name in skip:
                assert imp is None
            if x.ndim == 3:
                ref = np.concatenate([fmt.quantize(x[e], None if imp is None else imp[e]) for e in range(len(x))])
            else:
                ref = fmt.quantize(x, None if imp is None else imp[0])
            assert np.array_equal(g.raw(t.name), ref), t.name
            if imp is not None and t.type != T.Q8_0:
                assert not np.array_equal(g.raw(t.name), fmt.quantize(x.reshape(-1, x.shape[-1]))), t.name
