"""One conformance suite, two brokers: every test here runs on brokerless and RabbitMQ.

A test gets ``broker``: ``await broker.connect()`` opens a new connection (a Transport)
to the same broker, and ``broker.name(suffix)`` makes exchange/queue names unique to the
test so RabbitMQ runs never see each other's leftovers. Everything declared through
``broker.name`` is deleted when the test ends. The suite here runs twice per broker:
with plain handlers and with every handler marked eager (``conveyor.eager``: on
brokerless, no task until it waits; RabbitMQ ignores the mark).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from conveyor.eager import mark_eager
from conveyor.transport import Consumer, Delivery, Handler, Transport


class BrokerHandle:
    def __init__(self, kind: str, url: str | None, *, eager: bool = False) -> None:
        self.kind = kind
        self.eager = eager
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
        if self.kind == "brokerless":
            from brokerless import Broker

            if self._broker is None:
                self._broker = Broker()
            assert isinstance(self._broker, Broker)
            transport: Transport = self._broker.connect()
        else:
            from workers.amqp import AmqpTransport

            assert self.url is not None
            transport = await AmqpTransport.connect(self.url)
        if self.eager:
            transport = _eager_handlers(transport)
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The conformance suite (this directory only) runs with plain and with eager handlers;
    suites elsewhere that import ``broker`` keep plain ones."""
    if "broker" in metafunc.fixturenames:
        metafunc.fixturenames.append("handlers")
        metafunc.parametrize("handlers", ["plain", "eager"], indirect=True)


@pytest.fixture
def handlers(request: pytest.FixtureRequest) -> str:
    """How handlers given to ``consume`` run here: "plain" or "eager"."""
    return str(request.param)


@pytest.fixture(params=["brokerless", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerHandle]:
    callspec = getattr(request.node, "callspec", None)
    eager = callspec is not None and callspec.params.get("handlers") == "eager"
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else None
    handle = BrokerHandle(request.param, url, eager=eager)
    try:
        yield handle
    finally:
        await handle.cleanup()
