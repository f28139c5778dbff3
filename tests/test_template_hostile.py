"""Hostile chat templates (issue 13, class 4): every attack ends in a one-line TemplateError within
the time budget and a bounded amount of memory, and the budget never changes what a template renders.

The attacks run in one child process under an address-space limit, each measured there with
tracemalloc: without the budget, the first of them would take gigabytes of this machine.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from checkpoints import TOKENIZER
from hostile import clean_error, run_cli
from qwen3cli.text import template_budget
from qwen3cli.text.chat_template import ChatTemplate, TemplateError, _tojson

DEADLINE = 1.0  # seconds, for these tests (the real one is template_budget.DEADLINE_S)
SLACK = 2.0  # one bounded step after the deadline, on a loaded machine
PEAK_MB = 128  # refused before the allocation: what the attack built before its big step
BUDGET_PEAK_MB = 400  # attacks on the memory budget: MAX_MEMORY (256 MB), the step that passes it, their inputs
CHILD_LIMIT = 2 << 30  # the child's address space: enough for the budget, not for an attack

NS = "{% set ns = namespace(s='ab', l=[1], t=(1,), n=3) %}"
R1000 = "{% set r = range(1000)|list %}"
ATTACKS = {
    # time: loops that output nothing and call nothing, recursion, filters that run long
    "four silent loops": R1000 + "{% for a in r %}{% for b in r %}{% for c in r %}{% for d in r %}"
                                 "{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
    "loop filter that never passes": "{% set big = range(1000000)|list %}"
                                     "{% for a in [-1] if a not in big recursive %}{{ loop(big) }}{% endfor %}",
    "macro doubling": "{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% else %}x{% endif %}{% endmacro %}"
                      "{{ d(40) }}",
    "linked list growth": NS + "{% for i in range(1000000) %}{% set ns.l = [ns.l, i] %}{% endfor %}",
    "sum of lists": "{{ ([[1]] * 1000000)|sum(start=[]) }}",
    "striptags, quadratic": "{{ ('<>' * 5000000)|striptags }}",
    "title of 16 MB": "{{ ('a ' * 8000000)|title }}",
    "urlize of 16 MB": "{{ ('a ' * 8000000)|urlize }}",
    "punycode": "{{ '" + "".join(chr(0x100 + i * 7919 % 0xD000) for i in range(20000)) + "'.encode('punycode') }}",
    # size: one step that would build gigabytes
    "printf width, filter": "{{ '%1000000000s'|format('x') }}",
    "printf width, operator": "{{ '%1000000000s' % 'x' }}",
    "printf width from *": "{{ '%*s' % (1000000000, 'x') }}",
    "printf key with parentheses": "{{ '%(a(b))1000000000s' % {'a(b)': 1} }}",
    "printf keys repeated": NS + "{% set ns.s = 'x' * 1000000 %}{{ ('%(s)s' * 1000) % {'s': ns.s} }}",
    "str.format width": "{{ '{:>1000000000}'.format('x') }}",
    "format_map width": "{{ '{a:>1000000000}'.format_map({'a': 'x'}) }}",
    "str.format nested width": "{{ '{:>{}}'.format('x', 1000000000) }}",
    "str.format many fields": NS + "{% set ns.s = 'x' * 1000000 %}{{ ('{0}' * 1000).format(ns.s) }}",
    "str.format !r": "{{ '{0!r}'.format('\\x00' * 10000000) }}",
    "~ doubling": NS + "{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "+ doubling a string": NS + "{% for i in range(31) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "+ doubling a list": NS + "{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "{% set %} block doubling": NS + "{% for i in range(40) %}{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}"
                                     "{% set ns.s = x %}{% endfor %}",
    "{% set %} block of a literal": "{% set x %}{% for i in range(1000000) %}" + "A" * 1000
                                    + "{% endfor %}{% endset %}",
    "* on a string": "{{ 'a' * 1000000 * 1000 }}",
    "* on a list": "{{ [[1] * 1000000] * 1000 }}",
    "integer squaring": NS + "{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "integer powers": NS + "{% for i in range(40) %}{% set ns.n = ns.n ** 64 %}{% endfor %}",
    "center": "{{ 'x'|center(1000000) * 1000 }}",
    "indent by a number": "{{ ('x\\n' * 500000)|indent(1000000) }}",
    "indent by a string": "{{ ('x\\n' * 500000)|indent('x' * 1000000) }}",
    "wordwrap string": "{{ ('a ' * 500000)|wordwrap(1, wrapstring='x' * 100000) }}",
    "truncate end": "{{ ('x' * 10000000)|truncate(100, end='y' * 10000000) }}",
    "ljust doubling": NS + "{% for i in range(100) %}{% set ns.s = ns.s.ljust(1000000) ~ ns.s %}{% endfor %}",
    "rjust, zfill": "{{ 'x'.rjust(1000000).zfill(1000000) * 100 }}",
    "expandtabs": "{{ ('\\t' * 1000000).expandtabs(1000000) }}",
    "replace, method": "{{ ('a' * 1000000).replace('a', 'b' * 1000) }}",
    "replace, filter": "{{ ('a' * 1000000)|replace('a', 'b' * 1000) }}",
    "replace of ''": "{{ ('a' * 1000000).replace('', 'b' * 1000) }}",
    "join, method": "{{ ('x' * 10000).join(['y' * 100] * 100000) }}",
    "join, filter": "{{ (['y' * 100] * 100000)|join('x' * 10000) }}",
    "join of lists": "{{ ([['y' * 1000] * 1000] * 1000)|join }}",
    "batch": "{{ [1]|batch(100000000, 'x')|list }}",
    "slice": "{{ [1]|slice(100000000)|list }}",
    "list of a string": "{{ ('😀' * 16000000)|list|length }}",
    "map over a string": "{{ ('😀' * 16000000)|map('upper')|list|length }}",
    "translate": "{{ ('a' * 1000000).translate({97: 'b' * 1000}) }}",
    "encode namereplace": "{{ ('é' * 16000000).encode('ascii', 'namereplace') }}",
    "split": "{{ ('ab ' * 5000000).split()|length }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "strftime_now": "{{ strftime_now('%c' * 100000) }}",
    "tojson indent": "{{ ([[[[[[1]]]]]] * 100000)|tojson(indent=1000000) }}",
    "tojson ensure_ascii": "{{ ('😀' * 10000000)|tojson(ensure_ascii=true) }}",
    "pprint of a deep list": NS + "{% for i in range(5000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|pprint }}",
    "Markup + escapes": "{{ ('x'|safe) + '&' * 10000000 }}",
    "dict items printed": "{{ dict(a='\\x00' * 5000000).items() }}",
    # nested values that print (compare, hash) as far more than they hold
    "list DAG printed": NS + "{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "list DAG compared": NS + "{% set ns.a = [1] %}{% set ns.b = [1] %}{% for i in range(64) %}"
                              "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
    "tuple DAG hashed": NS + "{% for i in range(64) %}{% set ns.t = (ns.t, ns.t) %}{% endfor %}{{ {ns.t: 1} }}",
    "namespace DAG": NS + "{% for i in range(64) %}{% set ns.n = namespace(a=ns.n, b=ns.n) %}{% endfor %}{{ ns.n }}",
    "namespace DAG built backwards": "{% set ns = namespace(all=[]) %}"
                                     "{% for i in range(64) %}{% set ns.all = ns.all + [namespace(v=0)] %}{% endfor %}"
                                     "{% for i in range(63, 0, -1) %}{% set n = ns.all[i] %}"
                                     "{% set n.v = [ns.all[i - 1], ns.all[i - 1]] %}{% endfor %}{{ ns.all[63] }}",
    "string of a DAG": NS + "{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|string }}",
    # memory: many values, each within the size limits
    "many big slices kept": NS + "{% set ns.s = '😀' * 5000000 %}{% set kept = namespace("
                                 + ", ".join(f"a{i}=ns.s[{i}:]" for i in range(64)) + ") %}",
    "many big copies kept": NS + "{% set ns.s = '😀' * 5000000 %}"
                                 + "".join(f"{{% set v{i} = ns.s.upper() %}}" for i in range(64)),
    "output": "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}",
}
TIME_ATTACKS = {"four silent loops", "loop filter that never passes", "macro doubling", "linked list growth"}
MEMORY_ATTACKS = {"sum of lists", "many big slices kept", "many big copies kept", "linked list growth"}
OUR_WORDS = ("took longer than", "builds", "allocates more than", "exceeds", "too slow", "does not allow",
             "asks lipsum", "passes", "recurses too deeply", "exponent")

CHILD = """
import json, resource, sys, time, tracemalloc
limit, deadline = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from qwen3cli.text import template_budget
template_budget.DEADLINE_S = deadline
from qwen3cli.text.chat_template import ChatTemplate, TemplateError, _tojson
for name, src in json.load(sys.stdin).items():
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        ChatTemplate(src, where="evil").render([{"role": "user", "content": "hi"}])
        outcome = "rendered"
    except TemplateError as e:
        outcome = "TemplateError: " + str(e)
    except BaseException as e:
        outcome = type(e).__name__ + ": " + str(e)[:300]
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(json.dumps([name, outcome, seconds, peak]), flush=True)
"""


@pytest.fixture(scope="module")
def attacked():
    """name -> (outcome, seconds, peak traced MB), all attacks in one child."""
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([CHILD_LIMIT, DEADLINE])], input=json.dumps(ATTACKS), capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).parent.parent)
    results = {}
    for line in p.stdout.splitlines():
        name, outcome, seconds, peak = json.loads(line)
        results[name] = (outcome, seconds, peak)
    results["_stderr"] = p.stderr[-2000:]
    return results


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_in_time_and_memory(attacked, name):
    assert name in attacked, f"the child died before {name}: {attacked['_stderr']}"
    outcome, seconds, peak = attacked[name]
    assert outcome.startswith("TemplateError: evil: chat template "), outcome
    assert any(w in outcome for w in OUR_WORDS), outcome  # the budget's words, not a MemoryError
    assert "\n" not in outcome and len(outcome) < 400
    assert seconds < DEADLINE + SLACK, (seconds, outcome)
    assert peak < (BUDGET_PEAK_MB if name in MEMORY_ATTACKS else PEAK_MB), (peak, outcome)
    if name in TIME_ATTACKS:
        assert "took longer than" in outcome


def test_worst_cases_measured(attacked, capsys):
    """Not a check: prints the slowest and the hungriest attack for the record (pytest -s)."""
    rows = [(n, *v) for n, v in attacked.items() if n != "_stderr"]
    slow, hungry = max(rows, key=lambda r: r[2]), max(rows, key=lambda r: r[3])
    with capsys.disabled():
        print(f"\n{len(rows)} attacks; slowest {slow[0]!r} {slow[2]:.2f} s; hungriest {hungry[0]!r} {hungry[3]:.0f} MB")


def test_error_text_is_cut():
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{{ raise_exception('x' * 10000000) }}").render([])
    assert len(str(e.value)) < 400 and "10000000 characters" in str(e.value)


@pytest.mark.parametrize("src", ["{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "{% if 1 %}" * 300 + "{% endif %}" * 300,
                                 "{{ x }}" * 100000], ids=["parentheses", "ifs", "too long"])
def test_templates_that_cannot_compile_are_one_line_errors(src):
    with pytest.raises(TemplateError) as e:
        ChatTemplate(src, where="evil.gguf")
    assert str(e.value).startswith("evil.gguf: chat template ") and "\n" not in str(e.value)


def test_a_long_conversation_renders_as_transformers_does():
    """The budget leaves room for real chats: 4 MB of history with the real template."""
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    msgs = [{"role": r, "content": ("<think>\nhm\n</think>\n\n" if r == "assistant" else "") + "wörd " * 40000}
            for r in ("user", "assistant") * 10] + [{"role": "user", "content": "last"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(None, {"eos_token": "<|im_end|>"}).render(msgs) == want


# -- generated templates: the budget holds, and never changes what renders -----------------------

STEPS = [
    "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s + ns.s %}", "{% set ns.s = ns.s * K %}",
    "{% set ns.l = ns.l + ns.l %}", "{% set ns.l = ns.l * K %}", "{% set ns.l = [ns.l, ns.l] %}",
    "{% set ns.l = (ns.l, ns.s) %}", "{% set ns.s = '%Ks'|format(ns.s) %}", "{% set ns.s = '%-K.2s' % ns.s %}",
    "{% set ns.s = '{:>K}'.format(ns.s) %}", "{% set ns.s = ns.s|center(K) %}", "{% set ns.s = ns.s|indent(K) %}",
    "{% set ns.s = ns.s.ljust(K) %}", "{% set ns.s = ns.s.replace('a', ns.s) %}", "{% set ns.s = ns.s|replace('\\n', ns.s) %}",
    "{% set ns.s = ns.l|join(ns.s) %}", "{% set ns.s = ns.s.join(ns.l|map('string')) %}", "{% set ns.l = ns.s|list %}",
    "{% set ns.s = ns.l|string %}", "{% set ns.s = ns.l|tojson(indent=K) %}", "{% set ns.n = ns.n * ns.n %}",
    "{% set ns.s = ns.s.expandtabs(K) %}", "{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = x %}",
    "{% set ns.l = ns.l|batch(K)|list %}", "{% set ns.s = ns.s[1:] ~ ns.s[:K] %}", "{% set ns.l = ns.s.split('a') %}",
    "{{ ns.s }}", "{{ ns.l }}", "{{ ns.n }}", "{% set ns.b = ns.l == ns.l2 %}{% set ns.l2 = ns.l %}",
]


@st.composite
def templates(draw):
    steps = draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=6))
    body = "".join(s.replace("K", str(draw(st.sampled_from([10**6, 4096, 64, 3, 1, 0])))) for s in steps)
    for _ in range(draw(st.integers(0, 3))):
        body = f"{{% for i in range({draw(st.sampled_from([40, 1000, 8, 2, 1]))}) %}}{body}{{% endfor %}}"
    return "{% set ns = namespace(s='a\\tb\\n', l=['a', 1], l2=[], n=3, b=0) %}" + body


def _plain(src):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    return env.from_string(src).render(messages=[], tools=None, documents=None, add_generation_prompt=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(templates())
def test_generated_templates_stay_in_budget(src):
    import tracemalloc

    saved, template_budget.DEADLINE_S = template_budget.DEADLINE_S, 0.5
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = ChatTemplate(src).render([])
    except TemplateError as e:
        out, err = None, str(e)
        assert any(w in err for w in OUR_WORDS) or "error:" in err or "failed:" in err, err
        assert "MemoryError" not in err
    finally:
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        template_budget.DEADLINE_S = saved
    assert seconds < 0.5 + SLACK and peak < BUDGET_PEAK_MB, (seconds, peak, src)
    if out is not None:  # what the budget lets through renders exactly as jinja renders it
        assert out == _plain(src)


# -- through the CLI: a model whose template hangs or explodes is one error line ------------------

@pytest.mark.parametrize("attack", ["~ doubling"])
def test_cli_refuses_a_model_whose_template_is_hostile(ckpt, tmp_path, attack):
    hf, _ = ckpt()
    model = tmp_path / "model"
    shutil.copytree(hf, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ATTACKS[attack]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    r = run_cli("run", model, "hi", "-n", "1", timeout=120)
    clean_error(r, "chat template")
    assert r.peak_mb < 2048, r.peak_mb
