"""The converter's modules form no import cycle, and each one imports on its own.

The graph counts every import, module-level and inside functions alike: a lazy import
that only breaks a cycle at import time still ties the modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "converter"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(path: Path) -> set[str]:
    """Converter modules (``__init__`` as ``converter``) that ``path`` imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "converter":  # `from converter import api` names a module
                names = [f"converter.{a.name}" if a.name in MODULES else "converter"
                         for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "converter":
                found.add(parts[1] if len(parts) > 1 and parts[1] in MODULES else "converter")
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {m: _imports(PACKAGE / f"{m}.py") - {m} for m in MODULES}
    graph["converter"] = _imports(PACKAGE / "__init__.py") - {"converter"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_converter_modules_import_no_cycle() -> None:
    graph = module_graph()
    assert {"costs", "extract", "graph", "verify"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import converter.{module}"],
                          capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_converter_functions_and_modules_stay_readable() -> None:
    """No function over 60 lines, no module over 500 (STYLE.md: read in one sitting)."""
    long: list[str] = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500:
            long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {size} lines")
    assert not long, long
