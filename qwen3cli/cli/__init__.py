"""The qwen3cli command line: parses, calls the library, renders with rich; the only layer
that prints. base.py holds the app and what every command shares (it imports no command),
options.py the shared options, one module per command registers it on the app.

Importing this package registers every command; each command module imports its heavy
parts (numba, the engine, the chat UI) when it runs, so that `qwen3cli --help` stays fast.
"""

# registers the commands, in the order --help lists them
from . import quantize, info, run, bench, chat, eval, serve, models  # noqa: F401,I001
from .base import app, tidy_help
from .entry import main

tidy_help(app)

__all__ = ["app", "main"]
