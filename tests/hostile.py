"""Helpers for the hostile-input suites: run the real CLI in a child process under a memory
rlimit and a time limit, and check that it failed the way a user should see it fail.

A child process is the only honest way to bound memory (an rlimit on the test process would
bound pytest and torch too) and to catch a hang (a timeout kills the child, not the suite).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MEMORY_LIMIT = 3 << 30  # address space of one CLI run: a bad input must not need more
TIME_LIMIT = 60.0  # seconds; a case that hits it is a hang


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float  # the child's peak RSS, polled every 20 ms (0 for in-process runs)
    timed_out: bool = False


def run_cli(*args, input: bytes | str | None = None, env: dict | None = None, cwd=None,
            memory: int = MEMORY_LIMIT, timeout: float = TIME_LIMIT) -> Result:
    """`python -m qwen3cli ARGS` in a child with RLIMIT_AS = memory; its peak RSS from wait4."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    e = {**os.environ, "COLUMNS": "80", "NUMBA_NUM_THREADS": "1", **(env or {})}
    e.pop("LINES", None)
    if isinstance(input, str):
        input = input.encode()
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "qwen3cli", *map(str, args)], cwd=cwd, env=e,
                         stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    chunks: dict[str, bytes] = {}

    def drain(name, stream):
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", p.stdout), ("err", p.stderr))]
    for t in readers:
        t.start()
    if input is not None:
        try:
            p.stdin.write(input)
            p.stdin.close()
        except OSError:  # the child stopped reading: that is its business
            pass
    timed_out, deadline, hwm = False, t0 + timeout, 0.0
    while True:
        # the child's peak RSS: VmHWM of its own (post-exec) memory, polled; rusage's maxrss
        # would count the pytest pages the fork copied before exec
        hwm = max(hwm, _vm_hwm_mb(p.pid))
        pid, status, _ = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            p.kill()
        time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    out, err, peak = chunks.get("out", b""), chunks.get("err", b""), hwm
    _log(args, time.monotonic() - t0, peak, p.returncode, "child")
    return Result(p.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                  time.monotonic() - t0, peak, timed_out)


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def clean_error(r: Result, *needles: str) -> str:
    """A user mistake: non-zero exit, exactly one `error:` line, no traceback, in time."""
    assert not r.timed_out, f"hung for {r.seconds:.0f} s: {r.stderr[-500:]}"
    assert r.code not in (0, None), (r.code, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert not any(ord(c) < 32 and c not in "\t" for c in errors[0]), repr(errors[0])
    return errors[0]


def snapshot(d: Path) -> dict[str, tuple[int, float, int]]:
    """Every entry under d (hidden ones too) with its size, mtime and mode: compare before/after."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def run_main(*args, input: bytes | None = None) -> Result:
    """The same CLI entry point in this process (no rlimit, no fork): for the many cheap cases
    whose memory and time are not in question. Signal handlers it installs are put back."""
    import contextlib
    import io
    import signal

    from qwen3cli.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    out, err = io.StringIO(), io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(input or b""), encoding="utf-8")
    argv, sys.argv = sys.argv, ["qwen3cli", *map(str, args)]
    old_stdin, sys.stdin = sys.stdin, stdin
    t0, code = time.monotonic(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.stdin = argv, old_stdin
        for s, h in saved.items():
            signal.signal(s, h)
    _log(args, time.monotonic() - t0, None, code, "in-process")
    return Result(code, out.getvalue(), err.getvalue(), time.monotonic() - t0, 0.0)


def _log(args, seconds, peak_mb, code, how) -> None:
    """With QWEN3CLI_HOSTILE_LOG=FILE, one JSON line a case: scripts/hostile_report.py sums them up."""
    path = os.environ.get("QWEN3CLI_HOSTILE_LOG")
    if path:
        import json

        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "args": [str(a)[-60:] for a in args], "seconds": round(seconds, 3),
                                "peak_mb": peak_mb, "code": code, "how": how}) + "\n")
