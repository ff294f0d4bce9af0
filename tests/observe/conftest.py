"""Operability tests: the management API helper (``broker`` and ``unique`` come from
tests/support)."""

from __future__ import annotations

# The RabbitMQ management API helper of the transport tests (closes connections from the
# broker's side), shared rather than written twice.
from tests.support.amqp import Management, management

__all__ = ["Management", "management"]

