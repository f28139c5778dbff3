"""The socket under a request: writes with a deadline, a byte budget for the headers, telling a
client that left from one that only stopped sending, and closing without losing the reply."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time


class TimedWriter:
    """The handler's wfile. Each write may block at most `timeout` seconds: a client that stops
    reading a stream would otherwise hold the model, and everyone queued behind it, for good."""

    closed = False

    def __init__(self, sock: socket.socket, timeout: float, read_timeout: float):
        self.sock, self.timeout, self.read_timeout = sock, timeout, read_timeout

    def write(self, data: bytes) -> int:
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)  # the timeout bounds the whole call, not each piece
        finally:
            self.sock.settimeout(self.read_timeout)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class HeadBudget:
    """rfile while the headers are parsed: http.server allows 100 lines of 64 KB each, megabytes
    a connection can make us hold before its key is even looked at."""

    def __init__(self, rfile, budget: int):
        self.rfile, self.left, self.budget = rfile, budget, budget

    def readline(self, limit: int = -1) -> bytes:
        line = self.rfile.readline(limit)
        self.left -= len(line)
        if self.left < 0:  # http.server answers this one with 431
            raise http.client.LineTooLong(f"headers (more than {self.budget} bytes)")
        return line


def readable(sock: socket.socket) -> bool:
    """Input (or its end) is waiting; poll, since select fails on descriptors past 1023."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


def at_eof(sock: socket.socket) -> bool | None:
    """True: the client sent its end of input (it closed, or half-closed and still waits for the
    reply); False: it is there (nothing waiting, or a next request); None: the connection is gone."""
    try:
        if not readable(sock) or sock.recv(1, socket.MSG_PEEK) != b"":
            return False
        # after the end of input recv says nothing more; a reset since then is a pending error
        return None if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else True
    except (OSError, ValueError):
        return None


def linger(sock: socket.socket, seconds: float, limit: int) -> None:
    """End a connection whose request body we did not read. Closing a socket with unread input
    makes the kernel reset the connection, and a client still sending would lose our reply; so
    stop sending, then read and drop what comes, for a moment and up to `limit` bytes."""
    try:
        sock.shutdown(socket.SHUT_WR)
        buf, deadline = bytearray(1 << 16), time.monotonic() + seconds
        while limit > 0 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            n = sock.recv_into(buf)
            if not n:
                break
            limit -= n
    except OSError:
        pass


def refuse_busy(sock: socket.socket, max_connections: int) -> None:
    """A 503 for a connection over the limit, from the accepting thread: it must not block."""
    body = json.dumps({"error": {"message": f"the server has {max_connections} connections open; try again",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}})
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    try:
        sock.setblocking(False)
        sock.send((head + body).encode())
    except OSError:
        pass
