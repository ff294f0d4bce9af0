"""A connection whose node goes away reconnects to the next node of the list.

The "nodes" are two addresses of the same RabbitMQ: a TCP relay of the test's own (node
A, which the test then takes down: listener closed, connections cut) and the broker's own
port (node B). What is checked is the client side: after A is lost the transport comes
back on B by itself and works (declare, publish, consume), without a new connect.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import pytest

from conveyor.app.transports import BrokerTarget
from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.polling import until
from workers.amqp import AmqpSettings, AmqpTransport

pytestmark = pytest.mark.rabbitmq


class Relay:
    """127.0.0.1:<port> -> the broker; ``cut()`` closes the listener and every connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        for a, b in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(a, b))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_lost_node_reconnects_to_the_next_one(rabbitmq_url: str) -> None:
    parts = urlsplit(rabbitmq_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5672))
    port = await relay.start()
    credentials = parts.netloc.rsplit("@", 1)[0]
    node_a = urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))
    settings = AmqpSettings.from_url(node_a, reconnect_interval_s=0.2).with_other_nodes(
        [rabbitmq_url]
    )
    transport = await AmqpTransport.connect(settings)
    queue = f"t.nodes.{port}"
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
