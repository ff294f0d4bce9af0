"""Consuming: prefetch, round-robin, ack/reject/requeue, redelivery, dead-lettering."""

from __future__ import annotations

from conveyor.transport import Delivery, QueueSpec
from tests.support.brokers import BrokerHandle

from .support import Collector, depths, publish_bodies, queue_with_dlq


async def test_prefetch_limits_unacknowledged_deliveries(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [str(i).encode() for i in range(10)])
    never_acks = Collector(ack=False)
    await t.consume(q, never_acks.handler(q), prefetch=3)
    await never_acks.wait_for(3)
    assert await depths(t, [q]) == {q: 7}  # a broker round trip: nothing more was sent
    assert len(never_acks.received) == 3
    assert never_acks.bodies == [b"0", b"1", b"2"]  # in order
    stats = await t.queue_stats(q)
    assert stats.consumers == 1


async def test_round_robin_between_consumers(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    both = Collector(ack=False)
    await t.consume(q, both.handler("first"), prefetch=100)
    await t.consume(q, both.handler("second"), prefetch=100)
    await publish_bodies(t, "", q, [str(i).encode() for i in range(10)])
    await both.wait_for(10)
    by_consumer = [tag for tag, _ in both.received]
    assert by_consumer.count("first") == by_consumer.count("second") == 5
    assert len(set(both.bodies)) == 10


async def test_prefetch_change_while_consuming(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [str(i).encode() for i in range(10)])
    held = Collector(ack=False)
    consumer = await t.consume(q, held.handler(q), prefetch=2)
    await held.wait_for(2)
    assert await depths(t, [q]) == {q: 8}

    await consumer.set_prefetch(5)  # raising lets more flow at once
    assert consumer.prefetch == 5
    await held.wait_for(5)
    assert await depths(t, [q]) == {q: 5}
    assert len(held.received) == 5

    await consumer.set_prefetch(1)  # lowering: nothing new until unacked < 1
    for delivery in held.deliveries[:4]:
        await delivery.ack()
    assert await depths(t, [q]) == {q: 5}
    assert len(held.received) == 5
    await held.deliveries[4].ack()
    await held.wait_for(6)
    assert await depths(t, [q]) == {q: 4}
    assert len(held.received) == 6


async def test_unacked_messages_are_redelivered_when_the_connection_closes(
    broker: BrokerHandle,
) -> None:
    admin = await broker.connect()
    q = broker.name("q")
    await admin.declare_queue(QueueSpec(q))
    bodies = [str(i).encode() for i in range(5)]
    await publish_bodies(admin, "", q, bodies)

    doomed = await broker.connect()
    held = Collector(ack=False)
    await doomed.consume(q, held.handler(q), prefetch=10)
    await held.wait_for(5)
    assert not any(d.redelivered for d in held.deliveries)
    await doomed.close(grace=0.1)

    survivor = await broker.connect()
    got = Collector()
    await survivor.consume(q, got.handler(q), prefetch=10)
    await got.wait_for(5)
    assert sorted(got.bodies) == sorted(bodies)
    assert all(d.redelivered for d in got.deliveries)


async def test_cancelled_consumer_returns_unsettled_messages(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [b"a", b"b", b"c"])
    held = Collector(ack=False)
    consumer = await t.consume(q, held.handler(q), prefetch=2)
    await held.wait_for(2)
    await consumer.cancel()
    stats = await t.queue_stats(q)
    assert stats.consumers == 0
    assert stats.depth == 3  # a and b came back, c was never delivered

    again = Collector()
    await t.consume(q, again.handler(q), prefetch=5)
    await again.wait_for(3)
    assert again.bodies == [b"a", b"b", b"c"]  # returned messages are back at the head
    assert [d.redelivered for d in again.deliveries] == [True, True, False]


async def test_requeue_puts_the_message_back_at_the_head(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [b"first", b"second"])
    seen = Collector(ack=False)
    await t.consume(q, seen.handler(q), prefetch=1)
    await seen.wait_for(1)
    await seen.deliveries[0].requeue()
    await seen.wait_for(2)
    assert seen.bodies == [b"first", b"first"]
    assert [d.redelivered for d in seen.deliveries] == [False, True]


async def test_ack_settles_for_good(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [b"x"])
    consumer_conn = await broker.connect()
    got = Collector()
    await consumer_conn.consume(q, got.handler(q), prefetch=1)
    await got.wait_for(1)
    await consumer_conn.close(grace=1.0)
    assert await depths(t, [q]) == {q: 0}


async def test_reject_dead_letters_with_the_reason(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker)
    await publish_bodies(t, "", q, [b"bad"])

    async def refuse(delivery: Delivery) -> None:
        await delivery.reject()

    await t.consume(q, refuse, prefetch=1)
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=1)
    await dead.wait_for(1)
    (delivery,) = dead.deliveries
    assert delivery.message.body == b"bad"
    assert delivery.message.headers["x-first-death-reason"] == "rejected"
    assert delivery.message.headers["x-first-death-queue"] == q
    assert await depths(t, [q]) == {q: 0}


async def test_reject_without_dead_letter_exchange_drops(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("q")
    await t.declare_queue(QueueSpec(q))
    await publish_bodies(t, "", q, [b"bad", b"good"])
    seen = Collector(ack=False)
    consumer = await t.consume(q, seen.handler(q), prefetch=1)
    await seen.wait_for(1)
    await seen.deliveries[0].reject()
    await seen.wait_for(2)
    await seen.deliveries[1].ack()
    await consumer.cancel()
    assert seen.bodies == [b"bad", b"good"]
    assert await depths(t, [q]) == {q: 0}


async def test_delivery_limit_dead_letters_after_too_many_returns(broker: BrokerHandle) -> None:
    t = await broker.connect()
    limit = 2
    q, dlq = await queue_with_dlq(
        t, broker, QueueSpec("", durable=True, quorum=True, delivery_limit=limit)
    )
    await publish_bodies(t, "", q, [b"poison"])
    attempts = Collector(ack=False)

    async def always_requeue(delivery: Delivery) -> None:
        await attempts.handler(q)(delivery)
        await delivery.requeue()

    await t.consume(q, always_requeue, prefetch=1)
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=1)
    await dead.wait_for(1)
    # as on RabbitMQ quorum queues: returned more than `limit` times -> dead-lettered
    assert len(attempts.received) == limit + 1
    assert [d.delivery_count for d in attempts.deliveries] == [1, 2, 3]
    assert [d.redelivered for d in attempts.deliveries] == [False, True, True]
    assert dead.deliveries[0].message.headers["x-first-death-reason"] == "delivery_limit"


async def test_a_failing_handler_rejects_its_delivery(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q, dlq = await queue_with_dlq(t, broker)

    async def broken(delivery: Delivery) -> None:
        raise RuntimeError("handler bug")

    await t.consume(q, broken, prefetch=1)
    dead = Collector()
    await t.consume(dlq, dead.handler(dlq), prefetch=1)
    await publish_bodies(t, "", q, [b"first", b"second"])
    await dead.wait_for(2)  # not requeued in a loop: dead-lettered, one after the other
    assert dead.bodies == [b"first", b"second"]
    assert {d.message.headers["x-first-death-reason"] for d in dead.deliveries} == {"rejected"}
