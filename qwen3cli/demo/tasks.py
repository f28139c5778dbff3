"""The demo model's curriculum: synthetic chats in Qwen3's template, made from a seed.

Four skills, each chosen so that a few-million-parameter model can learn it on a CPU and a
test can grade it:
- repeating a number back: the skill the others build on (copying tokens from the prompt),
  dense in what it teaches, so attention learns to find and copy digits early;
- arithmetic (add / subtract numbers of 2-4 digits): with thinking on, the think block works
  the columns from the right with carries, and the answer follows; with thinking off the
  answer comes at once, so the model must do the sum in one go and is wrong more often;
- tools: given a tool list in the system turn, call the right one with JSON arguments, then
  answer from the `<tool_response>`;
- greetings and questions about itself: say what it is and how to get a real model.
Multi-turn chats put earlier exchanges in front, rendered as the template renders history
(earlier thinking dropped).

A `Sample` is what training needs: the messages and flags the chat template renders into the
prompt, and the `target` text the model should write after it (through `<|im_end|>`). The same
generator with another seed gives the held-out problems the tests grade.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable

END = "<|im_end|>"
# What generation writes when a thinking budget is spent (runtime.generation.BUDGET_NOTE, a
# layer above: tests check the two agree), then </think>; the demo learns to answer after it.
BUDGET_NOTE = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"


@dataclass(frozen=True)
class Sample:
    messages: list[dict]
    target: str  # what follows the generation prompt: "<think>...</think>\n\n" (thinking on), the reply, END
    think: bool  # enable_thinking for the template
    answer: str  # what grading looks for in the reply
    kind: str  # "arith", "echo", "tool_call", "tool_answer", "hello"
    tools: list[dict] | None = field(default=None)


# -- arithmetic ---------------------------------------------------------------------------

ASK = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please work out {a} {op} {b}.",
       "How much is {a} {op} {b}?", "Calculate {a} {op} {b}")


def _columns(a: int, b: int, op: str) -> list[str]:
    """The written method, one line per column from the right."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            expr = f"{x} + {y}" + (" + 1" if carry else "")
            carry, digit = divmod(s, 10)
            lines.append(f"{expr} = {s}, write {digit}" + (", carry 1." if carry else "."))
        else:
            s = x - y - carry
            expr = f"{x} - {y}" + (" - 1" if carry else "")
            if s < 0:
                lines.append(f"{expr} is below 0, borrow: {s + 10}, write {s + 10}.")
                carry = 1
            else:
                lines.append(f"{expr} = {s}, write {s}.")
                carry = 0
    if carry:  # only addition ends with one
        lines.append("Write the carry 1.")
    return lines


def arithmetic(rng: random.Random, think: bool) -> Sample:
    op = rng.choice("+-")
    a, b = (rng.randint(10 ** (n - 1), 10 ** n - 1) for n in (rng.randint(2, 4), rng.randint(2, 4)))
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    question = rng.choice(ASK).format(a=a, b=b, op=op)
    reply = f"{a} {op} {b} = {result}."
    target = reply + END
    if think:
        work = "\n".join([f"I work {a} {op} {b} column by column from the right."] + _columns(a, b, op)
                         + [f"So the result is {result}."])
        target = f"<think>\n{work}\n</think>\n\n" + target
    return Sample([{"role": "user", "content": question}], target, think, str(result), "arith")


# -- repeating ---------------------------------------------------------------------------

ECHO = ("Repeat this number: {n}", "Say {n} back to me.", "Echo {n}", "Please repeat {n}.")


def echo(rng: random.Random, think: bool) -> Sample:
    n = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 12)))
    target = f"{n}{END}"
    if think:
        target = f"<think>\nThe user wants {n} repeated.\n</think>\n\n" + target
    return Sample([{"role": "user", "content": rng.choice(ECHO).format(n=n)}], target, think, n, "echo")


# -- tools --------------------------------------------------------------------------------

CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Berlin", "Nairobi", "Seoul", "Madrid",
          "Denver", "Hanoi", "Dublin", "Quito", "Lagos")
SKIES = ("sunny", "cloudy", "raining", "snowing", "windy", "foggy")
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
WEATHER_ASK = ("What is the weather in {c}?", "How is the weather in {c} today?", "Is it sunny in {c}?",
               "weather {c}")
TIME_ASK = ("What time is it in {c}?", "Tell me the time in {c}.", "Local time in {c}?", "time in {c} please")


def _call(name: str, city: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"city": city}}) + "\n</tool_call>"


def tool_use(rng: random.Random, think: bool) -> list[Sample]:
    """Two samples from one exchange: the call, then the answer from the tool's result."""
    city = rng.choice(CITIES)
    name = rng.choice(("get_weather", "get_time"))
    question = rng.choice(WEATHER_ASK if name == "get_weather" else TIME_ASK).format(c=city)
    tools = rng.sample(TOOLS, len(TOOLS))  # the order must not matter
    if name == "get_weather":
        result = {"city": city, "temperature_c": rng.randint(-15, 38), "sky": rng.choice(SKIES)}
        answer = f"In {city} it is {result['sky']} and {result['temperature_c']} °C."
    else:
        result = {"city": city, "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"}
        answer = f"It is {result['time']} in {city}."
    user = [{"role": "user", "content": question}]
    call = _call(name, city)
    first = call + END
    if think:
        first = f"<think>\nThe user asks about {city}. I call {name} with city {city}.\n</think>\n\n" + first
    called = user + [{"role": "assistant", "content": "",
                      "tool_calls": [{"type": "function",
                                      "function": {"name": name, "arguments": {"city": city}}}]},
                     {"role": "tool", "content": json.dumps(result)}]
    second = answer + END
    if think:
        second = f"<think>\nThe tool answered for {city}. I report it.\n</think>\n\n" + second
    return [Sample(user, first, think, call, "tool_call", tools),
            Sample(called, second, think, answer, "tool_answer", tools)]


# -- about itself -------------------------------------------------------------------------

HELLO = ("hello", "Hi", "hi there", "Hello!", "hey", "Who are you?", "What can you do?", "what are you",
         "Good morning", "Can you help me?")
ABOUT = ("Hello! I am the qwen3cli demo model, a tiny Qwen3 trained on this machine's CPU. I can add and "
         "subtract numbers (try: What is 4821 + 397?) and call tools. For real conversations, run a real Qwen3: "
         "qwen3cli pull Qwen/Qwen3-0.6B-GGUF:Q8_0")


def hello(rng: random.Random, think: bool) -> Sample:
    target = ABOUT + END
    if think:
        target = "<think>\nA greeting. I say what I am and what I can do.\n</think>\n\n" + target
    return Sample([{"role": "user", "content": rng.choice(HELLO)}], target, think, ABOUT, "hello")


def _budget_cut(rng: random.Random, s: Sample) -> Sample:
    """The thinking cut anywhere by a budget, as generation cuts it, and the answer after it."""
    thought, reply = s.target.removeprefix("<think>\n").split("\n</think>\n\n", 1)
    # before a space: generation's cut is a token boundary, and words stay the corpus's tokens
    cut = thought[:rng.choice([i for i, c in enumerate(thought) if c == " "])]
    return Sample(s.messages, f"<think>\n{cut}{BUDGET_NOTE}</think>\n\n{reply}", s.think, s.answer, s.kind, s.tools)


# -- the mix ------------------------------------------------------------------------------

def _with_history(rng: random.Random, s: Sample) -> Sample:
    """Put one or two earlier arithmetic exchanges in front, as a chat's history: their
    thinking is kept in the messages (reasoning_content), and the template drops it."""
    history = []
    for _ in range(rng.randint(1, 2)):
        h = arithmetic(rng, rng.random() < 0.5)
        reply = h.target.removesuffix(END)
        thought = None
        if reply.startswith("<think>\n"):
            thought, reply = reply.removeprefix("<think>\n").split("\n</think>\n\n", 1)
        msg = {"role": "assistant", "content": reply}
        if thought is not None:
            msg["reasoning_content"] = thought
        history += h.messages + [msg]
    return Sample(history + s.messages, s.target, s.think, s.answer, s.kind, s.tools)


def samples(seed: int):
    """An endless stream of samples, the same for the same seed."""
    rng = random.Random(seed)
    while True:
        think = rng.random() < 0.5
        r = rng.random()  # tool chats are long (the tools' JSON): an eighth of the draws, a third of the tokens
        if r < 0.55:
            batch = [arithmetic(rng, think)]
            if think and rng.random() < 0.1:
                batch = [_budget_cut(rng, batch[0])]
        elif r < 0.8:
            batch = [echo(rng, think)]
        elif r < 0.92:
            batch = tool_use(rng, think)
        else:
            batch = [hello(rng, think)]
        for s in batch:
            yield _with_history(rng, s) if s.kind != "tool_answer" and rng.random() < 0.15 else s


def echoes(seed: int):
    """An endless stream of repeat-this-number samples: training starts on these alone, so
    that attention learns to copy from the prompt before anything needs it."""
    rng = random.Random(seed)
    while True:
        yield echo(rng, rng.random() < 0.5)


HELD_OUT_SEED = 7  # the problems accuracy is measured on: training draws from another seed's stream


def held_out(kind: str, think: bool, n: int, seed: int = HELD_OUT_SEED) -> list[Sample]:
    """The first n samples of one kind and thinking mode from another seed's stream."""
    rng = random.Random(seed)
    make = {"arith": lambda: [arithmetic(rng, think)], "hello": lambda: [hello(rng, think)],
            "echo": lambda: [echo(rng, think)],
            "tool_call": lambda: tool_use(rng, think)[:1], "tool_answer": lambda: tool_use(rng, think)[1:]}[kind]
    out: list[Sample] = []
    while len(out) < n:
        out += make()
    return out


def reply_of(text: str) -> str:
    """The answer part of a generated turn: after the think block, without the end token."""
    return text.rsplit("</think>", 1)[-1].replace(END, "").strip()


def graded(reply: str, s: Sample) -> bool:
    """Whether a reply (the answer without its thinking) gets the sample right."""
    if s.kind == "arith":
        numbers = re.findall(r"-?\d+", reply.replace(",", ""))
        return bool(numbers) and numbers[-1] == s.answer
    if s.kind == "tool_call":
        m = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", reply, re.S)
        try:
            return m is not None and json.loads(m.group(1)) == json.loads(s.answer.split("\n")[1])
        except ValueError:
            return False
    return reply.strip() == s.answer


def accuracy(reply: Callable[[Sample], str], kind: str, think: bool, n: int, seed: int = HELD_OUT_SEED) -> float:
    """The fraction of n held-out problems `reply` gets right; reply(sample) is the model's
    generated turn for sample.messages (thinking and all, or the answer alone)."""
    return sum(graded(reply_of(reply(s)), s) for s in held_out(kind, think, n, seed)) / n


def chat_text(n: int, seed: int = HELD_OUT_SEED) -> str:
    """n held-out chats rendered whole (prompt and reply), one after another: a text in the
    demo's own distribution, for perplexity and KL (`qwen3cli eval --text`)."""
    from ..text.chat_template import ChatTemplate

    template = ChatTemplate(None)
    return "".join(template.render(s.messages, enable_thinking=s.think, tools=s.tools) + s.target + "\n"
                   for s in itertools.islice(samples(seed), n))
