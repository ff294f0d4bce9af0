"""Operability tests: a unique plan name per test (``broker`` comes from tests/support)."""

from __future__ import annotations

import uuid

import pytest

# The RabbitMQ management API helper of the transport tests (closes connections from the
# broker's side), shared rather than written twice.
from tests.support.amqp import Management, management

__all__ = ["Management", "management", "unique"]


@pytest.fixture
def unique() -> str:
    """A plan name unique to the test, so plan hashes (and RabbitMQ queues) never collide."""
    return f"t{uuid.uuid4().hex[:10]}"
