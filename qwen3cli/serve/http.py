"""The HTTP side: routes, the Host, Origin and key checks, JSON replies and server-sent events,
on the standard library's threading server. Every failure a request can cause ends as an OpenAI
error object with a 4xx/5xx status (or one log line, when the client is gone); the server itself
carries on. Nothing a client sends is read before the checks its headers allow have passed."""

from __future__ import annotations

import hmac
import json
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .. import __version__
from ..runtime.engine import Engine
from ..safe_text import printable
from . import logprobs as lp_shape
from . import ollama
from .answer import ToolCall
from .conn import HeadBudget, TimedWriter, at_eof, linger, refuse_busy
from .guard import Cors, Limits, body_length, is_loopback, names_loopback, preflight_headers, single
from .protocol import APIError, ChatRequest, parse_chat, parse_completion, parse_json, tool_call_json
from .worker import PARALLEL, Content, Defaults, Finish, Reasoning, Worker

NDJSON = "application/x-ndjson"  # ollama's streams: one JSON object a line
STREAMS = ("text/event-stream", NDJSON)
LINGER_S = 2.0  # how long a refused request's unread body is drained before the connection closes


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], worker: Worker | None, model_id: str, api_key: str | None = None,
                 log: Callable[[str], None] | None = None, *, limits: Limits | None = None,
                 cors: Cors | None = None, parallel: int = PARALLEL):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.worker, self.model_id, self.api_key, self.log = worker, model_id, api_key, log
        self.parallel = parallel
        self.limits, self.cors = limits or Limits(), cors or Cors()
        self.created = int(time.time())
        # on loopback only this machine can connect, unless a web page's name resolves here
        self.check_host = is_loopback(self.server_address[0])
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._names: lp_shape.TokenNames | None = None
        self._card: ollama.Card | None = None

    @property
    def card(self) -> ollama.Card:
        """The model as ollama's /api/tags, /api/show and /api/ps describe it, read once."""
        if self._card is None:
            self._card = ollama.card(self.worker.engine, self.model_id)
        return self._card

    @property
    def names(self) -> lp_shape.TokenNames:
        """Token texts for logprobs, cached across requests."""
        if self._names is None:
            self._names = lp_shape.TokenNames(self.worker.engine.tokenizer)
        return self._names

    def ready(self, engine: Engine, defaults: Defaults | None = None) -> None:
        """The model is loaded: requests are served from now on (until then /health says
        "loading" and generation endpoints answer 503, as llama-server's do)."""
        self.worker = Worker(engine, defaults, self.parallel)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def note(self, line: str) -> None:
        """One log line; whatever a client put in it comes out escaped, never as terminal codes."""
        if self.log:
            self.log(printable(line))

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.note(f"{client_address[0]} refused: {self.limits.max_connections} connections open")
            refuse_busy(request, self.limits.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started to give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # socketserver would print a traceback to stderr: a library must not, and a client that
        # resets its connection is worth a line at most
        e = sys.exc_info()[1]
        self.note(f"{client_address[0]}: {type(e).__name__}: {e}")


def make_server(engine: Engine | None, host: str = "127.0.0.1", port: int = 8080, *, model_id: str,
                api_key: str | None = None, log: Callable[[str], None] | None = None,
                limits: Limits | None = None, cors_origins: list[str] | tuple[str, ...] = (),
                defaults: Defaults | None = None, parallel: int = PARALLEL) -> OpenAIServer:
    """Bind (port 0: any free port); call serve_forever() to serve. `cors_origins`: the web
    origins whose pages may call the server ('*': any); `defaults`: what requests leave out;
    `parallel`: requests generated together (more wait in arrival order).
    engine None: bind now, load later, then `ready(engine)` (a port in use fails before the load)."""
    worker = Worker(engine, defaults, parallel) if engine is not None else None
    return OpenAIServer((host, port), worker, model_id, api_key, log, limits=limits, cors=Cors(cors_origins),
                        parallel=parallel)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI's clients expect
    server_version = "qwen3cli"
    server: OpenAIServer

    def setup(self):
        super().setup()
        lim = self.server.limits
        self.connection.settimeout(lim.read_timeout)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, lim.send_buffer)
        self.wfile = TimedWriter(self.connection, lim.write_timeout, lim.read_timeout)
        self._unread = False

    def finish(self):
        super().finish()
        if self._unread:
            linger(self.connection, LINGER_S, self.server.limits.max_body)

    def parse_request(self):
        rfile, self.rfile = self.rfile, HeadBudget(self.rfile, self.server.limits.max_head)
        try:
            return super().parse_request()
        finally:
            self.rfile = rfile

    def handle_expect_100(self):
        return True  # "100 Continue" goes out from _read_body, once the key and the length pass

    def log_message(self, format, *args):  # the library never prints; the CLI may listen
        self.server.note(f"{self.address_string()} {format % args}")

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, too many headers...), as JSON."""
        self.close_connection = True
        self._unread, self._head_sent, self._origin = True, None, None  # the rest of the request is unread
        if code == 501:  # a method with no do_ method here: to the client, one we do not allow
            code, message = 405, f"use GET, POST or OPTIONS, not {self.command}"
        reason = explain or message or self.responses.get(code, ("error",))[0]
        self.log_error("code %d, %s", code, reason)
        extra = [("Allow", "GET, POST, OPTIONS")] if code == 405 else []
        self._send_json(code, APIError(reason, status=code).body(), extra)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._id, self._head_sent, self._probed, self._origin = None, None, False, None
        self._ollama = False  # errors in ollama's shape
        # a body not read stays in the socket: the connection cannot carry another request
        self._unread = bool(self.headers.get_all("Transfer-Encoding")) or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
        try:
            self._check_client()
            path = self.path.split("?", 1)[0].rstrip("/")
            if method == "OPTIONS":
                return self._preflight()
            if path == "/health":
                self._only(method, "GET")
                if self.server.worker is None:
                    return self._send_json(503, {"status": "loading", "model": self.server.model_id})
                return self._send_json(200, self._health())
            self._check_key()
            if path.startswith("/api/"):
                self._ollama = True
                return self._ollama_route(method, path)
            if path == "/v1/models" or path.startswith("/v1/models/"):
                self._only(method, "GET")
                return self._models(path)
            if path in ("/v1/chat/completions", "/v1/completions"):
                self._only(method, "POST")
                if self.server.worker is None:
                    raise APIError("the model is still loading; /health says when it is ready", status=503,
                                   code="model_loading", type="unavailable_error")
                body = self._read_body()
                return self._chat(body) if path == "/v1/chat/completions" else self._completion(body)
            raise APIError(f"no such endpoint: {method} {path}", status=404, code="not_found")
        except APIError as e:
            self._reply_error(e)
        except OSError as e:  # the client left, or stopped reading for longer than we wait
            self.close_connection = True
            why = (f"stopped reading for {self.server.limits.write_timeout:g} s" if isinstance(e, TimeoutError)
                   else f"connection lost ({type(e).__name__})")
            self.server.note(f"{self.address_string()} {why}; \"{self.requestline}\" is ended")
        except Exception as e:  # a bug of ours must cost one request, not the server
            self.close_connection = True
            msg = f"internal error: {type(e).__name__}: {e}"
            self.server.note(msg)
            self._reply_error(APIError(msg, status=500, type="server_error"))

    def _reply_error(self, e: APIError) -> None:
        if self._head_sent in STREAMS:  # the stream has said so in its own way
            return
        try:
            self._send_json(e.status, {"error": str(e)} if self._ollama else e.body())
        except OSError as err:
            self.close_connection = True
            self.server.note(f"{self.address_string()} left before its {e.status} reply to \"{self.requestline}\" "
                             f"({type(err).__name__})")

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise APIError(f"use {allowed} for {self.path}", status=405, code="method_not_allowed")

    def _check_client(self) -> None:
        """Host and Origin: that the request comes from this machine's user, not a web page."""
        host = single(self.headers, "Host")
        if self.server.check_host and host is not None and not names_loopback(host):
            raise APIError(f"this server answers only requests addressed to this machine (localhost, "
                           f"127.0.0.1 or [::1]), not {host!r}", status=403, code="host_not_allowed")
        self._origin = single(self.headers, "Origin")
        if self._origin is not None and not self.server.cors.allows(self._origin):
            raise APIError(f"requests from web pages at {self._origin!r} are refused (serve --cors-origin "
                           "allows an origin)", status=403, code="origin_not_allowed")

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = single(self.headers, "Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                           code="invalid_api_key")

    def _read_body(self):
        lim = self.server.limits
        try:
            n = body_length(self.headers, lim.max_body)
        except APIError:  # where the body ends is unknown or too far: this connection is done
            self._unread = True
            raise
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1":
            self.send_response_only(100)
            self.end_headers()
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise APIError(f"the request body stopped arriving for {lim.read_timeout:g} s", status=408,
                           code="timeout") from None
        if len(raw) < n:
            raise APIError(f"the request body ended after {len(raw)} of {n} bytes")
        self._unread = False
        return parse_json(raw, lim.max_depth)

    def _parsed(self, parse, body):
        try:
            return parse(body, self.server.model_id)
        except APIError:
            raise
        except Exception as e:  # a shape the checks missed is still the client's mistake
            self.server.note(f"unexpected {type(e).__name__} while reading a request: {e}")
            raise APIError(f"the request could not be read ({type(e).__name__})") from None

    def _preflight(self) -> None:
        """A browser asking whether a page may call us; only --cors-origin's origins hear yes."""
        allowed = self._origin is not None and self.headers.get("Access-Control-Request-Method") is not None
        extra = preflight_headers(self.headers.get("Access-Control-Request-Headers")) if allowed else []
        self._send_json(204, None, [("Allow", "GET, POST, OPTIONS"), *extra])

    def _client_left(self) -> bool:
        """Asked between tokens, and while the request waits for a slot."""
        eof = at_eof(self.connection)
        if eof is None:
            return True
        if eof and not self._probed:
            # It closed, or only shut its sending side (printf ... | nc) and waits for the reply.
            # A write tells which: a closed socket answers it with a reset, seen at the next call.
            self._probed, self.close_connection = True, True
            try:
                if self._head_sent:
                    # what each stream's readers skip: an event-stream comment; JSON's whitespace
                    self.wfile.write(b" " if self._head_sent == NDJSON else b": \n\n")
                else:
                    self._start_reply("application/json")  # its length is not known yet
            except OSError:
                return True
        return False

    # -- endpoints --------------------------------------------------------------------------------
    def _health(self) -> dict:
        b = self.server.worker.batcher
        return {"status": "ok", "model": self.server.model_id, "slots": len(b.slots), "slots_in_use": b.in_use,
                "queued": b.queued, "requests": b.requests, "reused_prompt_tokens": b.reused_tokens}

    def _models(self, path: str) -> None:
        s = self.server
        card = {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "qwen3cli"}
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [card]})
        if path[len("/v1/models/"):] != s.model_id:
            raise APIError(f"the model '{path[len('/v1/models/'):]}' does not exist", status=404,
                           param="model", code="model_not_found")
        self._send_json(200, card)

    def _chat(self, body) -> None:
        req = self._parsed(parse_chat, body)
        w = self.server.worker
        job = w.prepare_chat(req)
        pieces = w.run_chat(job, self._client_left)
        if req.stream:
            return self._stream_chat(pieces, req.include_usage, req.reasoning_logprobs)
        reasoning, content, calls, finish = [], [], [], None
        for x in pieces:
            if isinstance(x, Finish):
                finish = x
            else:
                {Reasoning: reasoning, Content: content, ToolCall: calls}[type(x)].append(x)
        if finish is None:  # the client left; nobody to answer
            self.close_connection = True
            return
        message = {"role": "assistant", "content": "".join(c.text for c in content) or (None if calls else ""),
                   "reasoning_content": "".join(r.text for r in reasoning) or None}
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        logprobs = None
        if req.logprobs is not None:
            thought = [e for r in reasoning for e in r.logprobs] if req.reasoning_logprobs else None
            logprobs = self._chat_logprobs([e for c in content for e in c.logprobs], thought)
        self._send_json(200, {**self._head("chat.completion"),
                              "choices": [{"index": 0, "message": message, "finish_reason": finish.reason,
                                           "logprobs": logprobs}],
                              "usage": finish.usage})

    def _chat_logprobs(self, content: list, reasoning: list | None) -> dict:
        out = {"content": lp_shape.chat(content, self.server.names), "refusal": None}
        if reasoning is not None:
            out["reasoning_content"] = lp_shape.chat(reasoning, self.server.names)
        return out

    def _completion(self, body) -> None:
        req = self._parsed(parse_completion, body)
        w = self.server.worker
        job = w.prepare_completion(req)
        pieces = w.run_completion(job, self._client_left)
        first = job.ids[0]
        if req.stream:
            return self._stream_completion(pieces, req.include_usage, req.logprobs is not None, first)
        *texts, finish = list(pieces) or [None]
        if not isinstance(finish, Finish):
            self.close_connection = True
            return
        logprobs = None
        if req.logprobs is not None:
            logprobs = lp_shape.completion([e for t in texts for e in t.logprobs], self.server.names, 0, first)[0]
        self._send_json(200, {**self._head("text_completion"),
                              "choices": [{"index": 0, "text": "".join(t.text for t in texts),
                                           "finish_reason": finish.reason, "logprobs": logprobs}],
                              "usage": finish.usage})

    # -- ollama -----------------------------------------------------------------------------------
    def _ollama_route(self, method: str, path: str) -> None:
        s = self.server
        if path == "/api/version":
            self._only(method, "GET")
            return self._send_json(200, {"version": __version__})
        if path not in ("/api/tags", "/api/ps", "/api/show", "/api/chat", "/api/generate"):
            raise APIError(f"no such endpoint: {method} {path}", status=404)
        self._only(method, "GET" if path in ("/api/tags", "/api/ps") else "POST")
        if s.worker is None:
            raise APIError("the model is still loading; /health says when it is ready", status=503)
        if path == "/api/tags":
            return self._send_json(200, {"models": [s.card.entry()]})
        if path == "/api/ps":
            return self._send_json(200, ollama.ps(s.card))
        body = self._read_body()
        if path == "/api/show":
            self._parsed(ollama.check_model, body)
            return self._send_json(200, ollama.show(s.card))
        self._ollama_generate(body, chat=path == "/api/chat")

    def _ollama_generate(self, body, chat: bool) -> None:
        """/api/chat and /api/generate: one body of code, as their replies differ in two names."""
        started = time.perf_counter()
        p = self._parsed(ollama.parse_chat if chat else ollama.parse_generate, body)
        head = {"model": ollama.name_of(self.server.model_id)}

        def text(content: str, thinking: str = "", calls=(), lps=()) -> dict:
            if chat:
                m = {"role": "assistant", "content": content}
                if thinking:
                    m["thinking"] = thinking
                if calls:
                    m["tool_calls"] = [ollama.tool_call(c) for c in calls]
                out = {"message": m}
            else:
                out = {"response": content, **({"thinking": thinking} if thinking else {})}
            if lps:
                out["logprobs"] = lp_shape.chat(lps, self.server.names)
            return {**head, "created_at": ollama.now(), **out}

        if p.req is None:  # ollama's way to load a model: it is loaded
            return self._send_json(200, {**text(""), "done": True, "done_reason": "load"})
        w = self.server.worker
        job = w.prepare_chat(p.req) if isinstance(p.req, ChatRequest) else w.prepare_completion(p.req)
        if p.num_ctx is not None and p.num_ctx < w.engine.ctx:  # a smaller window than the server's: honoured
            if len(job.ids) >= p.num_ctx:
                raise APIError(f"this request has {len(job.ids)} prompt tokens; options.num_ctx is {p.num_ctx}",
                               param="options.num_ctx")
            room = p.num_ctx - len(job.ids)
            job.max_tokens = room if job.max_tokens is None else min(job.max_tokens, room)
        pieces = w.run_chat(job, self._client_left) if isinstance(p.req, ChatRequest) else \
            w.run_completion(job, self._client_left)
        first = None

        def final(x: Finish, reply: dict) -> dict:
            return {**reply, "done": True, "done_reason": ollama.done_reason(x.reason),
                    **ollama.timings(x.usage, started, first, time.perf_counter())}

        if p.stream:
            self._start_reply(NDJSON)
            try:
                for x in pieces:
                    first = first or time.perf_counter()
                    if isinstance(x, Finish):
                        self._line(final(x, text("")))
                    elif isinstance(x, Reasoning):
                        self._line({**text("", x.text, lps=x.logprobs), "done": False})
                    elif isinstance(x, Content):
                        self._line({**text(x.text, lps=x.logprobs), "done": False})
                    else:
                        self._line({**text("", calls=[x]), "done": False})
            except Exception as e:
                if isinstance(e, OSError):
                    raise
                self.server.note(f"stream ended by an error: {e}")
                self._line({"error": str(e) if isinstance(e, APIError) else f"{type(e).__name__}: {e}"})
            finally:
                pieces.close()
            return
        content, thinking, calls, lps, finish = [], [], [], [], None
        for x in pieces:
            first = first or time.perf_counter()
            if isinstance(x, Finish):
                finish = x
            elif isinstance(x, ToolCall):
                calls.append(x)
            else:
                (thinking if isinstance(x, Reasoning) else content).append(x.text)
                lps += x.logprobs
        if finish is None:  # the client left
            self.close_connection = True
            return
        self._send_json(200, final(finish, text("".join(content), "".join(thinking), calls, lps)))

    def _line(self, obj: dict) -> None:
        self.wfile.write(_json(obj) + b"\n")

    # -- streaming --------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        if self._id is None:  # one per request (a kept-alive connection carries several)
            self._id = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return {"id": self._id, "object": obj, "created": int(time.time()), "model": self.server.model_id}

    def _stream_chat(self, pieces, include_usage: bool, reasoning_logprobs: bool = False) -> None:
        self._start_events()
        head = self._head("chat.completion.chunk")

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> None:
            self._event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                              "logprobs": logprobs}]})

        n_calls = 0
        try:
            chunk({"role": "assistant", "content": ""})
            for x in pieces:
                if isinstance(x, Reasoning):
                    chunk({"reasoning_content": x.text},
                          logprobs=self._chat_logprobs([], list(x.logprobs)) if x.logprobs else None)
                elif isinstance(x, Content):
                    chunk({"content": x.text}, logprobs=self._chat_logprobs(list(x.logprobs),
                                                                           [] if reasoning_logprobs else None)
                          if x.logprobs else None)
                elif isinstance(x, ToolCall):
                    chunk({"tool_calls": [tool_call_json(x, n_calls)]})
                    n_calls += 1
                else:
                    chunk({}, x.reason)
                    if include_usage:
                        self._event({**head, "choices": [], "usage": x.usage})
                    self._done()
        except Exception as e:
            self._stream_error(e)
        finally:
            pieces.close()  # a write that failed: the client left, stop generating

    def _stream_completion(self, pieces, include_usage: bool, logprobs: bool = False, first: int = 0) -> None:
        self._start_events()
        head = self._head("text_completion")
        offset = 0
        try:
            for x in pieces:
                finish = x.reason if isinstance(x, Finish) else None
                lp = None
                if logprobs and not finish:
                    lp, offset = lp_shape.completion(x.logprobs, self.server.names, offset, first)
                self._event({**head, "choices": [{"index": 0, "text": "" if finish else x.text,
                                                  "finish_reason": finish, "logprobs": lp}]})
                if finish:
                    if include_usage:
                        self._event({**head, "choices": [], "usage": x.usage})
                    self._done()
        except Exception as e:
            self._stream_error(e)
        finally:
            pieces.close()

    def _stream_error(self, e: Exception) -> None:
        """The status line is sent already: the error goes in the stream, and the stream ends."""
        if isinstance(e, OSError):
            raise e
        err = e if isinstance(e, APIError) else APIError(f"{type(e).__name__}: {e}", status=500, type="server_error")
        self.server.note(f"stream ended by an error: {err}")
        self._event(err.body())

    # -- writing ----------------------------------------------------------------------------------
    def _send_json(self, status: int, obj, extra: list[tuple[str, str]] = ()) -> None:
        data = b"" if obj is None else _json(obj)
        if self._head_sent:  # a half-closed client's reply, started before its answer was known
            if self._head_sent == "application/json":
                self.wfile.write(data)
            return
        if self._unread:
            self.close_connection = True
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        for k, v in [*extra, *self.server.cors.headers(self._origin)]:
            self.send_header(k, v)
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_reply(self, content_type: str) -> None:
        """A 200 whose body runs until the connection closes (its length is not known yet)."""
        self.close_connection = True
        self._head_sent = content_type
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if content_type == "text/event-stream":
            self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        for k, v in self.server.cors.headers(self._origin):
            self.send_header(k, v)
        self.end_headers()

    def _start_events(self) -> None:
        self._start_reply("text/event-stream")

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + _json(obj) + b"\n\n")

    def _done(self) -> None:
        self.wfile.write(b"data: [DONE]\n\n")


def _json(obj) -> bytes:
    # a lone surrogate (from a client's text) comes out as its JSON escape instead of failing
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")
