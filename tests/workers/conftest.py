"""Worker test fixtures: the two-broker ``broker`` fixture and tiny plans with unique hashes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.transport.conftest import BrokerHandle, broker

__all__ = ["BrokerHandle", "broker", "unique"]


@pytest.fixture
def unique() -> str:
    """A plan name unique to the test, so plan hashes (and RabbitMQ queues) never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def plan_dir(tmp_path: Path) -> Path:
    return tmp_path
