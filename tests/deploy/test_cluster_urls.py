"""A RabbitMQ cluster as a list of node URLs: tried in order on connect."""

from __future__ import annotations

import pytest

from conveyor.app.transports import BrokerTarget
from conveyor.errors import BrokerUnreachable

DEAD = "amqp://guest:secret-pw@127.0.0.1:1/"


def test_describe_lists_every_node_without_credentials() -> None:
    target = BrokerTarget.resolve(f"{DEAD}, amqp://u:secret-pw@node2:5673/v")
    assert target.urls == [DEAD, "amqp://u:secret-pw@node2:5673/v"]
    text = target.describe()
    assert "127.0.0.1:1" in text and "node2:5673" in text
    assert "secret-pw" not in text


@pytest.mark.rabbitmq
async def test_connect_skips_a_dead_node(rabbitmq_url: str) -> None:
    transport = await BrokerTarget.resolve(f"{DEAD},{rabbitmq_url}").connect()
    try:
        from conveyor.transport import QueueSpec

        name = f"conveyor.test.nodes.{id(transport)}"
        await transport.declare_queue(QueueSpec(name, auto_delete=True))
        assert (await transport.queue_stats(name)).depth == 0
        await transport.delete_queue(name)
    finally:
        await transport.close(grace=0.5)


async def test_every_node_dead_is_broker_unreachable() -> None:
    with pytest.raises(BrokerUnreachable):
        await BrokerTarget.resolve(f"{DEAD},amqp://guest:guest@127.0.0.1:2/").connect()
