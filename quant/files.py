"""Opening files that strangers name: only regular files, and never more bytes than a format allows.

A FIFO or a terminal named as a model blocks `open()` forever, /dev/zero never ends, and a
symlink loop is not "no such file". So every input is opened without blocking, checked with
fstat on the open descriptor (no race with a rename), and read with a bound.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from .errors import QuantError


class InputFileError(QuantError):
    """An input path is missing, unreadable, not a regular file, or larger than its format allows."""


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def os_problem(e: OSError, verb: str = "read") -> str:
    """The words for an OSError on a path, without the path (the caller names it)."""
    reason = {errno.ENOENT: "no such file or directory",
              errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is not a directory",
              errno.ENAMETOOLONG: "file name too long"}.get(e.errno, e.strerror or str(e))
    return f"cannot {verb}: {reason}"


def open_regular(path: str | Path, what: str = "regular file") -> int:
    """An O_RDONLY descriptor on a regular file; anything else is an InputFileError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputFileError(f"{path}: {os_problem(e)}") from None
    except ValueError:  # an embedded NUL
        raise InputFileError(f"{path!r}: not a valid path") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputFileError(f"{path}: is {kind(st.st_mode)}, not a {what}")
    os.set_blocking(fd, True)
    return fd


def check_regular(path: str | Path, what: str = "regular file") -> int:
    """The size of a regular file at `path`, checked as open_regular does."""
    fd = open_regular(path, what)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_bytes(path: str | Path, limit: int, what: str = "file") -> bytes:
    """All of a regular file, refusing one larger than `limit` bytes before reading it."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputFileError(f"{path}: {size} bytes, more than a {what} may have ({limit})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            # what fstat said, then on to EOF if the file grew meanwhile: never more than limit + 1
            # bytes, and never a limit-sized buffer for a small file
            data = f.read(min(size, limit) + 1)
            while len(data) <= limit:
                more = f.read(min(1 << 20, limit + 1 - len(data)))
                if not more:
                    break
                data += more
    except OSError as e:
        raise InputFileError(f"{path}: {os_problem(e)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputFileError(f"{path}: more than a {what} may have ({limit} bytes)")
    return data


def read_text(path: str | Path, limit: int, what: str = "file") -> str:
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json(path: str | Path, limit: int, what: str = "JSON file"):
    text = read_text(path, limit, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise InputFileError(f"{path}: JSON nested too deeply") from None
    except ValueError:  # Python's int() digit limit, as a plain ValueError
        raise InputFileError(f"{path}: not valid JSON (a number with too many digits)") from None
