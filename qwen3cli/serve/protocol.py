"""The OpenAI wire format: request bodies checked and turned into dataclasses, replies shaped
as dicts. Anything a client can get wrong becomes an APIError carrying the HTTP status and
OpenAI's error fields, so the HTTP layer answers it and carries on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import Qwen3CliError
from ..sampler import Overrides as Sampling  # what the request set
from ..text.grammar import Grammar, GrammarError

ROLES = ("system", "user", "assistant", "tool")
# reasoning_effort -> thinking budget in tokens ("none": no thinking; None: no budget)
REASONING_EFFORT: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": None}
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on chat; vLLM's default on completions too


class APIError(Qwen3CliError):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


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
    grammar: Grammar | None = None  # the answer's: response_format, or a forced tool call
    logprobs: int | None = None  # the answer tokens' log-probabilities, with this many top ones
    reasoning_logprobs: bool = False  # the thinking tokens' too (logprobs.reasoning_content)


@dataclass
class CompletionRequest:
    prompt: str | list[int]  # text, or token ids (as lm-eval's local-completions sends)
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 16  # OpenAI's default for this endpoint
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    grammar: Grammar | None = None
    logprobs: int | None = None  # each token's log-probability with this many top ones (the prompt's too with echo)


# -- the body ----------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as JSON, strictly: UTF-8, no NaN or Infinity, nested at most `max_depth` deep
    (json.loads and the chat template both recurse), no unpaired surrogates (they cannot be
    tokenized or written back out)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if _depth(raw) > max_depth:
        raise _too_deep(max_depth)
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError("the request body has an unpaired surrogate escape (\\ud800-\\udfff)",
                           code="invalid_json") from None
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _too_deep(max_depth: int) -> APIError:
    return APIError(f"the request body is nested more than {max_depth} deep", code="invalid_json")


def _depth(raw: bytes) -> int:
    """How deep valid JSON text nests: brackets outside strings, counted at C speed (a walk of
    the parsed value in Python would take seconds on a body of many tiny arrays). Only for text
    json.loads accepted: there every string closes, which keeps the string pattern linear."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, np.uint8)
    return int(np.cumsum(np.where((a == ord("[")) | (a == ord("{")), 1, -1)).max())


# -- typed getters: each names the parameter it refuses ----------------------------------------

def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(message, param=param, code=code)


def _shown(v: Any, limit: int = 60) -> str:
    """A client's value quoted in an error, cut short (it could be megabytes)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, where: str = "") -> Any:
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise _bad(f"'{where}{name}' must be {'an integer' if integer else 'a number'}, got {_shown(v)}", where + name)
    if not lo <= v <= hi:
        raise _bad(f"'{where}{name}' must be between {lo:g} and {hi:g}, got {_shown(v)}", where + name)
    return v


def _bool(body: dict, name: str, where: str = "") -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(f"'{where}{name}' must be true or false, got {_shown(v)}", where + name)
    return v


def _object(body: dict, name: str, where: str = "") -> dict:
    v = body.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"'{where}{name}' must be an object", where + name)
    return v


def _string(body: dict, name: str, where: str = "") -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise _bad(f"'{where}{name}' must be a string, got {_shown(v)}", where + name)
    return v


def check_model(body: dict, model_id: str) -> None:
    m = body.get("model")
    if m is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(m, str):
        raise _bad("'model' must be a string", "model")
    if m != model_id:
        raise APIError(f"the model {_shown(m)} does not exist; this server serves '{model_id}'", status=404,
                       param="model", code="model_not_found")


def _common(body: dict) -> dict:
    if _number(body, "n", 0, 1 << 30, integer=True) not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    grammar = _response_format(body.get("response_format"))
    if _number(body, "frequency_penalty", -2, 2) not in (None, 0):
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
    return dict(sampling=sampling, stop=stops, stream=stream, include_usage=usage, grammar=grammar)


def _response_format(fmt: Any) -> Grammar | None:
    """OpenAI's response_format (json_object; json_schema with its schema), and llama-server's
    json_object with a "schema"; the grammar is compiled and checked here, so a schema the
    engine refuses is a 400 with its message."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                   "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", "response_format")
    try:
        if fmt["type"] == "text":
            return None
        if fmt["type"] == "json_object":
            schema = _object(fmt, "schema", "response_format.")
            return Grammar.json_schema(schema, "response_format.schema") if schema else Grammar.json_object()
        spec = _object(fmt, "json_schema", "response_format.")
        _bool(spec, "strict", "response_format.json_schema.")
        schema = _object(spec, "schema", "response_format.json_schema.")
        return Grammar.json_schema(schema or {"type": "object"}, "response_format.json_schema.schema")
    except GrammarError as e:
        raise _bad(str(e), "response_format") from None


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
    # every spelling is checked, also the ones another one overrides
    max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True) or max_tokens
    tools, parse_tools, forced = _tools(body)
    if forced is not None:
        if common["grammar"] is not None:
            raise _bad("'response_format' and a forced tool call ('tool_choice') cannot both shape the answer",
                       "response_format")
        try:
            common["grammar"] = Grammar.tool_call(tools, None if forced == "required" else forced["name"])
        except GrammarError as e:
            raise _bad(str(e), "tools") from None
    kwargs = _object(body, "chat_template_kwargs")
    think = _bool(body, "enable_thinking")  # DashScope's spelling
    think = _bool(kwargs, "enable_thinking", "chat_template_kwargs.") if "enable_thinking" in kwargs else think
    budget = _number(body, "thinking_budget", 0, 1 << 30, integer=True)
    effort = _string(body, "reasoning_effort")
    if effort is not None:
        if effort != "none" and effort not in REASONING_EFFORT:
            raise _bad(f"'reasoning_effort' must be one of none, {', '.join(REASONING_EFFORT)}; "
                       f"got {_shown(effort)}", "reasoning_effort")
        if effort == "none":
            if think:
                raise _bad("reasoning_effort 'none' contradicts enable_thinking true", "reasoning_effort")
            think = False
        elif budget is None:
            budget = REASONING_EFFORT[effort]
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    reasoning_logprobs = _bool(body, "reasoning_logprobs") or False
    if reasoning_logprobs and not logprobs:
        raise _bad("'reasoning_logprobs' needs 'logprobs': true", "reasoning_logprobs")
    return ChatRequest(messages, max_tokens=max_tokens, tools=tools, parse_tools=parse_tools,
                       enable_thinking=think, thinking_budget=budget, logprobs=(top or 0) if logprobs else None,
                       reasoning_logprobs=reasoning_logprobs, **common)


def _text(content: Any, param: str, nullable: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and nullable:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"'{where}' must be a text part, {{\"type\": \"text\", \"text\": ...}}", where)
            if part.get("type") != "text":
                raise _bad(f"'{where}.type': only text content parts are supported", f"{where}.type")
            if not isinstance(part.get("text"), str):
                raise _bad(f"'{where}.text' must be a string", f"{where}.text")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"'{param}' must be a string or a list of text parts", param)


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"'{where}' must be an object", where)
    role = _string(m, "role", where + ".")
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise _bad(f"'{where}.role' must be one of {', '.join(ROLES)}; got {_shown(m.get('role'))}", f"{where}.role")
    out: dict[str, Any] = {"role": role,
                           "content": _text(m.get("content"), f"{where}.content", nullable=role == "assistant")}
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _bad(f"'{where}.tool_calls' must be a list", f"{where}.tool_calls")
            out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
        reasoning = _string(m, "reasoning_content", where + ".")
        if reasoning is not None:
            out["reasoning_content"] = reasoning
    return out


def _function_type(d: dict, where: str) -> None:
    if d.get("type", "function") != "function":
        raise _bad(f"'{where}.type' must be \"function\", got {_shown(d.get('type'))}", f"{where}.type")


def _name(f: dict, where: str) -> str:
    name = _string(f, "name", where + ".")
    if not name:
        raise _bad(f"'{where}.name' must be a non-empty string", f"{where}.name")
    return name


def _tool_call(where: str, c: Any) -> dict:
    if not isinstance(c, dict):
        raise _bad(f"'{where}' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", where)
    _function_type(c, where)
    _string(c, "id", where + ".")
    f = c.get("function")
    if not isinstance(f, dict):
        raise _bad(f"'{where}.function' must be an object with a name and arguments", f"{where}.function")
    name = _name(f, f"{where}.function")
    args = f.get("arguments", {})
    if not isinstance(args, (str, dict)):
        raise _bad(f"'{where}.function.arguments' must be a JSON string", f"{where}.function.arguments")
    # the template writes a string through as is and a dict as JSON: both give Qwen's own format
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _tools(body: dict) -> tuple[list[dict] | None, bool, str | dict | None]:
    """The tools the template shows, whether to parse tool calls, and the forced choice
    ("required" or {"name": ...}; None for auto / none)."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("'tools' must be a list", "tools")
    names = [_tool(f"tools[{j}]", t) for j, t in enumerate(tools or [])]
    choice = _tool_choice("auto" if body.get("tool_choice") is None else body["tool_choice"])
    if not names or choice == "none":  # the model is not told about the tools, so it cannot call them
        if isinstance(choice, dict) or choice == "required":
            raise _bad("'tool_choice' asks for a tool call, but there are no 'tools'", "tool_choice")
        return None, False, None
    if choice in ("auto", "required"):
        return tools, True, None if choice == "auto" else choice
    if choice["name"] not in names:
        raise _bad(f"'tool_choice' names {_shown(choice['name'])}, which is not in 'tools'", "tool_choice")
    return [t for t, n in zip(tools, names) if n == choice["name"]], True, choice


def _tool(where: str, t: Any) -> str:
    """A tool's definition (the template shows it to the model as JSON); its name."""
    if not isinstance(t, dict) or "function" not in t:
        raise _bad(f"'{where}' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", where)
    _function_type(t, where)
    if not isinstance(t["function"], dict):
        raise _bad(f"'{where}.function' must be an object with a name", f"{where}.function")
    f, fw = t["function"], f"{where}.function"
    _string(f, "description", fw + ".")
    _object(f, "parameters", fw + ".")
    _bool(f, "strict", fw + ".")
    return _name(f, fw)


def _tool_choice(choice: Any) -> str | dict:
    """none, auto or required; or {"name": ...} for one named function."""
    if choice in ("none", "auto", "required"):
        return choice
    if not isinstance(choice, dict):
        raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}", "tool_choice")
    _function_type(choice, "tool_choice")
    if not isinstance(choice.get("function"), dict):
        raise _bad("'tool_choice.function' must be an object with a name", "tool_choice.function")
    return {"name": _name(choice["function"], "tool_choice.function")}


# -- completions --------------------------------------------------------------------------------

def parse_completion(body: Any, model_id: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids) or not prompt:
        raise _bad("'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")
    if body.get("suffix") is not None:
        raise _bad("'suffix' is not supported", "suffix")
    echo = _bool(body, "echo") or False
    # max_tokens 0 with echo: score the prompt only (OpenAI's and vLLM's idiom for loglikelihood)
    max_tokens = _number(body, "max_tokens", 0 if echo else 1, 1 << 30, integer=True)
    if body.get("top_logprobs") is not None:
        raise _bad("'top_logprobs' is for chat; on completions 'logprobs' is the number of top tokens",
                   "top_logprobs")
    return CompletionRequest(prompt, max_tokens=16 if max_tokens is None else max_tokens,
                             echo=echo,
                             logprobs=_number(body, "logprobs", 0, MAX_TOP_LOGPROBS, integer=True), **_common(body))


# -- replies ------------------------------------------------------------------------------------

def usage(prompt: int, completion: int, reasoning: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def tool_call_json(call, index: int | None = None) -> dict:
    d = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return d if index is None else {"index": index, **d}
