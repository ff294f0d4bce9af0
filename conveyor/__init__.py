"""Conveyor: distributed deep-learning inference over RabbitMQ or an embedded broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError
from conveyor.plan import Plan

__all__ = ["ConveyorError", "Plan", "connect"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from conveyor.app.connect import connect


def __getattr__(name: str) -> Any:
    # The application pulls in asyncio machinery and the transports; import it on first use.
    if name == "connect":
        from conveyor.app.connect import connect

        return connect
    raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
