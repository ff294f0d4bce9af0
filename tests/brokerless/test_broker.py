"""brokerless-only behaviour: memory budget, queue lifecycle, handler failures, routing details."""

from __future__ import annotations

import asyncio
import logging

import pytest

from brokerless import Broker
from brokerless.exchanges import topic_matches
from conveyor.errors import BackpressureError, ConfigError, TransportError, UnroutableError
from conveyor.transport import (
    Delivery,
    ExchangeSpec,
    ExchangeType,
    Message,
    QueueSpec,
    Transport,
)
from tests.transport.support import Collector


def test_connect_gives_a_transport() -> None:
    assert isinstance(Broker().connect(), Transport)


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_bytes"):
        Broker(max_bytes=0)


async def test_memory_budget_refuses_publishes_until_messages_leave() -> None:
    broker = Broker(max_bytes=100)
    t = broker.connect()
    await t.declare_exchange(ExchangeSpec("fan", ExchangeType.FANOUT))
    for q in ("a", "b", "c"):
        await t.declare_queue(QueueSpec(q))
        await t.bind_queue(q, "fan")
    await t.publish("fan", Message(body=b"x" * 60))
    # one body shared by three queues is charged once
    assert broker.statistics().memory.used_bytes == 60
    with pytest.raises(BackpressureError, match="max_bytes=100") as info:
        await t.publish("fan", Message(body=b"y" * 60))
    assert info.value.queue is None

    drained = Collector()
    for q in ("a", "b"):
        await t.consume(q, drained.handler(q), prefetch=1)
    await drained.wait_for(2)
    assert broker.statistics().memory.used_bytes == 60  # c still holds its copy
    await t.consume("c", drained.handler("c"), prefetch=1)
    await drained.wait_for(3)
    assert broker.statistics().memory.used_bytes == 0
    await t.publish("fan", Message(body=b"y" * 60))


async def test_reject_publish_on_one_queue_enqueues_nowhere() -> None:
    t = Broker().connect()
    await t.declare_exchange(ExchangeSpec("fan", ExchangeType.FANOUT))
    await t.declare_queue(QueueSpec("full", max_length=1))
    await t.declare_queue(QueueSpec("roomy"))
    await t.bind_queue("full", "fan")
    await t.bind_queue("roomy", "fan")
    await t.publish("fan", Message(body=b"1"))
    with pytest.raises(BackpressureError, match="'full'") as info:
        await t.publish("fan", Message(body=b"2"))
    assert info.value.queue == "full"
    assert (await t.queue_stats("roomy")).depth == 1


async def test_max_length_bytes_drop_head() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("q", max_length_bytes=10, overflow="drop-head"))
    for body in (b"aaaa", b"bbbb", b"cccc"):
        await t.publish("", Message(body=body), "q")
    got = Collector()
    await t.consume("q", got.handler("q"), prefetch=10)
    await got.wait_for(2)
    assert got.bodies == [b"bbbb", b"cccc"]


async def test_handler_error_rejects_to_the_dead_letter_exchange(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = Broker().connect()
    await t.declare_exchange(ExchangeSpec("dlx", ExchangeType.FANOUT))
    await t.declare_queue(QueueSpec("dead"))
    await t.bind_queue("dead", "dlx")
    await t.declare_queue(QueueSpec("q", dead_letter_exchange="dlx"))

    async def broken(delivery: Delivery) -> None:
        raise ValueError("model exploded")

    await t.consume("q", broken, prefetch=1)
    dead = Collector()
    await t.consume("dead", dead.handler("dead"), prefetch=1)
    with caplog.at_level(logging.ERROR, logger="brokerless"):
        await t.publish("", Message(body=b"x", message_id="m-1"), "q")
        await dead.wait_for(1)
    assert dead.deliveries[0].message.headers["x-first-death-reason"] == "rejected"
    assert "m-1" in caplog.text and "model exploded" in caplog.text


async def test_settling_twice_is_an_error() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("q"))
    await t.publish("", Message(body=b"x"), "q")
    held = Collector(ack=False)
    await t.consume("q", held.handler("q"), prefetch=1)
    await held.wait_for(1)
    await held.deliveries[0].ack()
    with pytest.raises(TransportError, match="already acked"):
        await held.deliveries[0].reject()


async def test_deleting_a_queue_drops_its_messages_and_consumers() -> None:
    broker = Broker()
    t = broker.connect()
    await t.declare_queue(QueueSpec("q"))
    for body in (b"1", b"2"):
        await t.publish("", Message(body=body), "q")
    held = Collector(ack=False)
    consumer = await t.consume("q", held.handler("q"), prefetch=1)
    await held.wait_for(1)
    await t.delete_queue("q")
    assert broker.statistics().memory.used_bytes == 0
    await held.deliveries[0].ack()  # settling a delivery of a deleted queue is harmless
    await consumer.cancel()
    with pytest.raises(UnroutableError):
        await t.publish("", Message(body=b"3"), "q")
    with pytest.raises(TransportError, match="'q'"):
        await t.queue_stats("q")


async def test_exclusive_queue_belongs_to_its_connection() -> None:
    broker = Broker()
    owner, other = broker.connect(), broker.connect()
    await owner.declare_queue(QueueSpec("mine", exclusive=True))
    with pytest.raises(TransportError, match="RESOURCE_LOCKED"):
        await other.consume("mine", Collector().handler("mine"), prefetch=1)
    await owner.close(grace=0)
    with pytest.raises(TransportError, match="'mine'"):
        await other.queue_stats("mine")


async def test_auto_delete_queue_goes_with_its_last_consumer() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("replies", auto_delete=True))
    first = await t.consume("replies", Collector().handler("replies"), prefetch=1)
    second = await t.consume("replies", Collector().handler("replies"), prefetch=1)
    await first.cancel()
    assert (await t.queue_stats("replies")).consumers == 1
    await second.cancel()
    with pytest.raises(TransportError, match="'replies'"):
        await t.queue_stats("replies")


async def test_prefetch_zero_is_unlimited_and_negative_is_refused() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("q"))
    with pytest.raises(ConfigError, match="prefetch"):
        await t.consume("q", Collector().handler("q"), prefetch=-1)
    for i in range(20):
        await t.publish("", Message(body=str(i).encode()), "q")
    held = Collector(ack=False)
    await t.consume("q", held.handler("q"), prefetch=0)
    await held.wait_for(20)
    assert (await t.queue_stats("q")).depth == 0


async def test_close_from_inside_a_handler_does_not_deadlock() -> None:
    broker = Broker()
    t = broker.connect()
    await t.declare_queue(QueueSpec("q"))
    await t.publish("", Message(body=b"x"), "q")
    closed = asyncio.Event()

    async def close_myself(delivery: Delivery) -> None:
        await t.close(grace=1.0)
        closed.set()

    await t.consume("q", close_myself, prefetch=1)
    await asyncio.wait_for(closed.wait(), 5)
    # the unsettled delivery went back to the queue for someone else
    again = Collector()
    await broker.connect().consume("q", again.handler("q"), prefetch=1)
    await again.wait_for(1)
    assert again.deliveries[0].redelivered


async def test_consistent_hash_weights_are_proportional() -> None:
    t = Broker().connect()
    await t.declare_exchange(ExchangeSpec("h", ExchangeType.HASH))
    await t.declare_queue(QueueSpec("light"))
    await t.declare_queue(QueueSpec("heavy"))
    await t.bind_queue("light", "h", "1")
    await t.bind_queue("heavy", "h", "3")
    with pytest.raises(TransportError, match="weight"):
        await t.bind_queue("light", "h", "one")
    n = 4000
    for i in range(n):
        await t.publish("h", Message(body=b""), f"key-{i}")
    heavy = (await t.queue_stats("heavy")).depth
    assert (await t.queue_stats("light")).depth + heavy == n
    assert 0.65 < heavy / n < 0.85  # expected 0.75


async def test_hash_header_missing_is_unroutable() -> None:
    t = Broker().connect()
    await t.declare_exchange(ExchangeSpec("h", ExchangeType.HASH, hash_header="key"))
    await t.declare_queue(QueueSpec("q"))
    await t.bind_queue("q", "h", "1")
    with pytest.raises(UnroutableError):
        await t.publish("h", Message(body=b""), "rk")


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#.c", "a.b.c", True),
        ("#.c", "c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y", False),
        ("#.#", "a", True),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("#", "", True),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
