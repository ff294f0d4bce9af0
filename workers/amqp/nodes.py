"""Several RabbitMQ nodes of one cluster: a lost connection reconnects to the next one.

aio-pika's robust connection retries the URL it first connected to, so a worker or client
whose own node stops would wait for that node while the cluster serves on without it. The
connection classes here keep aio-pika's recovery (channels, consumers, qos restored) and
change one thing: when a connection is lost, the next attempt goes to the next node of
``AmqpSettings.nodes`` (round robin), so a process is back within a reconnect interval or
two of losing its node. With one node nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from yarl import URL

log = logging.getLogger(__name__)

_classes: dict[type[AbstractRobustConnection], type[AbstractRobustConnection]] = {}


class _NodeRotation:
    """Mixin for an aio-pika robust connection class: rotate ``url`` on connection loss."""

    url: URL
    #: Every node's URL, the one connected to first; set by ``rotating``'s caller.
    node_urls: tuple[URL, ...] = ()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        nodes = self.node_urls
        if len(nodes) > 1:
            here = next((i for i, u in enumerate(nodes) if u == self.url), -1)
            self.url = nodes[(here + 1) % len(nodes)]
            log.warning("RabbitMQ connection lost; reconnecting to the next node, %s:%s",
                        self.url.host, self.url.port)
        await super()._on_connection_close(closing)  # type: ignore[misc]


def rotating(base: type[AbstractRobustConnection]) -> type[AbstractRobustConnection]:
    """``base`` with node rotation (one class per base, made once)."""
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(f"Rotating{base.__name__}", (_NodeRotation, base), {})
    return cls
