"""The broker fixtures: where RabbitMQ is, and a ``broker`` on brokerless and on RabbitMQ.

Tests marked ``rabbitmq`` run against ``CONVEYOR_AMQP_URL`` (default: the local server).
Outside CI they skip when no server answers, or when it lacks the consistent-hash / random
exchange plugins (the reason names the ``rabbitmq-plugins enable`` command); in CI (``CI``
set) they fail instead, so the RabbitMQ half of the suite can never be skipped silently
there.

A test gets ``broker``: ``await broker.connect()`` opens a new connection (a Transport)
to the same broker, and ``broker.name(suffix)`` makes exchange/queue names unique to the
test so RabbitMQ runs never see each other's leftovers (``unique`` gives a plan name of
the test's own, for the same reason). Everything declared through
``broker.name`` is deleted when the test ends. The conformance suite (tests/transport)
runs every test twice per broker, with plain and with eager handlers (``conveyor.eager``:
on brokerless, no task until it waits; RabbitMQ ignores the mark): its conftest adds the
``handlers`` parameter, which ``broker`` reads. These fixtures reach every test through
``pytest_plugins`` in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from conveyor.eager import mark_eager
from conveyor.transport import Consumer, Delivery, Handler, Transport

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def amqp_url() -> str:
    return os.environ.get("CONVEYOR_AMQP_URL", DEFAULT_AMQP_URL)


def _rabbit_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = amqp_url()
    if not _rabbit_answers(url):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs RabbitMQ at {url}, and nothing answers there")
        pytest.skip(f"no RabbitMQ at {url} (set CONVEYOR_AMQP_URL)")
    # The exchange plugins too, not only the port: a fresh RabbitMQ lacks them.
    from tests.support.rabbit_plugins import fix_command, missing_plugins

    missing = missing_plugins(url)
    if missing:
        reason = f"RabbitMQ at {url} lacks plugins {missing}: run `{fix_command(missing)}`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return url


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


@pytest.fixture
def unique() -> str:
    """A plan name unique to the test, so plan hashes (and RabbitMQ queues) never collide."""
    return f"t{uuid.uuid4().hex[:10]}"
