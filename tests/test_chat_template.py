"""Our sandboxed rendering equals transformers' apply_chat_template; hostile templates are bounded."""

import json
import time
from pathlib import Path

import pytest
import transformers

from qwen3cli.text.chat_template import ChatTemplate, TemplateError, builtin_template

DATA = Path(__file__).parent / "data"
TEMPLATES = sorted((DATA / "templates").glob("*.jinja"))
EXPECTED = json.loads((DATA / "expected_encodings.json").read_text())
SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
    "multi_turn_thinking_history": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
        {"role": "user", "content": "ünïcödé 😀 /no_think"}],
    "tool_roundtrip": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"}],
}


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(DATA.parent.parent / "qwen3cli" / "data" / "qwen3-tokenizer")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [True, False, None])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_matches_transformers(hf_tok, template, conv, thinking, tools):
    src = template.read_text(encoding="utf-8")
    kw = {} if thinking is None else {"enable_thinking": thinking}
    want = hf_tok.apply_chat_template(CONVERSATIONS[conv], chat_template=src, tools=tools, tokenize=False,
                                      add_generation_prompt=True, **kw)
    got = ChatTemplate(src, SPECIAL).render(CONVERSATIONS[conv], tools=tools, add_generation_prompt=True, **kw)
    assert got == want


def test_stored_official_renders():
    t = ChatTemplate(None, SPECIAL)  # the built-in template is the official one
    assert t.builtin and t.source == (DATA / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    for r in EXPECTED["chat_renders"]:
        kw = {} if r["enable_thinking"] is None else {"enable_thinking": r["enable_thinking"]}
        assert t.render(r["messages"], tools=r.get("tools"), add_generation_prompt=r["add_generation_prompt"], **kw) == r["text"]


def test_builtin_is_packaged():
    assert "enable_thinking" in builtin_template()


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ [1] * 10**8 }}",
    "{{ 'a'.ljust(10**9) }}",
    "{{ 'a'|center(10**9) }}",
    "{{ lipsum(10**7) }}",
    "{{ 7 ** 100000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for m in messages * 100000 %}{% for n in messages * 100000 %}{% endfor %}{% endfor %}",
    "{{ raise_exception('no') }}",
    "{% for x in %}",
])
def test_hostile_templates_are_refused_or_bounded(src):
    t0 = time.monotonic()
    with pytest.raises(TemplateError):
        ChatTemplate(src, where="evil.gguf").render([{"role": "user", "content": "hi"}] * 20)
    assert time.monotonic() - t0 < 10


def test_output_is_capped():
    src = "{% for i in range(900000) %}{{ messages[0].content }}{% endfor %}"
    with pytest.raises(TemplateError, match="exceeds"):
        ChatTemplate(src).render([{"role": "user", "content": "x" * 100}])


@pytest.mark.parametrize("name,mode", [("Qwen-Qwen3-0.6B", "hybrid"), ("Qwen-Qwen3-0.6B.2025-04-original.llama-cpp", "hybrid"),
                                       ("Qwen-Qwen3-4B-Instruct-2507", "never"), ("Qwen-Qwen3-4B-Thinking-2507", "always")])
def test_thinking_mode_detected(name, mode):
    assert ChatTemplate((DATA / "templates" / f"{name}.jinja").read_text()).thinking_mode() == mode
