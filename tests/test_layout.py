"""The package's shape: imports go one way (no cycle between slotgen's modules) and the command line
lives in slotgen/cli.py (plus scripts/), not as `main`s inside package modules."""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slotgen"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the slotgen modules it imports, anywhere in its file (top level or inside functions).

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``.
    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those implicit edges are left out
    (a package's ``__init__`` importing its own submodules is not a cycle)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(filter(None, (owner(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    dep = target if target in mods else owner(base)
                    if dep:
                        deps.add(dep)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "slotgen.snapshot" in graph["slotgen.render"]  # function-level imports count too
    assert "slotgen.memory.registry" in graph["slotgen.memory.window"]


def test_no_import_cycle_in_slotgen():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_snapshot_format_knows_nothing_of_the_renderer():
    graph = import_graph()
    assert not {"slotgen.render", "slotgen.resume", "slotgen.cli"} & graph["slotgen.snapshot"]


def test_no_command_line_inside_package_modules():
    """argparse, `def main` and `if __name__ == "__main__"` only in slotgen/cli.py and slotgen/__main__.py."""
    allowed = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}
    offenders = []
    for path in modules().values():
        if path in allowed:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "argparse" in names:
                    offenders.append(f"{path.name}:{node.lineno} imports argparse")
            elif isinstance(node, ast.FunctionDef) and node.name == "main" and node in tree.body:
                offenders.append(f"{path.name}:{node.lineno} defines main()")
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__":
                offenders.append(f"{path.name}:{node.lineno} has a __main__ block")
    assert not offenders, offenders


@pytest.mark.slow
def test_running_the_miniature_module_leaves_the_shipped_weights_alone():
    assets = sorted((PACKAGE / "models" / "assets").rglob("*"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in assets if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "slotgen.models.miniature"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in assets if p.is_file()}
    assert before and after == before
