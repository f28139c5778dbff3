"""`qwen3cli serve`: an OpenAI-compatible HTTP server over one Engine.

protocol.py parses and checks requests and shapes replies; answer.py splits the answer into
text and tool calls as it streams; worker.py runs requests one at a time over a shared KV
prefix; http.py routes, authenticates and writes JSON or server-sent events."""

from .http import OpenAIServer, make_server  # noqa: F401
from .protocol import REASONING_EFFORT, APIError  # noqa: F401
