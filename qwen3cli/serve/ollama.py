"""ollama's API over the same engine: /api/chat and /api/generate read into the OpenAI side's
requests (protocol.py), so both APIs sample, think and stop alike; the replies are shaped as
ollama's (NDJSON streams, `message.thinking`, durations in nanoseconds, `{"error": "..."}`).

What does not map is refused with a 400 naming it, never ignored in silence, except the
options that only tell ollama how to load a model (threads, GPU layers, mmap...): this server
loaded its model once, at start."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ..text.grammar import Grammar, GrammarError
from .protocol import (
    REASONING_EFFORT,
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    _bool,
    _message,
    _number,
    _object,
    _shown,
    _string,
    _tools,
)

# ollama's options that choose how a model is loaded and run; the server's own flags decide those
LOAD_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                          "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep"})
# sampling options we do not vary, and the one value each may take: off, or ours (repeat_last_n)
FIXED_OPTIONS = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "frequency_penalty": 0.0, "penalize_newline": False,
                 "repeat_last_n": 64}
MAX_STOPS = 16


@dataclass
class Parsed:
    """An ollama request read into ours. `req` None: a bare load request (no prompt or messages),
    which ollama answers with done_reason "load"."""
    req: ChatRequest | CompletionRequest | None
    num_ctx: int | None = None
    stream: bool = True  # ollama streams unless told not to


def name_of(model_id: str) -> str:
    """The model's name as ollama lists it: with a tag."""
    return model_id if ":" in model_id else f"{model_id}:latest"


def check_model(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    m = body.get("model", body.get("name"))  # older clients' /api/show sends "name"
    if not isinstance(m, str) or not m:
        raise APIError("model is required")
    if m not in (model_id, name_of(model_id)):
        raise APIError(f"model {_shown(m)} not found; this server serves '{name_of(model_id)}'", status=404)


def _options(body: dict) -> dict:
    o = _object(body, "options")
    unknown = sorted(set(o) - LOAD_OPTIONS - set(FIXED_OPTIONS) - {
        "temperature", "top_p", "top_k", "min_p", "num_predict", "num_ctx", "seed", "stop", "repeat_penalty",
        "presence_penalty"})
    if unknown:
        raise APIError(f"unknown option {_shown(unknown[0])}", param=f"options.{unknown[0]}")
    for name, only in FIXED_OPTIONS.items():
        if o.get(name) is not None and (o[name] != only or isinstance(o[name], bool) != isinstance(only, bool)):
            raise APIError(f"option {name} can only be {json.dumps(only)} here, got {_shown(o[name])}",
                           param=f"options.{name}")
    w = "options."
    top_k = _number(o, "top_k", 0, 1 << 30, integer=True, where=w)
    sampling = Sampling(temperature=_number(o, "temperature", 0, 2, where=w), top_p=_number(o, "top_p", 0, 1, where=w),
                        top_k=top_k, min_p=_number(o, "min_p", 0, 1, where=w),
                        presence_penalty=_number(o, "presence_penalty", -2, 2, where=w),
                        repeat_penalty=_number(o, "repeat_penalty", 0.01, 10, where=w),
                        seed=_number(o, "seed", -(1 << 63), (1 << 64) - 1, integer=True, where=w))
    if sampling.top_p == 0:
        raise APIError("'options.top_p' must be above 0", param="options.top_p")
    if sampling.seed is not None and sampling.seed < 0:
        # ollama's -1 is "random", as an absent seed
        sampling.seed = None if sampling.seed == -1 else sampling.seed & ((1 << 64) - 1)
    n = _number(o, "num_predict", -2, 1 << 30, integer=True, where=w)
    if n == 0:
        raise APIError("'options.num_predict' must be -1 (no limit), -2 (fill the context) or at least 1",
                       param="options.num_predict")
    stop = o.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(f"'options.stop' must be a list of up to {MAX_STOPS} non-empty strings", param="options.stop")
    return dict(sampling=sampling, max_tokens=n if n and n > 0 else None, stop=stops,
                num_ctx=_number(o, "num_ctx", 1, 1 << 30, integer=True, where=w))


def _format(fmt: Any) -> Grammar | None:
    """ollama's format: "json", or a JSON schema."""
    if fmt in (None, ""):
        return None
    try:
        if fmt == "json":
            return Grammar.json_object()
        if isinstance(fmt, dict):
            return Grammar.json_schema(fmt, "format")
    except GrammarError as e:
        raise APIError(str(e), param="format") from None
    raise APIError("'format' must be \"json\" or a JSON schema object", param="format")


def _think(body: dict) -> tuple[bool | None, int | None]:
    """think: true | false, or gpt-oss's "low" | "medium" | "high" (a thinking budget here)."""
    t = body.get("think")
    if t is None or isinstance(t, bool):
        return t, None
    if t in ("low", "medium", "high"):
        return True, REASONING_EFFORT[t]
    raise APIError(f"'think' must be true, false, \"low\", \"medium\" or \"high\"; got {_shown(t)}", param="think")


def _logprobs(body: dict) -> int | None:
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    return (top or 0) if _bool(body, "logprobs") else None


def _refuse(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, "", [], False):
            raise APIError(f"'{name}' is not supported by this server", param=name)


def _messages(msgs: Any) -> list[dict]:
    if not isinstance(msgs, list):
        raise APIError("'messages' must be a list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        if m.get("images"):
            raise APIError(f"'messages[{i}].images': images are not supported", param=f"messages[{i}].images")
        m = {k: v for k, v in m.items() if k not in ("images", "tool_name", "thinking")}
        msg = _message(i, m)
        thinking = msgs[i].get("thinking")
        if thinking is not None:
            if not isinstance(thinking, str):
                raise APIError(f"'messages[{i}].thinking' must be a string", param=f"messages[{i}].thinking")
            if msg["role"] == "assistant":
                msg["reasoning_content"] = thinking  # the template drops or keeps it, as for OpenAI's
        out.append(msg)
    return out


def parse_chat(body: Any, model_id: str) -> Parsed:
    check_model(body, model_id)
    msgs = _messages(body.get("messages", []))
    stream = _bool(body, "stream")
    opts = _options(body)
    think, budget = _think(body)
    tools, parse_tools, _ = _tools({"tools": body.get("tools")})
    if not msgs:
        return Parsed(None, stream=stream is not False)
    req = ChatRequest(msgs, sampling=opts["sampling"], max_tokens=opts["max_tokens"], stop=opts["stop"],
                      tools=tools, parse_tools=parse_tools, enable_thinking=think, thinking_budget=budget,
                      grammar=_format(body.get("format")), logprobs=_logprobs(body))
    return Parsed(req, opts["num_ctx"], stream is not False)


def parse_generate(body: Any, model_id: str) -> Parsed:
    check_model(body, model_id)
    _refuse(body, "images", "context", "template", "suffix")
    prompt = _string(body, "prompt") or ""
    system = _string(body, "system")
    raw = _bool(body, "raw") or False
    stream = _bool(body, "stream") is not False
    opts = _options(body)
    think, budget = _think(body)
    grammar = _format(body.get("format"))
    logprobs = _logprobs(body)
    if not prompt:
        return Parsed(None, stream=stream)
    if raw:  # the prompt as it is, no template: our /v1/completions
        if system:
            raise APIError("'system' needs the template; with 'raw' put it in the prompt", param="system")
        req: ChatRequest | CompletionRequest = CompletionRequest(
            prompt, sampling=opts["sampling"], max_tokens=opts["max_tokens"] or (1 << 30), stop=opts["stop"],
            grammar=grammar, logprobs=logprobs)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        req = ChatRequest(msgs, sampling=opts["sampling"], max_tokens=opts["max_tokens"], stop=opts["stop"],
                          enable_thinking=think, thinking_budget=budget, grammar=grammar, logprobs=logprobs)
    return Parsed(req, opts["num_ctx"], stream)


# -- replies ------------------------------------------------------------------------------------

def now() -> str:
    """ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def timings(usage: dict, started: float, first: float | None, ended: float) -> dict:
    """ollama's counts and durations (ns). The prompt's time is until the first piece came out."""
    first = first if first is not None else ended

    def ns(seconds: float) -> int:
        return max(0, int(seconds * 1e9))

    return {"total_duration": ns(ended - started), "load_duration": 0,
            "prompt_eval_count": usage["prompt_tokens"], "prompt_eval_duration": ns(first - started),
            "eval_count": usage["completion_tokens"], "eval_duration": ns(ended - first)}


def done_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # ollama says stop after tool calls too


def tool_call(call) -> dict:
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


@dataclass
class Card:
    """What /api/tags, /api/show and /api/ps say of the served model."""
    name: str
    size: int
    modified_at: str
    digest: str
    details: dict
    model_info: dict
    template: str
    parameters: str
    capabilities: list[str]
    context_length: int
    path: str

    def entry(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details}


def _size_label(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def card(engine, model_id: str) -> Card:
    """Read once, from the loaded model and its file's header (no tensor data)."""
    from ..io.info import read_info

    loaded = engine.loaded
    md = loaded.metadata
    path = loaded.file
    arch = str(md.get("general.architecture", "qwen3"))
    info = read_info(path) if path is not None else None
    size = info.size if info else 0
    mtime = path.stat().st_mtime if path is not None else time.time()
    # an identifier of this file (path, size, time), not a hash of its gigabytes
    digest = hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()
    details = {"parent_model": "", "format": "gguf" if path is not None else "safetensors", "family": arch,
               "families": [arch], "parameter_size": _size_label(info.n_params) if info else "",
               "quantization_level": (info.file_type or "") if info else ""}
    # the scalar keys (ollama's own leaves the token lists out too)
    model_info = {k: v for k, v in md.items()
                  if isinstance(v, (str, int, float, bool)) and k != "tokenizer.chat_template"}
    if info:
        model_info["general.parameter_count"] = info.n_params
    s = engine.sampling(engine.thinks(None))
    parameters = "\n".join(f"{k:<15}{v}" for k, v in (("temperature", s.temperature), ("top_k", s.top_k),
                                                     ("top_p", s.top_p), ("min_p", s.min_p),
                                                     ("repeat_penalty", s.repeat_penalty)))
    caps = ["completion", "tools"] + (["thinking"] if engine.mode != "never" else [])
    when = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return Card(name_of(model_id), size, when, digest, details, model_info, engine.template.source, parameters, caps,
                engine.ctx, str(path or loaded.source))


def show(c: Card) -> dict:
    return {"license": "", "modelfile": f"# served by qwen3cli\nFROM {c.path}\n", "parameters": c.parameters,
            "template": c.template, "details": c.details, "model_info": c.model_info,
            "capabilities": c.capabilities, "modified_at": c.modified_at}


def ps(c: Card) -> dict:
    # loaded for as long as the server runs: ollama's "forever" is a date far ahead
    expires = (datetime.now(timezone.utc) + timedelta(days=365 * 100)).isoformat().replace("+00:00", "Z")
    return {"models": [{**c.entry(), "expires_at": expires, "size_vram": 0, "context_length": c.context_length}]}
