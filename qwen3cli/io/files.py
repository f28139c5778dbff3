"""Writing output files without ever losing one.

A file is written beside its destination under a temporary name and renamed at the end, so a
crash or a signal leaves the old file (or nothing). The rename refuses to clobber a file that
appeared while we worked, unless asked to replace it; only regular files are ever replaced
(as root, "replacing" /dev/sda or a FIFO with a GGUF file would be a disaster); the new file
gets the mode the umask gives, as llama-quantize's do (mkstemp's 0600 would hide it from an
ollama or llama-server daemon running as another user).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from quant.files import kind, os_problem

from ..errors import OutputError

_RENAME_NOREPLACE = 1


def check_output(out: str | Path, force: bool) -> Path:
    """Refuse an output path that cannot or must not be written, before any work."""
    out = Path(out).expanduser()
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{out}: {os_problem(e, 'write')}") from None
    except ValueError:
        raise OutputError(f"{out!r}: not a valid path") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{out}: is {kind(st.st_mode)}; only a regular file can be replaced")
        if not force:
            raise OutputError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    return out


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """Linux's atomic no-clobber rename; False where the kernel, libc or filesystem lack it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), dst)


def _commit(tmp: Path, out: Path, replace: bool) -> None:
    if replace:
        # the destination may have changed kind since check_output: refuse all but a regular file
        try:
            st = os.stat(out)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{out}: became {kind(st.st_mode)} while writing; not replaced")
        except FileNotFoundError:
            pass
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails with EEXIST if anything appeared at `out` meanwhile
        tmp.unlink()
        return
    except FileExistsError:
        raise OutputError(f"{out}: appeared while writing; not replaced (use --force to overwrite)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # filesystems without hard links (vfat, some FUSE mounts)
        if _renameat2_noreplace(str(tmp), str(out)):
            return
    except FileExistsError:
        raise OutputError(f"{out}: appeared while writing; not replaced (use --force to overwrite)") from None
    # last resort: claim the name exclusively, then replace our own empty claim
    try:
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise OutputError(f"{out}: appeared while writing; not replaced (use --force to overwrite)") from None
    os.replace(tmp, out)


@contextmanager
def atomic_output(out: str | Path, replace: bool, binary: bool = True) -> Iterator[IO]:
    """A file object for `out`'s future contents: committed on success, removed on any exit."""
    out = check_output(out, replace)
    # The name is chosen (and the cleanup below armed) before the file exists: a signal that
    # lands between creating the file and learning its name, as mkstemp would return it, leaked
    # the file (blocking signals in this thread does not help: the kernel may hand a SIGTERM
    # to any of numba's threads, and Python then raises it here all the same).
    tmp = None
    try:
        for _ in range(100):
            tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
                break
            except FileExistsError:  # somebody else's: not ours to remove
                tmp = None
            except OSError as e:
                tmp = None
                raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
        else:
            raise OutputError(f"{out}: cannot create a temporary file beside it")
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, out, replace)
    except OSError as e:
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:  # also on Ctrl-C, SIGTERM/SIGHUP (the CLI turns them into exceptions) and errors
        if tmp is not None:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

