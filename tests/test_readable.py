"""Every function of the product reads at once (60 lines at most, STYLE.md), and modules
stay under 500 lines; the five that are over it may not grow (each is one class or one
format; the ceiling is its size when this test was written).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("conveyor", "workers", "brokerless", "converter")
FUNCTION_LINES = 60
MODULE_LINES = 500
#: Modules over MODULE_LINES, and the most lines each may have.
CEILINGS = {
    "workers/amqp/transport.py": 609,
    "conveyor/client.py": 563,
    "workers/stage_worker.py": 539,
    "conveyor/wire.py": 517,
    "conveyor/plan.py": 509,
}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_function_is_over_60_lines() -> None:
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size}")
    assert not long, long


def test_modules_stay_under_500_lines_or_their_ceiling() -> None:
    over = []
    for path in sources():
        name = path.relative_to(ROOT).as_posix()
        lines = path.read_text().count("\n")
        if lines > CEILINGS.get(name, MODULE_LINES):
            over.append(f"{name}: {lines} lines (limit {CEILINGS.get(name, MODULE_LINES)})")
    assert not over, over
