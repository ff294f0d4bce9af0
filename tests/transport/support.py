"""Helpers for the conformance suite: collect deliveries and wait on conditions
(tests/support/polling.py), not sleeps."""

from __future__ import annotations

import dataclasses

from conveyor.transport import (
    Delivery,
    ExchangeSpec,
    ExchangeType,
    Handler,
    Message,
    QueueSpec,
    Transport,
)
from tests.support.brokers import BrokerHandle
from tests.support.polling import until

TIMEOUT = 10.0


class Collector:
    """Records deliveries (with the queue they came from) and lets a test wait for them."""

    def __init__(self, *, ack: bool = True) -> None:
        self.ack = ack
        self.received: list[tuple[str, Delivery]] = []

    def handler(self, queue: str) -> Handler:
        async def handle(delivery: Delivery) -> None:
            self.received.append((queue, delivery))
            if self.ack:
                await delivery.ack()

        return handle

    async def wait_for(self, count: int, within: float = TIMEOUT) -> None:
        await until(lambda: len(self.received) >= count, within,
                    lambda: f"{count} deliveries ({len(self.received)} in)")

    @property
    def deliveries(self) -> list[Delivery]:
        return [d for _, d in self.received]

    @property
    def bodies(self) -> list[bytes]:
        return [d.message.body for _, d in self.received]

    def queues_of(self, body: bytes) -> set[str]:
        return {q for q, d in self.received if d.message.body == body}


async def publish_bodies(
    transport: Transport, exchange: str, routing_key: str, bodies: list[bytes]
) -> None:
    for body in bodies:
        await transport.publish(exchange, Message(body=body), routing_key)


async def depths(transport: Transport, queues: list[str]) -> dict[str, int]:
    return {q: (await transport.queue_stats(q)).depth for q in queues}


async def queue_with_dlq(
    t: Transport, broker: BrokerHandle, spec: QueueSpec | None = None
) -> tuple[str, str]:
    """A queue whose dead-letter exchange (fanout) feeds a second queue; returns both names."""
    dlx, dlq, q = broker.name("dlx"), broker.name("dlq"), broker.name("q")
    await t.declare_exchange(ExchangeSpec(dlx, ExchangeType.FANOUT))
    await t.declare_queue(QueueSpec(dlq))
    await t.bind_queue(dlq, dlx)
    base = spec or QueueSpec(q)
    await t.declare_queue(dataclasses.replace(base, name=q, dead_letter_exchange=dlx))
    return q, dlq
