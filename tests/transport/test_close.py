"""Orderly close: nothing accepted is lost, a closed transport refuses work."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.errors import TransportClosed
from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.brokers import BrokerHandle

from .support import Collector, publish_bodies

N = 50


async def test_close_with_grace_loses_nothing(broker: BrokerHandle) -> None:
    admin = await broker.connect()
    q = broker.name("work")
    await admin.declare_queue(QueueSpec(q))
    bodies = [f"m{i}".encode() for i in range(N)]
    await publish_bodies(admin, "", q, bodies)

    first = await broker.connect()
    acked_by_first: list[bytes] = []
    midway = asyncio.Event()
    stuck = asyncio.Event()  # never set: handlers past the midpoint hang until cancelled

    async def slow_then_stuck(delivery: Delivery) -> None:
        if len(acked_by_first) >= 10:
            midway.set()
            await stuck.wait()
        await delivery.ack()
        acked_by_first.append(delivery.message.body)

    await first.consume(q, slow_then_stuck, prefetch=5)
    await asyncio.wait_for(midway.wait(), 10)
    await first.close(grace=0.5)  # the stuck handlers are cancelled, their messages return

    second = await broker.connect()
    rest = Collector()
    await second.consume(q, rest.handler(q), prefetch=10)
    await rest.wait_for(N - len(acked_by_first))
    acked = acked_by_first + rest.bodies
    assert sorted(acked) == sorted(bodies)  # every message acked exactly once
    # those the first connection held but never settled come back marked redelivered
    assert any(d.redelivered for d in rest.deliveries)
    assert (await admin.queue_stats(q)).depth == 0


async def test_handlers_finishing_within_grace_settle_normally(broker: BrokerHandle) -> None:
    admin = await broker.connect()
    q = broker.name("work")
    await admin.declare_queue(QueueSpec(q))
    bodies = [f"m{i}".encode() for i in range(10)]
    await publish_bodies(admin, "", q, bodies)

    first = await broker.connect()
    gate = asyncio.Event()
    started: list[bytes] = []
    acked_by_first: list[bytes] = []
    all_started = asyncio.Event()

    async def gated(delivery: Delivery) -> None:
        started.append(delivery.message.body)
        if len(started) == 3:
            all_started.set()
        await gate.wait()
        await delivery.ack()
        acked_by_first.append(delivery.message.body)

    await first.consume(q, gated, prefetch=3)
    await asyncio.wait_for(all_started.wait(), 10)
    closing = asyncio.ensure_future(first.close(grace=10))
    gate.set()  # the in-flight handlers finish during the grace period
    await asyncio.wait_for(closing, 15)
    assert sorted(acked_by_first) == sorted(started)

    second = await broker.connect()
    rest = Collector()
    await second.consume(q, rest.handler(q), prefetch=10)
    await rest.wait_for(len(bodies) - len(acked_by_first))
    assert sorted(acked_by_first + rest.bodies) == sorted(bodies)
    assert not any(d.redelivered for d in rest.deliveries)


async def test_closed_transport_refuses_work(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await t.close(grace=0.1)
    await t.close(grace=0.1)  # idempotent
    with pytest.raises(TransportClosed):
        await t.publish("", Message(body=b"x"), q)
    with pytest.raises(TransportClosed):
        await t.declare_queue(QueueSpec(broker.name("other")))
    with pytest.raises(TransportClosed):
        await t.consume(q, Collector().handler(q), prefetch=1)
