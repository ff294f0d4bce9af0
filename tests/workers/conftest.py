"""Worker test fixtures (``broker``, ``pipeline`` and ``unique``, a plan name unique to a
test, come from tests/support, registered in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def plan_dir(tmp_path: Path) -> Path:
    return tmp_path
