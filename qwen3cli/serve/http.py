"""The HTTP side: routes, bearer-key check, JSON replies and server-sent events, on the
standard library's threading server. Every failure a request can cause ends as an OpenAI error
object with a 4xx/5xx status; the server itself carries on."""

from __future__ import annotations

import hmac
import json
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ..engine import Engine
from .answer import ToolCall
from .protocol import APIError, parse_chat, parse_completion, tool_call_json
from .worker import Content, Finish, Reasoning, Worker

MAX_BODY = 32 << 20


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], worker: Worker, model_id: str, api_key: str | None = None,
                 log: Callable[[str], None] | None = None):
        super().__init__(address, _Handler)
        self.worker, self.model_id, self.api_key, self.log = worker, model_id, api_key, log
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8080, *, model_id: str,
                api_key: str | None = None, log: Callable[[str], None] | None = None) -> OpenAIServer:
    """Bind (port 0: any free port); call serve_forever() to serve."""
    return OpenAIServer((host, port), Worker(engine), model_id, api_key, log)


def client_gone(sock: socket.socket) -> bool:
    """The peer closed its end: readable, and reading would give nothing."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI's clients expect
    server_version = "qwen3cli"
    server: OpenAIServer

    def log_message(self, format, *args):  # the library never prints; the CLI may listen
        if self.server.log:
            self.server.log(f"{self.address_string()} {format % args}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_OPTIONS(self):
        self._send_json(204, None)

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._id = None
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            body = self._read_body() if method == "POST" else None
            if path == "/health":
                return self._send_json(200, self._health())
            self._check_key()
            if path == "/v1/models" or path.startswith("/v1/models/"):
                self._only(method, "GET")
                return self._models(path)
            if path in ("/v1/chat/completions", "/v1/completions"):
                self._only(method, "POST")
                return self._chat(body) if path == "/v1/chat/completions" else self._completion(body)
            raise APIError(f"no such endpoint: {method} {path}", status=404, code="not_found")
        except APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug of ours must cost one request, not the server
            self.close_connection = True
            msg = f"internal error: {type(e).__name__}: {e}"
            if self.server.log:
                self.server.log(msg)
            try:
                self._send_json(500, APIError(msg, status=500, type="server_error").body())
            except OSError:
                pass

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise APIError(f"use {allowed} for {self.path}", status=405, code="method_not_allowed")

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError("the request needs a Content-Length header", status=411)
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(f"bad Content-Length {length!r}") from None
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError(f"the request body is over {MAX_BODY >> 20} MB", status=413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                           code="invalid_api_key")

    # -- endpoints --------------------------------------------------------------------------------
    def _health(self) -> dict:
        w = self.server.worker
        return {"status": "ok", "model": self.server.model_id, "queued": w.queue.waiting,
                "requests": w.requests, "reused_prompt_tokens": w.reused_tokens}

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
        req = parse_chat(body, self.server.model_id)
        w = self.server.worker
        with w.queue:
            job = w.prepare_chat(req)
            pieces = w.run_chat(job, lambda: client_gone(self.connection))
            if req.stream:
                return self._stream_chat(pieces, req.include_usage)
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
        self._send_json(200, {**self._head("chat.completion"),
                              "choices": [{"index": 0, "message": message, "finish_reason": finish.reason,
                                           "logprobs": None}],
                              "usage": finish.usage})

    def _completion(self, body) -> None:
        req = parse_completion(body, self.server.model_id)
        w = self.server.worker
        with w.queue:
            job = w.prepare_completion(req)
            pieces = w.run_completion(job, lambda: client_gone(self.connection))
            if req.stream:
                return self._stream_completion(pieces, req.include_usage)
            *texts, finish = list(pieces) or [None]
        if not isinstance(finish, Finish):
            self.close_connection = True
            return
        self._send_json(200, {**self._head("text_completion"),
                              "choices": [{"index": 0, "text": "".join(t.text for t in texts),
                                           "finish_reason": finish.reason, "logprobs": None}],
                              "usage": finish.usage})

    # -- streaming --------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        if self._id is None:  # one per request (a kept-alive connection carries several)
            self._id = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return {"id": self._id, "object": obj, "created": int(time.time()), "model": self.server.model_id}

    def _stream_chat(self, pieces, include_usage: bool) -> None:
        self._start_events()
        head = self._head("chat.completion.chunk")

        def chunk(delta: dict, finish: str | None = None) -> None:
            self._event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                              "logprobs": None}]})

        n_calls = 0
        try:
            chunk({"role": "assistant", "content": ""})
            for x in pieces:
                if isinstance(x, Reasoning):
                    chunk({"reasoning_content": x.text})
                elif isinstance(x, Content):
                    chunk({"content": x.text})
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

    def _stream_completion(self, pieces, include_usage: bool) -> None:
        self._start_events()
        head = self._head("text_completion")
        try:
            for x in pieces:
                finish = x.reason if isinstance(x, Finish) else None
                self._event({**head, "choices": [{"index": 0, "text": "" if finish else x.text,
                                                  "finish_reason": finish, "logprobs": None}]})
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
        if self.server.log:
            self.server.log(f"stream ended by an error: {err}")
        self._event(err.body())

    # -- writing ----------------------------------------------------------------------------------
    def _send_json(self, status: int, obj) -> None:
        data = b"" if obj is None else json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._cors()
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _cors(self) -> None:  # browser front ends on another local port
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")

    def _start_events(self) -> None:
        # no length known: the stream ends when the connection closes
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors()
        self.end_headers()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _done(self) -> None:
        self.wfile.write(b"data: [DONE]\n\n")
