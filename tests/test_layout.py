"""Imports go one way (shared/DESIGN.md, "Layout"): a test reads every import of the product.

* ``conveyor`` outside ``conveyor.app`` (the contracts) imports no component and not the
  application; the one exception is ``conveyor/__init__.py`` handing out ``connect``.
* ``converter``, ``brokerless`` and ``workers`` import each other only through
  ``conveyor``'s contracts, and never the application.

Every import counts: module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("converter", "brokerless", "workers")
APP = "conveyor.app"
#: (importing file, imported module prefix) pairs allowed beside the rules.
EXCEPTIONS = {
    ("conveyor/__init__.py", "conveyor.app.connect"),  # conveyor.connect, imported on first use
    ("conveyor/__main__.py", "conveyor.app.cli"),  # python -m conveyor
}


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def violations(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    own = _top(_module_of(path, root))
    in_app = _module_of(path, root).startswith(APP)
    bad = []
    for line, module in imports_of(path, root):
        if any(rel == f and module.startswith(m) for f, m in EXCEPTIONS):
            continue
        target = _top(module)
        wrong = (
            (own == "conveyor" and not in_app and (target in COMPONENTS or module.startswith(APP)))
            or (own in COMPONENTS and target in COMPONENTS and target != own)
            or (own in COMPONENTS and module.startswith(APP))
        )
        if wrong:
            bad.append(f"{rel}:{line} imports {module}")
    return bad


def product_files() -> list[Path]:
    return sorted(p for pkg in ("conveyor", *COMPONENTS) for p in (ROOT / pkg).rglob("*.py"))


def test_imports_go_one_way() -> None:
    bad = [v for path in product_files() for v in violations(path)]
    assert not bad, "imports against the layout (shared/DESIGN.md):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("conveyor/wire.py", "from workers.session import StageSession", 1),
        ("conveyor/plan.py", "import brokerless", 1),
        ("conveyor/plan.py", "from conveyor.app.transports import BrokerTarget", 1),
        ("conveyor/app/connect.py", "import workers", 0),
        ("workers/outbox.py", "from brokerless import Broker", 1),
        ("workers/outbox.py", "def f():\n    from converter.graph import analyze", 1),
        ("brokerless/queue.py", "from conveyor.app import cli", 1),
        ("workers/amqp/transport.py", "from ..session import Tensor", 0),
        ("converter/api.py", "from conveyor.errors import SplitError", 0),
    ],
)
def test_the_check_sees_wrong_imports(
    tmp_path: Path, where: str, source: str, expected: int
) -> None:
    """The checker itself: each wrong direction is found, each right one passes."""
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert len(violations(path, tmp_path)) == expected
