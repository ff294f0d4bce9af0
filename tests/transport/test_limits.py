"""Limits: max length (reject-publish and drop-head) and TTL expiry."""

from __future__ import annotations

import pytest

from conveyor.errors import BackpressureError
from conveyor.transport import Message, QueueSpec
from tests.support.brokers import BrokerHandle

from .support import Collector, depths, publish_bodies, queue_with_dlq


async def test_max_length_reject_publish_raises_backpressure(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("bounded")
    await t.declare_queue(QueueSpec(q, max_length=2, overflow="reject-publish"))
    await publish_bodies(t, "", q, [b"1", b"2"])
    with pytest.raises(BackpressureError) as info:
        await t.publish("", Message(body=b"3"), q)
    assert info.value.queue == q
    assert await depths(t, [q]) == {q: 2}

    # room again once a message is consumed
    got = Collector()
    consumer = await t.consume(q, got.handler(q), prefetch=1)
    await got.wait_for(2)
    await consumer.cancel()
    await publish_bodies(t, "", q, [b"3", b"4"])
    assert await depths(t, [q]) == {q: 2}
    assert got.bodies == [b"1", b"2"]


async def test_max_length_drop_head_dead_letters_the_oldest(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker, QueueSpec("", max_length=2, overflow="drop-head"))
    await publish_bodies(t, "", q, [b"1", b"2", b"3"])
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=5)
    await dead.wait_for(1)
    assert dead.bodies == [b"1"]
    assert dead.deliveries[0].message.headers["x-first-death-reason"] == "maxlen"
    kept = Collector()
    await t.consume(q, kept.handler(q), prefetch=5)
    await kept.wait_for(2)
    assert kept.bodies == [b"2", b"3"]


async def test_queue_ttl_dead_letters_expired_messages(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker, QueueSpec("", message_ttl_ms=50))
    await publish_bodies(t, "", q, [b"stale-1", b"stale-2"])
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=5)
    await dead.wait_for(2)
    assert dead.bodies == [b"stale-1", b"stale-2"]
    assert {d.message.headers["x-first-death-reason"] for d in dead.deliveries} == {"expired"}
    # the dead-lettered copy carries no TTL of its own
    assert all(d.message.expiration_ms is None for d in dead.deliveries)
    assert await depths(t, [q, dlq]) == {q: 0, dlq: 0}


async def test_per_message_ttl_expires_only_that_message(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker)
    await t.publish("", Message(body=b"short-lived", expiration_ms=50), q)
    await t.publish("", Message(body=b"keeper"), q)
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=5)
    await dead.wait_for(1)
    assert dead.bodies == [b"short-lived"]
    assert dead.deliveries[0].message.headers["x-first-death-reason"] == "expired"
    assert await depths(t, [q]) == {q: 1}


async def test_delivered_messages_do_not_expire(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker, QueueSpec("", message_ttl_ms=50))
    held = Collector(ack=False)
    await t.consume(q, held.handler(q), prefetch=1)
    await publish_bodies(t, "", q, [b"held", b"waiting"])
    await held.wait_for(1)
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=5)
    await dead.wait_for(1)  # the second, never delivered, expires
    assert dead.bodies == [b"waiting"]
    await held.deliveries[0].ack()  # the held one is still ours to settle
    assert await depths(t, [q]) == {q: 0}
