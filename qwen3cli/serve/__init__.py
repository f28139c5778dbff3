"""`qwen3cli serve`: an OpenAI-compatible HTTP server over one Engine.

protocol.py parses and checks requests and shapes replies (logprobs.py their log-probabilities;
ollama.py reads ollama's API into the same requests); answer.py splits the answer into
text and tool calls as it streams; worker.py runs requests one at a time over a shared KV
prefix; http.py routes, authenticates and writes JSON or server-sent events; guard.py holds the
checks and limits that keep clients and web pages in their place; conn.py the socket-level
care (write deadlines, half-closed clients, closing without losing a reply)."""

from .guard import Limits  # noqa: F401
from .http import OpenAIServer, make_server  # noqa: F401
from .protocol import REASONING_EFFORT, APIError  # noqa: F401
