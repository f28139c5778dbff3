"""The package's layers import downward only: a module may import its own layer and the ones
below it, never one above (README, Layout). Imports inside functions count too: a lazy import
upward is still a cycle waiting for whoever imports the other end first.

The modules are found by walking the source tree, so a new module or package is checked (or,
for a package not in LAYERS, refused) without anyone listing it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qwen3cli"

# lowest first; a top-level module is its own layer, a package one layer for all its modules.
# The root package (qwen3cli/__init__.py: the version, and the API's names imported on first
# use) is outside the order: every module loads it anyway, and it may name the API above all.
LAYERS = ["errors", "meta", "sampler", "safe_text", "paths", "model", "text",
          "demo",  # the built-in demo model (branch demo): may use model/ and text/, io/ and up may use it
          "io", "runtime", "serve", "cli", "api", "__main__"]


def layer_of(module: str) -> str:
    return module.split(".")[1]


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        yield ".".join(parts), is_pkg, path


def imported(module: str, is_pkg: bool, path: Path):
    """Every qwen3cli module this file imports, as (line, absolute name)."""
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "qwen3cli" or base.startswith("qwen3cli."):
                for a in node.names:
                    # `from . import x` names a module when x is one, else an attribute of base
                    full = f"{base}.{a.name}"
                    is_module = (ROOT.parent / Path(*full.split("."))).with_suffix(".py").exists() \
                        or (ROOT.parent / Path(*full.split("."))).is_dir()
                    yield node.lineno, full if is_module else base
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "qwen3cli" or a.name.startswith("qwen3cli."):
                    yield node.lineno, a.name


def test_every_top_level_name_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())} - {"__init__"}
    assert names - set(LAYERS) == set(), "add the new module or package to LAYERS (and to the README's layout)"


@pytest.mark.parametrize("module,is_pkg,path", [m for m in modules() if m[0] != "qwen3cli"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_downward(module, is_pkg, path):
    mine = layer_of(module)
    assert mine in LAYERS, f"{module}: its layer {mine!r} is not in LAYERS"
    up = [f"line {line}: {target}" for line, target in imported(module, is_pkg, path)
          if target != "qwen3cli" and LAYERS.index(layer_of(target)) > LAYERS.index(mine)]
    assert not up, f"{module} imports a layer above its own: {up}"
