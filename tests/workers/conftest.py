"""Worker test fixtures: plan names unique to a test (``broker`` and ``pipeline`` come from
tests/support, registered in tests/conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest


@pytest.fixture
def unique() -> str:
    """A plan name unique to the test, so plan hashes (and RabbitMQ queues) never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def plan_dir(tmp_path: Path) -> Path:
    return tmp_path
