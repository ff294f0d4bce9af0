"""A requeue that meets a dying connection must not lose the consumer.

A worker requeues a delivery when it cannot publish onward (the next stage refused, the
broker went away). Under a channel limit the requeue briefly cancels the consumer so the
message stays first (``AmqpConsumer.requeue_at_head``). If the connection dies while that
``basic.cancel`` waits for its answer, aio-pika's restore must still consume again: the
consumer is gone only if someone meant to stop it. (Seen in the fault suite: after a
``stop_app`` two of three stage workers came back without their consumer and 847 requests
stayed in the input queue.)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.polling import until
from tests.support.relay import Relay
from workers.amqp import AmqpSettings, AmqpTransport

pytestmark = pytest.mark.rabbitmq


async def test_the_consumer_comes_back_after_a_requeue_cut_short(rabbitmq_url: str) -> None:
    relay, via_relay = await Relay.before(rabbitmq_url)
    admin = await AmqpTransport.connect(rabbitmq_url)
    transport = await AmqpTransport.connect(
        AmqpSettings.from_url(via_relay, reconnect_interval_s=0.2))
    queue = f"t.requeue-loss.{uuid.uuid4().hex[:8]}"
    deliveries: list[bool] = []  # the redelivered flag of each delivery
    first = asyncio.Event()
    release = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        deliveries.append(delivery.redelivered)
        if len(deliveries) == 1:
            first.set()
            await release.wait()
            with contextlib.suppress(Exception):  # cut short: stale or a transport error
                await delivery.requeue()
            return
        await delivery.ack()

    try:
        # declared by the consuming transport: a classic queue it knows, so a channel limit
        await transport.declare_queue(QueueSpec(queue, auto_delete=False))
        await transport.consume(queue, handler, prefetch=4)
        await admin.publish("", Message(b"m"), queue)
        await asyncio.wait_for(first.wait(), 10)
        relay.hold()  # the basic.cancel of the requeue leaves, and gets no answer
        release.set()
        await until(lambda: relay.held > 0, 10, "the requeue's first frame to leave")
        await relay.drop()  # the connection dies in the middle of the requeue
        await until(lambda: len(deliveries) >= 2, 15,
                    "the message delivered again to the restored consumer")
        assert deliveries[1] is True  # the broker's redelivery, to the same consumer
        assert (await admin.queue_stats(queue)).consumers == 1
    finally:
        with contextlib.suppress(Exception):
            await admin.delete_queue(queue)
        await transport.close()
        await admin.close()
        await relay.cut()
