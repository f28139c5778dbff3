"""What the server checks before it trusts a request, and the limits it holds clients to.

A server on loopback without a key trusts whoever can reach it, so it must make sure that is
this machine's user and not a web page they visit: a page can send requests to 127.0.0.1
(cross-origin, refused unless --cors-origin allows its Origin) or rebind its own name to
127.0.0.1 (its Host is then that name, refused on a loopback bind)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

from .protocol import APIError


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server. Timeouts are per socket operation, in seconds."""
    max_body: int = 8 << 20  # bytes; checked from Content-Length before anything is read
    max_head: int = 64 << 10  # bytes of headers
    read_timeout: float = 30.0  # a request that stops arriving, or a kept-alive connection left idle
    write_timeout: float = 30.0  # a client that stops reading: its request ends, the model is freed
    # what the kernel may buffer for a client that is not reading; left to itself it grows to
    # megabytes, thousands of tokens generated for nobody before a write even blocks
    send_buffer: int = 64 << 10
    max_connections: int = 128  # each holds a thread; more are answered 503 at once
    max_depth: int = 64  # JSON nesting (deeper would exhaust recursion in json and the template)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address.lower() == "localhost"


_PORT = re.compile(r"(:[0-9]{0,5})?")


def names_loopback(host: str) -> bool:
    """A Host header naming this machine by a loopback name or address (any port)."""
    h = host.strip().lower()
    if h.startswith("["):
        name, bracket, rest = h[1:].partition("]")
        if not (bracket and _ipv6_loopback(name)):
            return False
    else:
        name = h.split(":", 1)[0]
        rest = h[len(name):]
        if not (name.rstrip(".") == "localhost" or _ipv4_loopback(name)):
            return False
    return _PORT.fullmatch(rest) is not None


def _ipv4_loopback(name: str) -> bool:
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _ipv6_loopback(name: str) -> bool:
    try:
        ip = ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return ip.is_loopback or (ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+|null")


def valid_origin(origin: str) -> bool:
    """What --cors-origin takes: '*' or a web origin, scheme://host[:port] (no path)."""
    return origin == "*" or _ORIGIN.fullmatch(origin.lower().rstrip("/")) is not None


class Cors:
    """Which web pages may use the server. None by default: a browser then refuses a page's
    request before sending it (preflight) or, for the kinds it sends without asking, the
    server refuses it from its Origin header."""

    def __init__(self, origins: Iterable[str] = ()):
        origins = list(origins)
        for o in origins:
            if not valid_origin(o):
                raise ValueError(f"not a web origin: {o!r} (want scheme://host[:port] or '*')")
        self.any = "*" in origins
        self.origins = {o.lower().rstrip("/") for o in origins if o != "*"}

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower().rstrip("/") in self.origins

    def headers(self, origin: str | None) -> list[tuple[str, str]]:
        """For a reply to a request from `origin` (None: not from a web page)."""
        if not (self.any or self.origins):
            return []
        out = [] if self.any else [("Vary", "Origin")]
        if origin is not None and self.allows(origin):
            out.append(("Access-Control-Allow-Origin", "*" if self.any else origin))
        return out


_TOKENS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def preflight_headers(requested: str | None) -> list[tuple[str, str]]:
    """An allowed origin's preflight: the methods we serve and the headers its client wants
    (OpenAI's JavaScript client sends several of its own besides Authorization)."""
    allow = requested.strip() if requested and _TOKENS.fullmatch(requested.strip()) else "Authorization, Content-Type"
    return [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"), ("Access-Control-Allow-Headers", allow),
            ("Access-Control-Max-Age", "600")]


def single(headers, name: str) -> str | None:
    """A header that must not be sent twice (two values would be two readings of one request)."""
    values = headers.get_all(name) or []
    if len(values) > 1:
        raise APIError(f"the request has {len(values)} {name} headers", code="duplicate_header")
    return values[0] if values else None


def body_length(headers, max_body: int) -> int:
    """The body's length from the headers, refused before a byte of it is read."""
    if headers.get_all("Transfer-Encoding"):
        raise APIError("send the body with a Content-Length (Transfer-Encoding is not supported)", status=411)
    length = single(headers, "Content-Length")
    if length is None:
        raise APIError("the request needs a Content-Length header", status=411)
    if not re.fullmatch(r"[0-9]{1,20}", length.strip()):
        raise APIError(f"bad Content-Length {length[:40]!r}")
    n = int(length)
    if n > max_body:
        raise APIError(f"the request body is {n} bytes; this server takes at most {max_body}", status=413,
                       code="request_too_large")
    return n
