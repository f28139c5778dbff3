"""Strings from strangers (file metadata, paths, HTTP requests) made safe to show.

An ESC sequence in a GGUF's general.name can retitle a window, clear the screen or fake
output; a bidi override reorders what a reader sees; a newline forges a log line. Whatever
is not printable comes out as a Python escape instead.
"""


def printable(text: object) -> str:
    """str(text) safe for a terminal or a log line: control characters (ESC, CR, newlines...),
    invisible formatting (bidi overrides) and lone surrogates come out as escapes."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
