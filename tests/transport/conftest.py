"""One conformance suite, two brokers: every test here runs on brokerless and RabbitMQ.

A test gets ``broker``: ``await broker.connect()`` opens a new connection (a Transport)
to the same broker, and ``broker.name(suffix)`` makes exchange/queue names unique to the
test so RabbitMQ runs never see each other's leftovers. Everything declared through
``broker.name`` is deleted when the test ends. ``brokerless-eager`` runs the brokerless
suite again with every handler marked eager (``conveyor.eager``): no task until it waits.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from conveyor.eager import mark_eager
from conveyor.transport import Consumer, Delivery, Handler, Transport


class BrokerHandle:
    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"t.{uuid.uuid4().hex[:10]}"
        self._names: list[str] = []
        self._transports: list[Transport] = []
        self._broker: object | None = None

    def name(self, suffix: str) -> str:
        full = f"{self.prefix}.{suffix}"
        self._names.append(full)
        return full

    async def connect(self) -> Transport:
        if self.kind.startswith("brokerless"):
            from brokerless import Broker

            if self._broker is None:
                self._broker = Broker()
            assert isinstance(self._broker, Broker)
            transport: Transport = self._broker.connect()
            if self.kind == "brokerless-eager":
                transport = _eager_handlers(transport)
        else:
            from workers.amqp import AmqpTransport

            assert self.url is not None
            transport = await AmqpTransport.connect(self.url)
        self._transports.append(transport)
        return transport

    async def cleanup(self) -> None:
        if self.kind == "rabbitmq" and self._names:
            admin = await self.connect()
            for n in self._names:
                for delete in (admin.delete_queue, admin.delete_exchange):
                    # best effort: a test may have deleted it already
                    with contextlib.suppress(Exception):
                        await delete(n)
        for t in self._transports:
            with contextlib.suppress(Exception):
                await t.close(grace=0.5)


def _eager_handlers(transport: Transport) -> Transport:
    """``transport`` with every handler given to ``consume`` marked eager."""
    consume = transport.consume

    async def eager_consume(queue: str, handler: Handler, *, prefetch: int) -> Consumer:
        async def eager(delivery: Delivery) -> None:
            await handler(delivery)

        return await consume(queue, mark_eager(eager), prefetch=prefetch)

    transport.consume = eager_consume  # type: ignore[method-assign]
    return transport


@pytest.fixture(
    params=["brokerless", "brokerless-eager", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerHandle]:
    if request.param == "brokerless-eager" and request.node.path.parent.name != "transport":
        pytest.skip("eager handlers are checked by the transport conformance suite")
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else None
    handle = BrokerHandle(request.param, url)
    try:
        yield handle
    finally:
        await handle.cleanup()
