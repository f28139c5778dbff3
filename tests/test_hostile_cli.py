"""Hostile input to the CLI, end to end in a child process under a memory rlimit: file safety
(class 1), non-regular and endless inputs (class 5), bad flag values (class 6) and strings
that try to drive the terminal (class 8). Each case: non-zero exit, one `error:` line, no
traceback, in bounded time and memory, no leftover files, pre-existing files unchanged."""

import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import clean_error, run_cli, run_main, snapshot
from qwen3cli.io import convert
from qwen3cli.cli.base import UsageError
from qwen3cli.cli.options import user_sampling
from qwen3cli.errors import OutputError
from qwen3cli.io.files import atomic_output


@pytest.fixture(scope="module")
def src(ckpt):
    return ckpt(layers=1)[0]


@pytest.fixture(scope="module")
def tiny(gguf_model):
    return gguf_model("q8_0", layers=1)[0]


def specials(d):
    """A FIFO, a socket, a directory, a symlink loop, a dangling link and (as root) a char device."""
    d.mkdir(exist_ok=True)
    os.mkfifo(d / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock"))
    (d / "dir").mkdir()
    os.symlink(d / "loop2", d / "loop1")
    os.symlink(d / "loop1", d / "loop2")
    os.symlink(d / "nowhere", d / "dangling")
    os.symlink(d / "fifo", d / "link-to-fifo")
    made = {"fifo": "FIFO", "sock": "socket", "dir": "directory", "loop1": "symlink loop",
            "link-to-fifo": "FIFO"}
    try:  # a copy of /dev/null's node: replacing it must be refused
        os.mknod(d / "chardev", 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
        made["chardev"] = "character device"
    except (PermissionError, OSError):
        pass
    return made, s


# -- class 1: no output file is ever lost or left behind --------------------------------------

def test_quantize_never_replaces_a_non_regular_file(src, tmp_path):
    made, sock = specials(tmp_path / "s")
    before = snapshot(tmp_path / "s")
    for name, what in made.items():
        for force in ([], ["--force"]):
            r = run_main("quantize", src, "-o", tmp_path / "s" / name, *force)
            line = clean_error(r, str(tmp_path / "s" / name))
            assert ("only a regular file" in line or "already exists" in line
                    or "symbolic links" in line), line
    assert snapshot(tmp_path / "s") == before  # nothing replaced, no temporary file left
    sock.close()


def test_save_never_replaces_a_non_regular_file(tmp_path):
    made, sock = specials(tmp_path / "s")
    before = snapshot(tmp_path / "s")
    for name in made:
        with pytest.raises(OutputError, match="only a regular file|symbolic links"):
            with atomic_output(tmp_path / "s" / name, replace=True, binary=False) as f:
                f.write("{}")
    assert snapshot(tmp_path / "s") == before
    sock.close()


def test_file_appearing_while_writing_is_not_clobbered(src, tmp_path):
    out = tmp_path / "m.gguf"

    def intruder(name, n):  # another quantize (or the user) creates the file meanwhile
        if not out.exists():
            out.write_bytes(b"theirs")

    with pytest.raises(OutputError, match="appeared while writing"):
        convert.quantize(src, out, "q8_0", progress=intruder)
    assert out.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    # with --force the new file replaces it, as asked
    convert.quantize(src, out, "q8_0", force=True, progress=intruder)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_mode_follows_the_umask(src, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        convert.quantize(src, tmp_path / "m.gguf", "q8_0")
        with atomic_output(tmp_path / "chat.json", replace=True, binary=False) as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "chat.json").stat().st_mode) == mode


@pytest.fixture(scope="module")
def slow_src(ckpt):
    # the 151936-row embedding at hidden 128 keeps q4_k_m quantizing busy for about a second
    return ckpt(layers=1, hidden=128)[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_quantize_leaves_nothing(slow_src, tmp_path, sig):
    out = tmp_path / "o"
    out.mkdir()
    env = {**os.environ, "COLUMNS": "80", "NUMBA_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "qwen3cli", "quantize", str(slow_src), "-o", str(out / "m.gguf"),
                          "--type", "q4_k_m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while not any(out.iterdir()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "quantize ended before the signal: make the checkpoint bigger"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (130 if sig == signal.SIGINT else 128 + sig), err.decode()[-1000:]
    assert list(out.iterdir()) == [] and b"Traceback" not in err


def test_save_onto_a_directory_leaves_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="directory"):
        with atomic_output(tmp_path / "d", replace=True, binary=False) as f:
            f.write("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and list((tmp_path / "d").iterdir()) == []


# -- class 5: inputs that block, never end, or are not what they seem --------------------------

def test_non_regular_inputs_are_refused_at_once(src, tiny, tmp_path):
    made, sock = specials(tmp_path / "s")
    made["/dev/zero"] = "character device"
    cases = 0
    for name in made:
        p = tmp_path / "s" / name if not name.startswith("/") else name
        if name == "dir":
            continue  # a directory is a model (HF checkpoint): covered by the loader's tests
        commands = [["info", p], ["run", p, "hi"]]
        if name in ("fifo", "/dev/zero", "loop1"):  # the other readers share the same opener
            commands += [["quantize", src, "-o", tmp_path / "x.gguf", "--imatrix", p],
                         ["eval", tiny, "--ref", tiny, "--text", p]]
        for args in commands:
            r = run_cli(*args, timeout=30)
            clean_error(r, str(p))
            assert "no such file" not in r.stderr or name == "dangling", r.stderr
            assert r.seconds < 30
            cases += 1
    assert cases >= 16 and not (tmp_path / "x.gguf").exists()
    sock.close()


# -- class 6: flag values --------------------------------------------------------------------

BAD_FLAGS = [
    (["--temp", "nan"], "--temp"), (["--temp", "inf"], "--temp"), (["--temp", "-1"], "--temp"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "nan"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--min-p", "2"], "--min-p"), (["--min-p", "nan"], "--min-p"), (["--top-k", "-3"], "--top-k"),
    (["--presence-penalty", "nan"], "--presence-penalty"), (["--presence-penalty", "5"], "--presence-penalty"),
    (["--repeat-penalty", "0"], "--repeat-penalty"), (["--repeat-penalty", "-inf"], "--repeat-penalty"),
    (["--seed", "-5"], "--seed"), (["--seed", str(2**64)], "--seed"), (["--ctx", "0"], "--ctx"),
    (["--max-tokens", "-1"], "--max-tokens"), (["--threads", "0"], "--threads"), (["--ctx", "abc"], "--ctx"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("command", ["run", "chat"])
def test_bad_flags_are_named_before_the_model_loads(tmp_path, command):
    missing = tmp_path / "no-such-model.gguf"  # if the model were opened first, this would be the error
    for flags, needle in BAD_FLAGS:
        if command == "chat" and flags[0] == "--threads":
            continue  # chat checks --threads when it sets them, after the flags above
        r = run_main(command, missing, *(["hi"] if command == "run" else []), *flags)
        line = clean_error(r, needle)
        assert "no-such-model" not in line, line


def test_seed_minus_one_means_random(tiny):
    r = run_cli("run", tiny, "hi", "--seed", "-1", "-n", "3", "--no-think")
    assert r.code == 0, r.stderr


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["temperature", "top_p", "min_p", "presence_penalty", "repeat_penalty", "top_k", "seed"]),
       finite_or_not)
def test_any_sampling_value_is_accepted_or_refused_by_name(name, value):
    flag = {"temperature": "--temp", "top_p": "--top-p", "min_p": "--min-p", "top_k": "--top-k",
            "presence_penalty": "--presence-penalty", "repeat_penalty": "--repeat-penalty", "seed": "--seed"}[name]
    if name in ("top_k", "seed") and isinstance(value, float):
        return  # typer makes these ints
    try:
        given_, seed = user_sampling(**{name: value})
    except UsageError as e:
        assert str(e).startswith(flag + " must be"), e
        return
    if name != "seed":
        assert math.isfinite(given_[name])


def test_stdin_that_is_not_utf8_or_too_long(tiny, tmp_path):
    clean_error(run_main("run", tiny, input=b"caf\xe9 \xff\xfe"), "stdin", "UTF-8")
    big = b"word " * ((12 << 20) // 5)  # 12 MB: well past what an 8K context can hold
    r = run_cli("run", tiny, "--ctx", "64", input=big, timeout=30)
    clean_error(r, "bytes", "context")
    assert r.seconds < 20 and r.peak_mb < 1500, (r.seconds, r.peak_mb)


def test_eval_ctx_too_small(tiny):
    clean_error(run_cli("eval", tiny, "--ref", tiny, "--ctx", "0"), "--ctx")


# -- class 8: strings from files do not drive the terminal -------------------------------------

def test_file_names_and_metadata_are_escaped(src, tmp_path):
    import gguf

    hostile = "[/oops] [bold]x \x1b]0;pwned\x07\x1b[2J\u202eevil"
    p = convert.plan(src, "q8_0")
    p.metadata["general.name"] = gguf.GGUFValue(hostile, gguf.GGUFValueType.STRING)
    out = tmp_path / "named.gguf"
    convert.write(p, out)
    r = run_cli("info", out)
    assert r.code == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout, repr(r.stdout)
    assert "[/oops] [bold]x \\x1b]0;pwned\\x07\\x1b[2J\\u202eevil" in r.stdout, r.stdout
    r = run_cli("bench", out, "-p", "4", "-n", "2", "-r", "1")
    assert r.code == 0 and "\x1b" not in r.stdout + r.stderr and "[/oops]" in r.stdout, r.stdout + r.stderr


def test_error_lines_escape_control_characters(tmp_path):
    p = tmp_path / "evil\x1b[2J\x07name.gguf"
    line = clean_error(run_cli("info", p))
    assert "\\x1b[2J\\x07name.gguf" in line
