"""The OpenAI wire format: request bodies checked and turned into dataclasses, replies shaped
as dicts. Anything a client can get wrong becomes an APIError carrying the HTTP status and
OpenAI's error fields, so the HTTP layer answers it and carries on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Qwen3CliError

ROLES = ("system", "user", "assistant", "tool")
# reasoning_effort -> thinking budget in tokens ("none": no thinking; None: no budget)
REASONING_EFFORT: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": None}
MAX_STOPS = 4


class APIError(Qwen3CliError):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """What the request set; the rest comes from the model's defaults for the turn's mode."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] | None = None  # rendered into the prompt
    parse_tools: bool = False  # turn <tool_call> blocks in the answer into tool_calls
    enable_thinking: bool | None = None
    thinking_budget: int | None = None


@dataclass
class CompletionRequest:
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 16  # OpenAI's default for this endpoint
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


# -- typed getters: each names the parameter it refuses ----------------------------------------

def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, where: str = "") -> Any:
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise _bad(f"'{where}{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", where + name)
    if not lo <= v <= hi:
        raise _bad(f"'{where}{name}' must be between {lo:g} and {hi:g}, got {v!r}", where + name)
    return v


def _bool(body: dict, name: str, where: str = "") -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(f"'{where}{name}' must be true or false, got {v!r}", where + name)
    return v


def _object(body: dict, name: str) -> dict:
    v = body.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"'{name}' must be an object", name)
    return v


def check_model(body: dict, model_id: str) -> None:
    m = body.get("model")
    if m is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(m, str):
        raise _bad("'model' must be a string", "model")
    if m != model_id:
        raise APIError(f"the model '{m}' does not exist; this server serves '{model_id}'", status=404,
                       param="model", code="model_not_found")


def _common(body: dict) -> dict:
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _bad("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs are not supported", "logprobs")
    if body.get("frequency_penalty") not in (None, 0, 0.0):
        raise _bad("frequency_penalty is not supported; use presence_penalty or repetition_penalty",
                   "frequency_penalty")
    top_k = _number(body, "top_k", -1, 1 << 30, integer=True)
    sampling = Sampling(
        temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 0, 1),
        top_k=0 if top_k == -1 else top_k,  # vLLM's "off"
        min_p=_number(body, "min_p", 0, 1), presence_penalty=_number(body, "presence_penalty", -2, 2),
        repeat_penalty=_number(body, "repetition_penalty", 0.01, 10),
        seed=_number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True))
    if sampling.top_p == 0:
        raise _bad("'top_p' must be above 0", "top_p")
    if sampling.seed is not None and sampling.seed < 0:
        sampling.seed &= (1 << 64) - 1  # numpy seeds are unsigned; keep negative seeds reproducible
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    stream = _bool(body, "stream") or False
    usage = _bool(_object(body, "stream_options"), "include_usage", "stream_options.") or False
    return dict(sampling=sampling, stop=stops, stream=stream, include_usage=usage)


# -- chat ---------------------------------------------------------------------------------------

def parse_chat(body: Any, model_id: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_model(body, model_id)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    messages = [_message(i, m) for i, m in enumerate(msgs)]
    common = _common(body)
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    tools, parse_tools = _tools(body)
    kwargs = _object(body, "chat_template_kwargs")
    think = _bool(kwargs, "enable_thinking", "chat_template_kwargs.")
    if think is None:
        think = _bool(body, "enable_thinking")  # DashScope's spelling
    budget = _number(body, "thinking_budget", 0, 1 << 30, integer=True)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort != "none" and effort not in REASONING_EFFORT:
            raise _bad(f"'reasoning_effort' must be one of none, {', '.join(REASONING_EFFORT)}; got {effort!r}",
                       "reasoning_effort")
        if effort == "none":
            if think:
                raise _bad("reasoning_effort 'none' contradicts enable_thinking true", "reasoning_effort")
            think = False
        elif budget is None:
            budget = REASONING_EFFORT[effort]
    return ChatRequest(messages, max_tokens=max_tokens, tools=tools, parse_tools=parse_tools,
                       enable_thinking=think, thinking_budget=budget, **common)


def _text(content: Any, param: str, nullable: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and nullable:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"'{param}[{j}]': only text content parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"'{param}' must be a string or a list of text parts", param)


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"'{where}' must be an object", where)
    role = "system" if m.get("role") == "developer" else m.get("role")
    if role not in ROLES:
        raise _bad(f"'{where}.role' must be one of {', '.join(ROLES)}; got {m.get('role')!r}", f"{where}.role")
    out: dict[str, Any] = {"role": role,
                           "content": _text(m.get("content"), f"{where}.content", nullable=role == "assistant")}
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _bad(f"'{where}.tool_calls' must be a list", f"{where}.tool_calls")
            out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
        reasoning = m.get("reasoning_content")
        if isinstance(reasoning, str):
            out["reasoning_content"] = reasoning
    return out


def _tool_call(where: str, c: Any) -> dict:
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise _bad(f"'{where}' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", where)
    args = f.get("arguments", {})
    if not isinstance(args, (str, dict)):
        raise _bad(f"'{where}.function.arguments' must be a JSON string", f"{where}.function.arguments")
    # the template writes a string through as is and a dict as JSON: both give Qwen's own format
    return {"type": "function", "function": {"name": f["name"], "arguments": args}}


def _tools(body: dict) -> tuple[list[dict] | None, bool]:
    tools = body.get("tools")
    if tools is None or tools == []:
        return None, False
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list", "tools")
    names = []
    for j, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise _bad(f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}",
                       f"tools[{j}]")
        names.append(f["name"])
    choice = body.get("tool_choice", "auto")
    if choice == "none":  # the model is not told about the tools, so it cannot call them
        return None, False
    if choice in ("auto", "required"):
        return tools, True
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise _bad(f"'tool_choice' names '{name}', which is not in 'tools'", "tool_choice")
    return [t for t, n in zip(tools, names) if n == name], True


# -- completions --------------------------------------------------------------------------------

def parse_completion(body: Any, model_id: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if body.get("suffix") is not None:
        raise _bad("'suffix' is not supported", "suffix")
    max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    return CompletionRequest(prompt, max_tokens=16 if max_tokens is None else max_tokens,
                             echo=_bool(body, "echo") or False, **_common(body))


# -- replies ------------------------------------------------------------------------------------

def usage(prompt: int, completion: int, reasoning: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def tool_call_json(call, index: int | None = None) -> dict:
    d = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return d if index is None else {"index": index, **d}
