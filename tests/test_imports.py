"""Every module imports alone, in a fresh interpreter: an import cycle that the usual entry
points happen to enter in a working order (cli.py registering cli_run.py, which took `app` back
from cli.py) breaks whoever imports the other end first.

The modules are found by walking the source tree, so a new one is checked without anyone
listing it. One runner process forks a child per module, so that the interpreter starts once;
each child starts from the runner's state, in which nothing of the project is imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qwen3cli", "quant")

# Runs as `python -c RUNNER NAME...`; prints {name: [ok, output, modules loaded]} as JSON. The
# third item lists which of $WATCH_MODULES the import loaded (test_startup's heavy modules).
RUNNER = r"""
import json, os, sys, tempfile

watch = [m for m in os.environ.get("WATCH_MODULES", "").split(",") if m]


def child(name, out):
    # fd 1 and 2 go to the file: whatever the import prints, and its traceback
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    import importlib, traceback
    try:
        importlib.import_module(name)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out.name + ".loaded", "w") as f:
        json.dump([m for m in watch if m in sys.modules], f)
    os._exit(0)


def run_one(name):
    # where fork is missing (Windows): a whole interpreter per module, slower but as fresh
    import subprocess
    code = ("import sys, json, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps([m for m in sys.argv[2:] if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code, name, *watch], capture_output=True, text=True)
    if r.returncode:
        return [False, r.stdout + r.stderr, []]
    *printed, loaded = r.stdout.splitlines() or [""]
    return [True, "\n".join(printed) + r.stderr, json.loads(loaded or "[]")]


def main(names):
    results = {}
    if not hasattr(os, "fork"):
        return {n: run_one(n) for n in names}
    todo, running = list(names), {}
    jobs = max(1, min(4, os.cpu_count() or 1))
    while todo or running:
        while todo and len(running) < jobs:
            name = todo.pop(0)
            out = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)
            pid = os.fork()
            if pid == 0:
                child(name, out)
            running[pid] = (name, out)
        pid, status = os.wait()
        name, out = running.pop(pid)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        out.close()
        loaded = []
        if os.path.exists(out.name + ".loaded"):
            with open(out.name + ".loaded") as f:
                loaded = json.load(f)
            os.unlink(out.name + ".loaded")
        os.unlink(out.name)
        results[name] = [os.waitstatus_to_exitcode(status) == 0, text, loaded]
    return results


print(json.dumps(main(sys.argv[1:])))
"""


def modules_under(root: Path, packages=PACKAGES) -> list[str]:
    """Every importable module of the packages, from the files (nothing is imported to find
    them); __main__ is a program, run by `python -m`, not a module to import."""
    names = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if rel.name == "__main__" or not all(p.isidentifier() for p in parts):
                continue
            if all((root.joinpath(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
                names.append(".".join(parts))
    return names


def import_each(names: list[str], path: Path = ROOT, watch: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{name: (imported, what it printed or its traceback, which `watch` modules it loaded)},
    each name imported alone by a fresh process with `path` first on sys.path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]),
           "WATCH_MODULES": ",".join(watch)}
    r = subprocess.run([sys.executable, "-c", RUNNER, *names], capture_output=True, text=True, env=env, cwd=path,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    return {k: tuple(v) for k, v in json.loads(r.stdout.splitlines()[-1]).items()}


def failures(results: dict) -> dict[str, str]:
    return {name: out.strip().splitlines()[-1] if out.strip() else "(no output)"
            for name, (ok, out, _) in results.items() if not ok}


def test_every_module_imports_alone():
    names = modules_under(ROOT)
    assert {"qwen3cli", "qwen3cli.cli", "qwen3cli.cli.run", "quant.kernels.matmul_cpu"} <= set(names)
    results = import_each(names)
    assert sorted(results) == sorted(names)
    assert failures(results) == {}, "\n".join(f"{n}: {e}" for n, e in failures(results).items())
    assert {n: out for n, (_, out, _) in results.items() if out} == {}  # nothing prints, not even on import


def test_the_check_catches_an_import_cycle(tmp_path):
    """The shape the old cli.py had (it imported cli_bench, which took a helper from cli_run):
    importing the root first works, importing the command alone does not; a module that raises
    is reported too, with its error."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "root.py").write_text("app = object()\n\nfrom . import other  # noqa\n")
    (pkg / "other.py").write_text("from .command import helper  # noqa\n")
    (pkg / "command.py").write_text("from .root import app  # noqa\n\nhelper = object()\n")
    (pkg / "broken.py").write_text("raise RuntimeError('broken on import')\n")
    (pkg / "fine.py").write_text("import json\n")
    names = modules_under(tmp_path, ("cyc",))
    assert names == ["cyc", "cyc.broken", "cyc.command", "cyc.fine", "cyc.other", "cyc.root"]
    results = import_each(names, tmp_path)
    bad = failures(results)
    assert sorted(bad) == ["cyc.broken", "cyc.command"], results
    assert "circular import" in bad["cyc.command"] or "partially initialized" in bad["cyc.command"]
    assert "broken on import" in bad["cyc.broken"]


def test_the_backends_import_each_other_never():
    """The two backends share backend.py and prepare.py, not each other's module: ops_cuda alone
    loads no ops_cpu, and neither the model nor the CPU backend loads ops_cuda or numba.cuda (a
    CPU user needs no CUDA, principle 10)."""
    import importlib.util

    watch = ("qwen3cli.model.ops_cpu", "qwen3cli.model.ops_cuda", "numba.cuda")
    names = ["qwen3cli.model.forward", "qwen3cli.model.ops_cpu"]
    if importlib.util.find_spec("numba.cuda") is not None:
        names.append("qwen3cli.model.ops_cuda")
    results = import_each(names, watch=watch)
    assert failures(results) == {}
    loaded = {n: set(r[2]) for n, r in results.items()}
    assert loaded["qwen3cli.model.forward"] == set()  # the backend is imported when a model picks it
    assert loaded["qwen3cli.model.ops_cpu"] == {"qwen3cli.model.ops_cpu"}
    if "qwen3cli.model.ops_cuda" in loaded:
        assert loaded["qwen3cli.model.ops_cuda"] == {"qwen3cli.model.ops_cuda", "numba.cuda"}
