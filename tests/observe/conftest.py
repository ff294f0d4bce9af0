"""Operability tests: the two-broker ``broker`` fixture and a scraper for /metrics."""

from __future__ import annotations

import uuid

import pytest

from tests.transport.conftest import BrokerHandle, broker

__all__ = ["BrokerHandle", "broker", "unique"]


@pytest.fixture
def unique() -> str:
    """A plan name unique to the test, so plan hashes (and RabbitMQ queues) never collide."""
    return f"t{uuid.uuid4().hex[:10]}"
