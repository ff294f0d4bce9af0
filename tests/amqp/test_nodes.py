"""A connection whose node goes away reconnects to the next node of the list.

The "nodes" are two addresses of the same RabbitMQ: a TCP relay of the test's own (node
A, which the test then takes down: listener closed, connections cut) and the broker's own
port (node B). What is checked is the client side: after A is lost the transport comes
back on B by itself and works (declare, publish, consume), without a new connect.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest

from conveyor.app.transports import BrokerTarget
from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.polling import until
from tests.support.relay import Relay
from workers.amqp import AmqpSettings, AmqpTransport

pytestmark = pytest.mark.rabbitmq


async def test_a_lost_node_reconnects_to_the_next_one(rabbitmq_url: str) -> None:
    relay, node_a = await Relay.before(rabbitmq_url)
    settings = AmqpSettings.from_url(node_a, reconnect_interval_s=0.2).with_other_nodes(
        [rabbitmq_url]
    )
    transport = await AmqpTransport.connect(settings)
    queue = f"t.nodes.{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        got.append(bytes(delivery.message.body))
        await delivery.ack()

    try:
        await transport.declare_queue(QueueSpec(queue, auto_delete=False))
        await transport.consume(queue, handler, prefetch=4)
        await transport.publish("", Message(b"before"), queue)
        await until(lambda: got == [b"before"], 10, "the first message")
        await relay.cut()  # node A is gone: only node B answers now

        async def works() -> bool:
            try:
                await transport.publish("", Message(b"after"), queue)
            except Exception:  # reconnecting: ChannelBroken / TransportError until it is back
                return False
            return True

        # Back within the 10 s (a few reconnect intervals here).
        await until(works, 10, "a publish through the next node")
        await until(lambda: b"after" in got, 10, "the consumer back on the next node")
    finally:
        with contextlib.suppress(Exception):
            await transport.delete_queue(queue)
        await transport.close()


def test_the_target_hands_every_other_node_to_the_transport() -> None:
    target = BrokerTarget("amqp://u:p@n1:5672/, amqp://u:p@n2:5672/,amqp://u:p@n3:5672/")
    assert target.urls == ["amqp://u:p@n1:5672/", "amqp://u:p@n2:5672/", "amqp://u:p@n3:5672/"]
    settings = AmqpSettings.from_url(target.urls[1]).with_other_nodes(
        target.urls[2:] + target.urls[:1]
    )
    assert settings.other_nodes == ("amqp://u:p@n3:5672/", "amqp://u:p@n1:5672/")
    assert "p@" not in repr(settings) and "other_nodes=2" in repr(settings)
