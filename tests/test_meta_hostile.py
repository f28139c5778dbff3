"""Hostile metadata and absurd sizes (issue 13, classes 2 and 3).

One value at a time is replaced, in an otherwise valid tiny model, by anything its format can
hold: GGUF values of every type (ints of each width, nan and inf, strings, bools, arrays of each
type, empty and nested), random JSON in config.json, safetensors headers, tokenizer files and
shard indexes, random YAML in the model card. The library must then load the model or raise one
typed user error (qwen3cli.errors.USER_ERRORS) that names the file, and the key when its value
has the wrong type; never another exception. generation_config.json and the model card are
optional: damage there is a warning, and the model still converts and loads.

The models are tiny (a 544-token vocabulary) so that most cases run in-process in milliseconds;
a handful go through the CLI in a child under a 3 GB address-space limit (tests/hostile.py),
among them the absurd sizes, which must fail in seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import gguf
import pytest
import yaml
from gguf import GGUF_MAGIC, GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoints
from checkpoints import TOKENIZER, make_checkpoint
from hostile import clean_error, run_cli
from quant.gguf_file import GGUFFile
from qwen3cli.io import convert
from qwen3cli.io.checkpoint import Checkpoint, read_safetensors_header
from qwen3cli.errors import USER_ERRORS
from qwen3cli.io.info import read_info
from qwen3cli.io.loader import load, load_gguf

N_BASE = 512  # the real tokenizer's first 512 tokens, with the merges among them
VOCAB = 544  # and its 26 added tokens after them, padded

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- tiny models --------------------------------------------------------------------------------

def tiny_tokenizer_spec() -> dict:
    spec = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < N_BASE}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    for k, a in enumerate(spec["added_tokens"]):
        a["id"] = N_BASE + k
    return spec


def make_tiny(root: Path, **kw) -> Path:
    """make_checkpoint's model with a 544-token vocabulary (loads in milliseconds)."""
    saved = checkpoints.VOCAB
    checkpoints.VOCAB = VOCAB
    try:
        make_checkpoint(root, dtype="f32", **kw)
    finally:
        checkpoints.VOCAB = saved
    (root / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_spec()))
    cfg = json.loads((root / "config.json").read_text())
    cfg["bos_token_id"], cfg["eos_token_id"] = N_BASE, N_BASE + 2
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"dense": yarn-scaled dense dir, "moe": MoE dir, "sharded": 2 shards with an index}."""
    base = tmp_path_factory.mktemp("tiny")
    return {"dense": make_tiny(base / "dense", yarn=True), "moe": make_tiny(base / "moe", moe=True),
            "sharded": make_tiny(base / "sharded", shards=2)}


def _kv(value: gguf.GGUFValue) -> tuple[VT, object]:
    """A GGUFValue as (type, value) for write_gguf; arrays as (ARRAY, (item type, items))."""
    vt = VT(value.type)
    if vt != VT.ARRAY:
        return vt, value.value
    items = list(value.value)
    sub = VT(value.sub_type) if value.sub_type is not None else VT.get_type(items[0]) if items else VT.UINT8
    return vt, (sub, items)


@pytest.fixture(scope="module")
def base_ggufs(tiny):
    """Per model: its GGUF key/values as (type, value) and its tensors as (name, shape, type, bytes)."""
    out = {}
    for kind in ("dense", "moe"):
        p = convert.plan(tiny[kind], "f32")
        kv = {k: _kv(v) for k, v in p.metadata.items()}
        tensors = []
        for t in p.tensors:
            data = b"".join(convert.get_format(t.type, t.name).quantize(part(), None).tobytes() for part in t.parts)
            tensors.append((t.name, t.shape, int(t.type), data))
        out[kind] = (kv, tensors)
    return out


# -- a GGUF writer of our own: any value of any type, nested arrays too -----------------------

FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
       VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT32: "<f", VT.FLOAT64: "<d", VT.BOOL: "<?"}


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def pack(vt: VT, v) -> bytes:
    if vt == VT.STRING:
        return _str(v)
    if vt == VT.ARRAY:
        sub, items = v
        return struct.pack("<IQ", sub, len(items)) + b"".join(pack(sub, x) for x in items)
    return struct.pack(FMT[vt], v)


def write_gguf(path: Path, kv: dict, tensors: list, align: int = 32) -> Path:
    out = [struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), len(kv))]
    out += [_str(k) + struct.pack("<I", vt) + pack(vt, v) for k, (vt, v) in kv.items()]
    offset = 0
    for name, shape, ttype, data in tensors:
        out.append(_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                   + struct.pack("<IQ", ttype, offset))
        offset += -(-len(data) // align) * align
    head = b"".join(out)
    blob = [head, b"\0" * (-len(head) % align)]
    for *_, data in tensors:
        blob += [data, b"\0" * (-len(data) % align)]
    path.write_bytes(b"".join(blob))
    return path


# -- strategies -----------------------------------------------------------------------------------

INT_TYPES = {VT.UINT8: (0, 2**8 - 1), VT.INT8: (-2**7, 2**7 - 1), VT.UINT16: (0, 2**16 - 1),
             VT.INT16: (-2**15, 2**15 - 1), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-2**31, 2**31 - 1),
             VT.UINT64: (0, 2**64 - 1), VT.INT64: (-2**63, 2**63 - 1)}
EDGES = [0, 1, 2, -1, 3, 16, 32, 64, 544, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1, -2**63, -2**31]
WORDS = ["", "qwen3", "qwen3moe", "gpt2", "qwen2", "yarn", "linear", "none", "a b", "Ġ Ġ", "\x1b[31m", "<|im_end|>"]


def scalar(vt: VT):
    if vt in INT_TYPES:
        lo, hi = INT_TYPES[vt]
        return st.one_of(st.integers(lo, hi), st.sampled_from([e for e in EDGES if lo <= e <= hi]))
    if vt == VT.FLOAT32:
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, 1e-6, 1.0, 1e6, math.inf, math.nan]))
    if vt == VT.FLOAT64:
        return st.one_of(st.floats(), st.sampled_from([0.0, 1e300, -1e300, math.inf, -math.inf, math.nan]))
    if vt == VT.BOOL:
        return st.booleans()
    return st.one_of(st.text(max_size=12), st.sampled_from(WORDS))


SCALAR_TYPES = [*INT_TYPES, VT.FLOAT32, VT.FLOAT64, VT.BOOL, VT.STRING]


@st.composite
def gguf_values(draw):
    """(type, value) of any GGUF type, or None for "the key is absent"."""
    shape = draw(st.sampled_from(["scalar"] * 4 + ["array"] * 2 + ["nested", "absent"]))
    if shape == "absent":
        return None
    vt = draw(st.sampled_from(SCALAR_TYPES))
    if shape == "scalar":
        return vt, draw(scalar(vt))
    if shape == "array":
        return VT.ARRAY, (vt, draw(st.lists(scalar(vt), max_size=4)))
    inner = st.lists(scalar(vt), max_size=3).map(lambda xs: (vt, xs))
    return VT.ARRAY, (VT.ARRAY, draw(st.lists(inner, max_size=3)))


def kind(vt: VT, v) -> str:
    if vt in INT_TYPES:
        return "int"
    if vt in (VT.FLOAT32, VT.FLOAT64):
        return "number"
    if vt == VT.BOOL:
        return "flag"
    if vt == VT.STRING:
        return "text"
    sub, items = v
    if not items:
        return "empty"
    return {"text": "texts", "int": "ints"}.get(kind(sub, items[0]) if sub != VT.ARRAY else "nested", "array")


def fits(want: str, got: str) -> bool:
    return got == want or (want == "number" and got == "int") or (got == "empty" and want in ("texts", "ints"))


# (key, the kind it must have, the readers that use it); {arch} is the model's architecture
H = ("load", "info")
GGUF_KEYS = [
    ("general.alignment", "int", H), ("general.architecture", "text", H), ("general.name", "text", H),
    ("general.file_type", "int", ("info",)),
    *[(f"{{arch}}.{k}", want, H) for k, want in [
        ("block_count", "int"), ("context_length", "int"), ("embedding_length", "int"),
        ("feed_forward_length", "int"), ("attention.head_count", "int"), ("attention.head_count_kv", "int"),
        ("attention.key_length", "int"), ("rope.freq_base", "number"), ("rope.scaling.type", "text"),
        ("rope.scaling.factor", "number"), ("rope.scaling.original_context_length", "int"),
        ("attention.layer_norm_rms_epsilon", "number")]],
    ("{arch}.attention.value_length", "int", ("load",)), ("{arch}.vocab_size", "int", ("load",)),
    ("tokenizer.ggml.model", "text", H), ("tokenizer.ggml.pre", "text", H), ("tokenizer.ggml.tokens", "texts", H),
    ("tokenizer.ggml.token_type", "ints", ("load",)), ("tokenizer.ggml.merges", "texts", H),
    ("tokenizer.ggml.bos_token_id", "int", H), ("tokenizer.ggml.eos_token_id", "int", H),
    ("tokenizer.ggml.padding_token_id", "int", H), ("tokenizer.ggml.add_bos_token", "flag", ("info",)),
    ("tokenizer.chat_template", "text", H),
    *[(f"general.sampling.{k}", want, ("load",)) for k, want in [
        ("temp", "number"), ("top_k", "int"), ("top_p", "number"), ("min_p", "number"),
        ("penalty_repeat", "number"), ("penalty_last_n", "int")]],
]
MOE_KEYS = [("{arch}.expert_count", "int", H), ("{arch}.expert_used_count", "int", H),
            ("{arch}.expert_feed_forward_length", "int", H), ("{arch}.expert_weights_norm", "flag", ("load",))]
READERS = {"load": load_gguf, "info": read_info}


def user_error_or_none(fn, *args) -> str | None:
    """The message of a typed user error, None when fn succeeds; any other exception fails the test."""
    try:
        fn(*args)
    except USER_ERRORS as e:
        msg = str(e)
        assert "\n" not in msg, msg
        return msg
    return None


_count = iter(range(10**9))


@pytest.mark.parametrize("key,want,readers", GGUF_KEYS + MOE_KEYS, ids=[k for k, *_ in GGUF_KEYS + MOE_KEYS])
@settings(max_examples=40, **SETTINGS)
@given(value=gguf_values())
def test_gguf_metadata_values(base_ggufs, tmp_path_factory, key, want, readers, value):
    model = "moe" if key in {k for k, *_ in MOE_KEYS} else "dense"
    kv, tensors = base_ggufs[model]
    key = key.format(arch="qwen3moe" if model == "moe" else "qwen3")
    kv = dict(kv)
    if value is None:
        kv.pop(key, None)
    else:
        kv[key] = value
    path = write_gguf(tmp_path_factory.getbasetemp() / f"m{next(_count)}.gguf", kv, tensors)
    wrong = value is not None and not fits(want, kind(*value))
    for name, fn in READERS.items():
        msg = user_error_or_none(fn, path)
        if msg is not None:
            assert str(path) in msg, msg
        if wrong and name in readers:
            assert msg is not None and key in msg, (name, value, msg)


def test_wrong_types_the_issue_names(base_ggufs, tmp_path):
    kv, tensors = base_ggufs["dense"]
    cases = {
        "general.alignment": ((VT.STRING, "32"), "general.alignment"),
        "tokenizer.ggml.eos_token_id": ((VT.UINT64, 2**40), "tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.bos_token_id": ((VT.INT32, -1), "tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.tokens": ((VT.UINT32, 7), "tokenizer.ggml.tokens"),
        "tokenizer.ggml.merges": ((VT.ARRAY, (VT.INT32, [1, 2])), "tokenizer.ggml.merges"),
        "qwen3.attention.key_length": ((VT.ARRAY, (VT.UINT32, [16])), "qwen3.attention.key_length"),
        "qwen3.rope.freq_base": ((VT.FLOAT64, 1e300), "qwen3.rope.freq_base"),
        "general.sampling.temp": ((VT.STRING, "hot"), "general.sampling.temp"),
    }
    for key, (value, needle) in cases.items():
        path = write_gguf(tmp_path / "m.gguf", {**kv, key: value}, tensors)
        msg = user_error_or_none(load_gguf, path)
        assert msg is not None and str(path) in msg and needle in msg, (key, msg)
    merges = list(kv["tokenizer.ggml.merges"][1][1])
    merges[3] = "Ġ zzzz"  # a merge naming a token the vocabulary does not have
    path = write_gguf(tmp_path / "m.gguf", {**kv, "tokenizer.ggml.merges": (VT.ARRAY, (VT.STRING, merges))}, tensors)
    msg = user_error_or_none(load_gguf, path)
    assert msg is not None and "merges[3]" in msg and "'zzzz'" in msg


# -- absurd sizes --------------------------------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(dims=st.lists(st.one_of(st.integers(1, 2**64 - 1), st.sampled_from([2**32, 2**63, 2**64 - 1, 3])),
                     min_size=1, max_size=4))
def test_tensor_dims_are_counted_exactly(base_ggufs, tmp_path_factory, dims):
    kv, tensors = base_ggufs["dense"]
    name, shape, ttype, data = tensors[1]
    path = write_gguf(tmp_path_factory.getbasetemp() / f"t{next(_count)}.gguf", kv,
                      [*tensors[:1], (name, tuple(dims), ttype, data), *tensors[2:]])
    msg = user_error_or_none(read_info, path)
    if msg is None:  # the header fits the file: then the counts are exact
        i = read_info(path)
        with GGUFFile(path) as g:
            assert i.n_params == sum(math.prod(t.shape) for t in g.tensors.values()) > 0
    else:
        assert str(path) in msg
    msg = user_error_or_none(load_gguf, path)
    assert msg is None or str(path) in msg


def test_block_count_and_layers_far_beyond_the_file(base_ggufs, tiny, tmp_path):
    kv, tensors = base_ggufs["dense"]
    for n in (2**32 - 1, 1025, 1024):
        path = write_gguf(tmp_path / "m.gguf", {**kv, "qwen3.block_count": (VT.UINT32, n)}, tensors)
        msg = user_error_or_none(load_gguf, path)
        assert msg is not None and ("qwen3.block_count" in msg if n > 1024 else "missing tensor" in msg), msg
    d = tmp_path / "hf"
    shutil.copytree(tiny["dense"], d)
    cfg = json.loads((d / "config.json").read_text())
    for n in (10**9, 1000):
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n}))
        msg = user_error_or_none(convert.plan, d)
        assert msg is not None and ("num_hidden_layers" in msg if n > 1024 else "missing tensor" in msg), msg


# -- safetensors headers ------------------------------------------------------------------------

def json_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([-1, 2**40, 2**63, 2**64, 10**30]),
                       st.floats(), st.text(max_size=8), st.sampled_from(["BF16", "F32", "I64", "12", ""]))
    return st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                        max_leaves=8)


def _shard(tiny) -> tuple[Path, dict, bytes]:
    path = tiny["dense"] / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return path, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_shard(path: Path, header, data: bytes, length: int | None = None) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_safetensors_headers(tiny, tmp_path_factory, data):
    _, header, blob = _shard(tiny)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    how = data.draw(st.sampled_from(["field", "field", "entry", "header", "length", "huge", "overlap", "offsets"]))
    length = None
    if how == "field":
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(json_values())
    elif how == "entry":
        header[name] = data.draw(json_values())
    elif how == "header":
        header = data.draw(json_values())
    elif how == "length":
        length = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 7, 100 << 20, (100 << 20) + 1])))
    elif how == "huge":
        header[name]["shape"] = data.draw(st.lists(st.sampled_from([2**32, 2**40, 2**62, 1]), min_size=1, max_size=4))
    elif how == "overlap":
        other = data.draw(st.sampled_from(names))
        header[name]["data_offsets"] = list(header[other]["data_offsets"])
        header[name]["shape"], header[name]["dtype"] = header[other]["shape"], header[other]["dtype"]
    else:
        start = data.draw(st.integers(0, 2**64))
        header[name]["data_offsets"] = [start, start + data.draw(st.integers(0, 2**64))]
    path = tmp_path_factory.getbasetemp() / f"s{next(_count)}.safetensors"
    _write_shard(path, header, blob, length)
    msg = user_error_or_none(read_safetensors_header, path)
    if msg is not None:
        assert str(path) in msg
        if how == "field" and isinstance(header, dict) and name in header and not _plausible(header[name]):
            assert name in msg, msg
    elif how == "overlap" and header[name]["data_offsets"][0] != header[name]["data_offsets"][1]:
        assert name == other  # two tensors on the same bytes are refused


def _plausible(entry) -> bool:
    return (isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
            and all(type(d) is int for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
            and all(type(o) is int for o in entry["data_offsets"]))


def test_safetensors_cases_the_issue_names(tiny, tmp_path):
    _, header, blob = _shard(tiny)
    name = "model.norm.weight"
    p = tmp_path / "x.safetensors"
    for field, value, needle in [("data_offsets", ["0", "256"], "data_offsets"), ("shape", [2**32, 2**32], "inconsistent"),
                                 ("dtype", ["BF16"], "dtype"), ("shape", [True, 64], "shape")]:
        _write_shard(p, {**header, name: {**header[name], field: value}}, blob)
        msg = user_error_or_none(read_safetensors_header, p)
        assert msg is not None and str(p) in msg and name in msg and needle in msg, msg


# -- config.json ---------------------------------------------------------------------------------

CONFIG_KEYS = {  # key -> the kind it must have; rope_scaling.* are inside the yarn rope_scaling object
    "architectures": "texts", "attention_bias": "flag", "hidden_size": "int", "num_attention_heads": "int",
    "num_key_value_heads": "int", "head_dim": "int", "rope_theta": "number", "rope_scaling": "object",
    "rope_scaling.rope_type": "text", "rope_scaling.factor": "number",
    "rope_scaling.original_max_position_embeddings": "int", "vocab_size": "int", "num_hidden_layers": "int",
    "intermediate_size": "int", "rms_norm_eps": "number", "max_position_embeddings": "int",
    "tie_word_embeddings": "flag", "bos_token_id": "ids", "eos_token_id": "ids", "pad_token_id": "ids",
    "unk_token_id": "ids", "text_config": "object", "_name_or_path": None, "rope_parameters": "object",
}
MOE_CONFIG_KEYS = {"num_experts": "int", "num_experts_per_tok": "int", "moe_intermediate_size": "int",
                   "norm_topk_prob": "flag", "decoder_sparse_step": "int", "mlp_only_layers": "list"}


def json_kind(v) -> str:
    if isinstance(v, bool):
        return "flag"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "number" if math.isfinite(v) else "nonfinite"
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        return "texts" if v and all(isinstance(x, str) for x in v) else "list" if v else "empty"
    return "object" if isinstance(v, dict) else "null"


def json_fits(want: str, got: str, value=None) -> bool:
    if want == "ids":  # one token id, or several (an eos list)
        return got in ("int", "null", "empty") or (got == "list" and all(json_kind(v) == "int" for v in value))
    return (got == want or got == "null" or (want == "number" and got == "int")
            or (got == "empty" and want in ("texts", "list")) or (want == "list" and got == "texts"))


@pytest.fixture(scope="module")
def scratch(tiny, tmp_path_factory):
    """Copies of the tiny directories to damage one file at a time; restore(kind) undoes it."""
    root = tmp_path_factory.mktemp("scratch")
    dirs = {k: shutil.copytree(v, root / k) for k, v in tiny.items()}

    def restore(kind: str) -> Path:
        for f in tiny[kind].iterdir():
            if f.is_file() and (f.suffix in (".json", ".md") or f.name.endswith(".jinja")):
                shutil.copy(f, dirs[kind] / f.name)
        for f in dirs[kind].iterdir():
            if f.is_file() and not (tiny[kind] / f.name).exists():
                f.unlink()
        return dirs[kind]

    return restore


@pytest.mark.parametrize("key", [*CONFIG_KEYS, *MOE_CONFIG_KEYS])
@settings(max_examples=30, **SETTINGS)
@given(value=json_values())
def test_config_json_values(scratch, key, value):
    d = scratch("moe" if key in MOE_CONFIG_KEYS else "dense")
    cfg = json.loads((d / "config.json").read_text())
    want = {**CONFIG_KEYS, **MOE_CONFIG_KEYS}[key]
    outer, _, inner = key.partition(".")
    (cfg[outer] if inner else cfg)[inner or outer] = value
    (d / "config.json").write_text(json.dumps(cfg))
    msg = user_error_or_none(convert.plan, d)
    if msg is not None:
        assert str(d) in msg, msg
    if want and not json_fits(want, json_kind(value), value):
        assert msg is not None and "config.json" in msg and (inner or outer) in msg, (value, msg)


def test_config_cases_the_issue_names(scratch):
    for key, value in [("head_dim", [16]), ("rope_theta", 1e300), ("num_hidden_layers", 1e9),
                       ("rms_norm_eps", float("nan")), ("vocab_size", 2**40), ("num_key_value_heads", -1)]:
        d = scratch("dense")
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        msg = user_error_or_none(convert.plan, d)
        assert msg is not None and f"{d / 'config.json'}: '{key}' must be" in msg, msg


# -- tokenizer files -------------------------------------------------------------------------

TOKENIZER_PATHS = [("model", "type"), ("model", "vocab"), ("model", "vocab", "Ġ"), ("model", "merges"),
                   ("model", "merges", 0), ("model", "merges", 0, 1), ("added_tokens",), ("added_tokens", 0),
                   ("added_tokens", 2, "id"), ("added_tokens", 2, "content"), ("added_tokens", 2, "special"),
                   ("pre_tokenizer",), ("post_processor",), ("normalizer",), ("decoder",), ("model",), ()]


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("path", TOKENIZER_PATHS, ids=lambda p: ".".join(map(str, p)) or "file")
@settings(max_examples=25, **SETTINGS)
@given(value=json_values())
def test_tokenizer_json_damage(scratch, path, value):
    d = scratch("dense")
    spec = _set(json.loads((d / "tokenizer.json").read_text()), path, value)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    msg = user_error_or_none(convert.plan, d)
    assert msg is None or str(d / "tokenizer.json") in msg, msg
    if msg is None:  # harmless damage: the directory still loads
        assert user_error_or_none(load, d, "f32") is None


def test_tokenizer_json_cases_the_issue_names(scratch):
    cases = [(("model", "merges", 5), "Ġ zzzz", "zzzz"), (("model", "merges", 5), ["Ġ", "t", "x"], "merges[5]"),
             (("model", "merges", 5), 17, "merges[5]"), (("model", "vocab", "Ġ"), 2**40, "vocab['Ġ']"),
             (("model", "vocab", "Ġ"), -1, "vocab['Ġ']"), (("added_tokens", 0, "id"), 2**40, "added_tokens[0].id")]
    for path, value, needle in cases:
        d = scratch("dense")
        spec = _set(json.loads((d / "tokenizer.json").read_text()), path, value)
        (d / "tokenizer.json").write_text(json.dumps(spec))
        msg = user_error_or_none(convert.plan, d)
        assert msg is not None and str(d / "tokenizer.json") in msg and needle in msg, msg
    d = scratch("dense")
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["model"]["vocab"].pop("ĠĠ")  # the first merge's result: the BPE library would panic on it
    (d / "tokenizer.json").write_text(json.dumps(spec))
    msg = user_error_or_none(convert.plan, d)
    assert msg is not None and "'ĠĠ'" in msg and "model.merges[0]" in msg


TC_KEYS = {"bos_token": "token", "eos_token": "token", "pad_token": "token", "unk_token": "token", "sep_token": "token",
           "cls_token": "token", "mask_token": "token", "add_bos_token": "flag", "add_eos_token": "flag",
           "add_sep_token": "flag", "chat_template": "template"}


@pytest.mark.parametrize("key", [*TC_KEYS, None])
@settings(max_examples=25, **SETTINGS)
@given(value=json_values())
def test_tokenizer_config_damage(scratch, key, value):
    d = scratch("dense")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    if key is None:
        tc = value
    else:
        tc[key] = value
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    msg = user_error_or_none(convert.plan, d)
    assert msg is None or str(d / "tokenizer_config.json") in msg, msg
    want = TC_KEYS.get(key)
    ok = (value is None or (want == "flag" and isinstance(value, bool))
          or (want == "token" and (isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))))
          or (want == "template" and (isinstance(value, str) or (isinstance(value, list) and all(
              isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("template"), str) for x in value)))))
    if key is not None and not ok:
        assert msg is not None and key in msg, (value, msg)


# -- optional files: generation_config.json and the model card warn, and the model still works ---

GEN_KEYS = ["temperature", "top_k", "top_p", "min_p", "penalty_repeat", "penalty_last_n", "xtc_probability",
            "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta", "sequence"]


@settings(max_examples=100, **SETTINGS)
@given(key=st.sampled_from([*GEN_KEYS, None]), value=json_values(), raw=st.binary(max_size=20))
def test_generation_config_damage_warns(scratch, tmp_path_factory, key, value, raw):
    d = scratch("dense")
    path = d / "generation_config.json"
    if key is None:
        path.write_bytes(raw if value is None else json.dumps(value).encode())
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    p = convert.plan(d, "f32")  # never an error: the file is optional
    for w in p.warnings:
        assert str(path) in w and "\n" not in w
    if key is not None and any(key in w for w in p.warnings):
        assert not any(k.startswith("general.sampling.") and k.endswith(key) for k in p.metadata)
    out = tmp_path_factory.getbasetemp() / f"g{next(_count)}.gguf"
    convert.write(p, out)
    m = load_gguf(out)  # what was written loads, its sampling keys pass the loader's checks
    assert m.args.vocab_size == VOCAB


def test_generation_config_cases(scratch):
    d = scratch("dense")
    (d / "generation_config.json").write_text('{"temperature": "hot", "top_k": 20.5, "top_p": 0.9}')
    p = convert.plan(d, "f32")
    assert len(p.warnings) == 2 and "'temperature'" in p.warnings[0] and "'top_k'" in p.warnings[1]
    assert p.metadata["general.sampling.top_p"].value == 0.9 and "general.sampling.temp" not in p.metadata
    (d / "generation_config.json").write_text("{ not json")
    p = convert.plan(d, "f32")
    assert len(p.warnings) == 1 and "not valid JSON" in p.warnings[0]
    m = load(d, "f32")
    assert m.warnings == p.warnings


CARD_KEYS = ["name", "author", "version", "license", "license_name", "tags", "language", "base_model",
             "base_model_sources", "datasets", "pipeline_tag", "model_creator", "model_type", "description"]


@settings(max_examples=100, **SETTINGS)
@given(card=st.dictionaries(st.sampled_from(CARD_KEYS), json_values(), max_size=4),
       text=st.one_of(st.none(), st.text(max_size=60)))
def test_model_card_damage_warns(scratch, tmp_path_factory, card, text):
    d = scratch("dense")
    front = text if text is not None else yaml.safe_dump(card, allow_unicode=True)
    (d / "README.md").write_text(f"---\n{front}\n---\n# A model\n")
    p = convert.plan(d, "f32")
    for w in p.warnings:
        assert str(d / "README.md") in w and "\n" not in w
    convert.write(p, tmp_path_factory.getbasetemp() / f"c{next(_count)}.gguf")  # every kept value is writable


def test_broken_model_card_yaml(scratch):
    d = scratch("dense")
    (d / "README.md").write_text("---\nlicense: [apache\ntags: {\n---\nhello\n")
    p = convert.plan(d, "f32")
    assert len(p.warnings) == 1 and "README.md" in p.warnings[0] and "malformed" in p.warnings[0]
    (d / "README.md").write_text("---\nlicense: apache-2.0\nversion: 1.0\nbase_model: [{name: 5}]\n---\n")
    p = convert.plan(d, "f32")
    assert [w.split("key ")[1].split(" ")[0] for w in p.warnings] == ["version", "base_model"]
    assert p.metadata["general.license"].value == "apache-2.0"


# -- the shard index --------------------------------------------------------------------------

@settings(max_examples=80, **SETTINGS)
@given(how=st.sampled_from(["value", "map", "file"]), value=json_values())
def test_index_damage(scratch, how, value):
    d = scratch("sharded")
    index = d / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    if how == "value":
        doc["weight_map"]["model.norm.weight"] = value
    elif how == "map":
        doc["weight_map"] = value
    else:
        doc = value
    index.write_text(json.dumps(doc))
    msg = user_error_or_none(Checkpoint, d)
    assert msg is None or str(d) in msg
    if how == "value" and not isinstance(value, str):
        assert msg is not None and str(index) in msg and "model.norm.weight" in msg, msg


# -- end to end, under the memory limit --------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_files(base_ggufs, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    kv, tensors = base_ggufs["dense"]
    name, shape, ttype, data = tensors[1]
    hf = shutil.copytree(tiny["dense"], root / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    warn = shutil.copytree(tiny["dense"], root / "warn")
    (warn / "README.md").write_text("---\nlicense: [apache\n---\n")
    (warn / "generation_config.json").write_text('{"temperature": "hot"}')
    return {
        "good": write_gguf(root / "good.gguf", kv, tensors),
        "blocks": write_gguf(root / "blocks.gguf", {**kv, "qwen3.block_count": (VT.UINT32, 2**32 - 1)}, tensors),
        "dims": write_gguf(root / "dims.gguf", kv, [tensors[0], (name, (2**32, 2**32), ttype, data), *tensors[2:]]),
        "int64": write_gguf(root / "int64.gguf", kv, [tensors[0], (name, (2**63, 4), ttype, data), *tensors[2:]]),
        "align": write_gguf(root / "align.gguf", {**kv, "general.alignment": (VT.STRING, "32")}, tensors),
        "layers": hf, "warn": warn, "out": root / "out.gguf",
    }


E2E = {  # name -> (argv, needles in the one error line)
    "info block_count 2^32-1": (("info", "{blocks}"), ("blocks.gguf", "'qwen3.block_count'", "1..1024")),
    "run block_count 2^32-1": (("run", "{blocks}", "hi"), ("blocks.gguf", "'qwen3.block_count'")),
    "info dims [2^32, 2^32]": (("info", "{dims}"), ("dims.gguf", "[4294967296, 4294967296]", "truncated")),
    "run dims [2^63, 4]": (("run", "{int64}", "hi"), ("int64.gguf", "[9223372036854775808, 4]")),
    "info alignment string": (("info", "{align}"), ("align.gguf", "general.alignment")),
    "run --ctx 1000000000": (("run", "{good}", "hi", "--ctx", "1000000000"), ("1000000000-token KV cache", "available")),
    "quantize num_hidden_layers 1e9": (("quantize", "{layers}", "-o", "{out}"), ("config.json", "'num_hidden_layers'")),
}
E2E_LIMIT_S = 20.0  # a refusal comes before any allocation: seconds (interpreter start and imports)


@pytest.mark.parametrize("case", list(E2E))
def test_end_to_end_refusals(hostile_files, case):
    argv, needles = E2E[case]
    r = run_cli(*(a.format(**hostile_files) for a in argv))
    clean_error(r, *needles)
    assert r.seconds < E2E_LIMIT_S and r.peak_mb < 1024, (r.seconds, r.peak_mb)
    print(f"{case}: {r.seconds:.2f} s, peak RSS {r.peak_mb:.0f} MB")


def test_end_to_end_optional_files_warn(hostile_files):
    r = run_cli("quantize", hostile_files["warn"], "-o", hostile_files["out"], "--type", "f32")
    assert r.code == 0, r.stderr[-2000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2 and any("README.md" in w for w in warnings) and any("'temperature'" in w for w in warnings)
    assert "Traceback" not in r.stderr
    print(f"quantize with a broken card and generation_config: {r.seconds:.2f} s, peak RSS {r.peak_mb:.0f} MB")


def test_sizes_are_checked_against_memory_first(base_ggufs, tiny, tmp_path, monkeypatch):
    from qwen3cli.model import memory
    from qwen3cli.model.forward import Model, kv_cache_nbytes

    kv, tensors = base_ggufs["dense"]
    m = load_gguf(write_gguf(tmp_path / "m.gguf", kv, tensors))
    assert kv_cache_nbytes(m.args, 10**9, "f32") == 2 * 2 * 2 * 10**9 * 32 * 4  # exact, far past int32
    monkeypatch.setattr(memory, "available", lambda: 10 << 20)
    Model(m.weights, ctx=64)  # 32 KB of f16 cache (the default) fits in 10 MB
    with pytest.raises(memory.MemoryLimitError, match=r"a 100000-token KV cache \(512 bytes per token.*more than the 10.5 MB"):
        Model(m.weights, ctx=100_000)
    monkeypatch.setattr(memory, "available", lambda: 100_000)  # the converted weights are 534 KB
    monkeypatch.setenv("QWEN3CLI_CACHE", "/proc/no-such-dir")  # no cache to convert into: in memory
    with pytest.raises(memory.MemoryLimitError, match="converting .* in memory"):
        load(tiny["dense"], "f32")


def test_parsers_meet_their_limits(scratch):
    d = scratch("dense")
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg[:-1] + ', "vocab_size": ' + "9" * 5000 + "}")
    assert "too many digits" in user_error_or_none(convert.plan, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in user_error_or_none(convert.plan, d)
    d = scratch("dense")
    shard = d / "model.safetensors"
    blob = shard.read_bytes()
    deep = b"[" * 50_000 + b"]" * 50_000
    shard.write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert "not JSON" in user_error_or_none(convert.plan, d)
    shard.write_bytes(blob)
    # aliases nest nine lists nine deep: a walk of every item would take 9^9 steps
    laughs = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")) + "tags: *i\nbase_model: *i\n"
    (d / "README.md").write_text(f"---\n{laughs}---\n")
    assert len(convert.plan(d).warnings) == 2
    (d / "README.md").write_text("---\n" + "[" * 100_000 + "\n---\n")
    assert "nested too deeply" in convert.plan(d).warnings[0]
