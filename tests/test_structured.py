"""Structured output (text/grammar.py, llguidance): on a random-weight tiny model, whose
unconstrained output is noise, every constrained generation parses and validates with the
reference validator (jsonschema), through the batcher, the server, the API and `run`."""

import json
import subprocess
import sys
import threading

import jsonschema
import openai
import pytest

from qwen3cli import generate
from qwen3cli.io.loader import load
from qwen3cli.runtime.batch import Request, batch_generate
from qwen3cli.runtime.engine import Engine
from qwen3cli.runtime.generation import Done, Token
from qwen3cli.sampler import Sampler, SamplingParams
from qwen3cli.serve import make_server
from qwen3cli.text.grammar import Grammar, GrammarError


def obj(props, required=None, **kw):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = {
    "nested": obj({"user": obj({"name": {"type": "string", "maxLength": 12},
                                "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
                   "active": {"type": "boolean"}}),
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1,
              "maxItems": 5},
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}}),
    "numbers": obj({"x": {"type": "number", "minimum": -10, "maximum": 10},
                    "n": {"type": "integer", "minimum": 100, "maximum": 999}}),
    "patterns": obj({"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                     "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    "optional": obj({"items": {"type": "array", "maxItems": 3,
                               "items": obj({"k": {"type": "string", "maxLength": 5},
                                             "v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                                            required=["k"])},
                     "note": {"type": "string", "maxLength": 10}}, required=["items"]),
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": obj(
    {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}, required=["city"])}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj(
    {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}$"}})}}


@pytest.fixture(scope="module")
def engine(gguf_model):
    path, _ = gguf_model("q8_0", dtype="f32")  # random weights (std 0.2): logits are noise
    return Engine(load(path), ctx=512)


class OpensThinking(Sampler):
    """Samples as usual, except that its first token is <think> (what a real thinking model writes)."""

    def __call__(self, logits, generated):
        return self.open_id if not generated else super().__call__(logits, generated)


def answers(engine, schema, n, think=False, budget=None, constrained=True):
    p = engine.prompt([{"role": "user", "content": "Reply in JSON."}], enable_thinking=think)
    g = Grammar.json_schema(schema)
    OpensThinking.open_id = engine.tokenizer.token_to_id("<think>")
    kind = OpensThinking if think else Sampler
    reqs = [Request(p.ids, kind(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=i)),
                    engine.loaded.stop_ids, 400, p.opened, budget if p.thinks else None,
                    g.matcher(engine.tokenizer, engine.loaded.stop_ids, engine.args.vocab_size) if constrained else None,
                    p.thinks) for i in range(n)]
    out = []
    for events in batch_generate(engine.model, engine.tokenizer, reqs, slots=8):
        done = events[-1]
        assert isinstance(done, Done)
        out.append(("".join(e.text for e in events if isinstance(e, Token) and not e.thinking),
                    "".join(e.text for e in events if isinstance(e, Token) and e.thinking), done))
    return out


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fifty_generations_per_schema_parse_and_validate(engine, name):
    schema = SCHEMAS[name]
    outs = answers(engine, schema, 50)
    for text, _, done in outs:
        assert done.finish_reason == "stop", (text, done)  # the grammar closed, then the stop token
        jsonschema.validate(json.loads(text), schema)
    assert len({t for t, _, _ in outs}) >= 5  # sampled, not one forced answer (enums: 9 possible)


def test_without_the_constraint_the_model_writes_noise(engine):
    outs = answers(engine, SCHEMAS["enums"], 8, constrained=False)

    def valid(text):
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["enums"])
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    assert not any(valid(t) for t, _, _ in outs)


def test_the_thinking_stays_free(engine):
    for text, thinking, done in answers(engine, SCHEMAS["enums"], 8, think=True, budget=6):
        assert done.budget_hit and thinking  # free text, closed by the budget
        jsonschema.validate(json.loads(text), SCHEMAS["enums"])


def test_bad_and_unsupported_schemas_are_refused_with_the_engines_message():
    with pytest.raises(GrammarError, match="Invalid type"):
        Grammar.json_schema({"type": "objec"})
    with pytest.raises(GrammarError, match="Unknown format"):
        Grammar.json_schema({"type": "string", "format": "no-such-format"})
    with pytest.raises(GrammarError, match="not JSON"):
        Grammar.json_schema("{nope")
    with pytest.raises(GrammarError, match="unknown name"):
        Grammar.lark("start: foo")
    with pytest.raises(GrammarError, match="not among the tools"):
        Grammar.tool_call([WEATHER], "nope")


@pytest.fixture(scope="module")
def client(engine):
    srv = make_server(engine, "127.0.0.1", 0, model_id="tiny", parallel=4)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
    srv.shutdown()
    srv.server_close()


def chat(client, seed, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Go."}], seed=seed, temperature=1.0, max_tokens=300,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **kw)


def test_response_format_on_the_server(client):
    schema = SCHEMAS["nested"]
    for seed in range(6):
        r = chat(client, seed, response_format={"type": "json_schema", "json_schema": {
            "name": "user", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        # any object: a random model's free keys may run to max_tokens, but what it writes is an object
        r = chat(client, seed, response_format={"type": "json_object"})
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), (text, finish)
        r = chat(client, seed, response_format={"type": "json_object", "schema": SCHEMAS["array"]})  # llama-server's
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["array"])
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=300, seed=1,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "e", "schema": SCHEMAS["enums"]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enums"])
    for bad, needle in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}},
                         "Invalid type"),
                        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                         "format": "bogus"}}},
                         "Unknown format"),
                        ({"type": "yaml"}, "response_format")):
        with pytest.raises(openai.BadRequestError, match=needle):
            chat(client, 0, response_format=bad)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_parse_and_validate(client, choice):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    names = set()
    for seed in range(20):
        r = chat(client, seed, tools=[WEATHER, TIME], tool_choice=choice)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        call = c.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), params[call.name])
        names.add(call.name)
    assert names == ({"get_time"} if isinstance(choice, dict) else {"get_time", "get_weather"})
    with pytest.raises(openai.BadRequestError, match="cannot both"):
        chat(client, 0, tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})


def test_the_api_and_run_take_a_schema_or_a_grammar(engine, gguf_model, tmp_path):
    schema = SCHEMAS["patterns"]
    r = generate(engine, "Go.", think=False, max_tokens=200, seed=3, schema=schema)
    jsonschema.validate(json.loads(r.text), schema)
    r = generate(engine, "Go.", think=False, max_tokens=20, seed=3, grammar='start: "yes" | "no"')
    assert r.text in ("yes", "no") and r.finish_reason == "stop"
    path, _ = gguf_model("q8_0", dtype="f32")
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "maybe " NUM\nNUM: /[0-9]{2}/\n')
    (tmp_path / "bad.json").write_text('{"type": "objec"}')

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qwen3cli", "run", str(path), "Go.", "--no-think", "-n", "200",
                               "--seed", "5", "--ctx", "512", "--json", *args], capture_output=True, text=True)

    out = run("--json-schema", str(tmp_path / "s.json"))
    jsonschema.validate(json.loads(json.loads(out.stdout)["answer"]), schema)
    out = run("--grammar", str(tmp_path / "g.lark"))
    assert json.loads(out.stdout)["answer"].startswith("maybe ")
    bad = run("--json-schema", str(tmp_path / "bad.json"))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "bad.json" in lines[0] and "Invalid type" in lines[0], bad.stderr
