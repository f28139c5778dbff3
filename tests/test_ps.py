"""`qwen3cli ps` (issue 15, part 3): the models held by running serve / chat processes, from
the entries they leave in the runtime directory; stale and broken entries never break it."""

import json
import os
import signal
import subprocess
import sys
import time

from qwen3cli.runtime import running

from test_cli import run


def test_an_entry_lives_as_long_as_its_block(tmp_path):
    with running.registered("chat", "some/model", 4096, "cpu", directory=tmp_path) as me:
        [r] = running.running(tmp_path)
        assert (r.pid, r.kind, r.model, r.ctx, r.device) == (os.getpid(), "chat", "some/model", 4096, "cpu")
        assert r.started == me.started and (r.rss is None or r.rss > 10_000_000)
    assert running.running(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_dead_and_broken_entries_are_dropped(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    entry = {"pid": pid, "kind": "serve", "model": "m", "ctx": 1, "device": "cpu", "started": 0.0, "url": None}
    (tmp_path / f"{pid}.json").write_text(json.dumps(entry))
    (tmp_path / f"{os.getpid()}.json").write_text("{not json")  # ours, alive, unreadable: skipped, kept
    (tmp_path / "99999999.json").write_text(json.dumps({**entry, "pid": os.getpid()}))  # name and pid disagree
    assert running.running(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{os.getpid()}.json"]


def test_an_unwritable_directory_only_means_not_listed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with running.registered("chat", "m", 1, "cpu", directory=blocker / "sub"):
        assert running.running(blocker / "sub") == []


def test_ps_lists_a_running_server_until_it_dies(gguf_model, tmp_path):
    path, _ = gguf_model("q8_0")
    env = {**os.environ, "QWEN3CLI_RUNTIME_DIR": str(tmp_path)}
    code, _, stderr = run("ps")
    proc = subprocess.Popen([sys.executable, "-m", "qwen3cli", "serve", str(path), "--port", "0", "--ctx", "256"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "serving" in line, line
        old = os.environ.get("QWEN3CLI_RUNTIME_DIR")
        os.environ["QWEN3CLI_RUNTIME_DIR"] = str(tmp_path)
        try:
            code, stdout, _ = run("ps", "--json")
            assert code == 0
            [r] = json.loads(stdout)
            assert (r["pid"], r["kind"], r["model"], r["ctx"], r["device"]) == (proc.pid, "serve", str(path), 256, "cpu")
            assert r["url"] and r["url"] in line
            code, table, _ = run("ps")
            assert code == 0 and str(proc.pid) in table and "serve" in table and path.name in table, table
            proc.send_signal(signal.SIGKILL)  # no chance to remove its entry
            proc.wait(30)
            code, stdout, stderr = run("ps", "--json")
            assert code == 0 and json.loads(stdout) == [] and list(tmp_path.iterdir()) == []
            code, _, stderr = run("ps")
            assert code == 0 and "no models loaded" in stderr
        finally:
            if old is None:
                del os.environ["QWEN3CLI_RUNTIME_DIR"]
            else:
                os.environ["QWEN3CLI_RUNTIME_DIR"] = old
    finally:
        proc.kill()
        proc.wait(30)
