"""The package's layout, as docs/design.md draws it: each module imports only those below it.

No import circle, no import of our own modules inside a function (the
when-imported hooks are how a rule waits for torch's module), the native path
never imports the fallback, and no product file outgrows a screenful of screens.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "gradbridge_ext"
MAX_LINES = 400


def _own_imports(tree: ast.AST, module: str) -> list[tuple[str, ast.AST]]:
    """(imported module, node) for each import of one of the package's own modules."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(name.split(".")[0], node) for name in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradbridge_ext."):
            found.append((node.module.split(".")[1], node))
    return found


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """Which of the package's modules each imports at its top level, and the imports made inside functions."""
    graph, deferred = {}, []
    for path in sorted(package.glob("*.py")):
        module = path.stem
        tree = ast.parse(path.read_text())
        inside_functions = {
            id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)
        }  # fmt: skip
        graph[module] = set()
        for name, node in _own_imports(tree, module):
            if id(node) in inside_functions:
                deferred.append(f"{module} imports {name} inside a function (line {node.lineno})")
            elif name != "_C":  # the binary: no Python module to import back
                graph[module].add(name)
    return graph, deferred


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_no_module_of_the_package_imports_in_a_circle() -> None:
    graph, _ = import_graph()
    assert circles(graph) == []


def test_the_circle_check_sees_a_circle(tmp_path: Path) -> None:
    # What the check above would say of the layout this one replaced (ops <-> _fallback).
    (tmp_path / "ops.py").write_text("from . import _fallback\n")
    (tmp_path / "_fallback.py").write_text("from .ops import bridge\n")
    graph, _ = import_graph(tmp_path)
    assert circles(graph) == [["_fallback", "ops", "_fallback"]]


def test_no_own_import_is_deferred_to_a_call() -> None:
    _, deferred = import_graph()
    assert deferred == []


def test_the_native_path_never_imports_the_fallback() -> None:
    probe = "import sys, gradbridge_ext as g; assert g.NATIVE; print(sorted(m for m in sys.modules if m.startswith('gradbridge_ext')))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gradbridge_ext._fallback" not in result.stdout
    assert "gradbridge_ext.ops" in result.stdout  # the probe saw the package's modules


@pytest.mark.parametrize("path", sorted([*PACKAGE.glob("*.py"), *(REPO / "csrc").glob("*")]), ids=lambda p: p.name)
def test_no_product_file_is_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES
