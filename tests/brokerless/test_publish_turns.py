"""brokerless ``publish`` is confirmed on return and yields only after a burst: a loop
that does nothing but publish still lets consumers run (as a broker's confirms would)."""

from __future__ import annotations

from brokerless import Broker
from brokerless.transport import PUBLISH_BURST
from conveyor.transport import Delivery, Message, QueueSpec


async def test_a_publishing_loop_lets_consumers_run() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("q"))
    handled: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.message.body)
        await delivery.ack()

    await t.consume("q", handler, prefetch=0)
    seen_while_publishing = 0
    for i in range(4 * PUBLISH_BURST):
        await t.publish("", Message(body=str(i).encode()), "q")
        seen_while_publishing = len(handled)
    assert seen_while_publishing > 0
    await t.close(grace=1.0)


async def test_a_publish_is_in_the_queue_when_it_returns() -> None:
    t = Broker().connect()
    await t.declare_queue(QueueSpec("q"))
    await t.publish("", Message(body=b"x"), "q")
    assert (await t.queue_stats("q")).depth == 1
    await t.close(grace=0.0)
