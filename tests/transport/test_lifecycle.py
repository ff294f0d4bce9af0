"""Queue lifecycle: auto-delete, exclusive and deleted queues."""

from __future__ import annotations

import pytest

from conveyor.errors import TransportError, UnroutableError
from conveyor.transport import Message, QueueSpec
from tests.support.brokers import BrokerHandle

from .support import Collector


async def test_auto_delete_queue_goes_with_its_last_consumer(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("replies")
    await t.declare_queue(QueueSpec(q, auto_delete=True))
    first = await t.consume(q, Collector().handler(q), prefetch=1)
    second = await t.consume(q, Collector().handler(q), prefetch=1)
    await first.cancel()
    assert (await t.queue_stats(q)).consumers == 1
    await second.cancel()
    with pytest.raises(TransportError, match=q):
        await t.queue_stats(q)


async def test_exclusive_queue_is_deleted_with_its_connection(broker: BrokerHandle) -> None:
    owner, other = await broker.connect(), await broker.connect()
    q = broker.name("private")
    await owner.declare_queue(QueueSpec(q, exclusive=True))
    await owner.publish("", Message(body=b"x"), q)
    assert (await owner.queue_stats(q)).depth == 1
    await owner.close(grace=0.1)
    with pytest.raises(UnroutableError):
        await other.publish("", Message(body=b"y"), q)


async def test_deleted_queue_takes_its_messages(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("doomed")
    await t.declare_queue(QueueSpec(q))
    await t.publish("", Message(body=b"x"), q)
    await t.delete_queue(q)
    with pytest.raises(UnroutableError):
        await t.publish("", Message(body=b"y"), q)
    await t.declare_queue(QueueSpec(q))
    assert (await t.queue_stats(q)).depth == 0
