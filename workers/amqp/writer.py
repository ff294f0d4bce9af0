"""One socket write per event-loop turn for an AMQP connection.

aiormq writes every frame it sends (a publish, an ack) with its own ``transport.write``;
on an idle socket each of those is a ``send`` system call at once. Measured on W1 over
RabbitMQ those writes took 15-25% of each process's CPU. ``CoalescingConnection``
plugs ``CoalescingTCPFactory`` into aiormq (its ``transport_factory`` extension point,
through aio-pika's ``connection_class``): frames written during one turn of the event
loop leave in one ``send`` at the start of the next turn. ``drain``, ``write_eof`` and
``close`` flush first, so aiormq's ordering and flow-control waits are unchanged. The
same factory reads through ``workers.amqp.reader.FrameStream`` (message bodies land in
their final buffer without passing through a ``StreamReader``). ``workers.amqp.speedups``
decides whether a transport uses this connection class.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq.exceptions as amqp_exc
from aio_pika import RobustConnection
from aiormq.connection import TCPTransportFactory
from yarl import URL

from workers.amqp.reader import FrameStream

#: Writes at least this large go out at once (after what is pending), without a copy.
DIRECT_WRITE_BYTES = 16 * 1024


class CoalescingWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` that joins the writes of one loop turn into one."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._pending: list[bytes] = []
        self._loop_ref = loop

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= DIRECT_WRITE_BYTES:
            # Large frames (tensors) gain nothing from joining and would cost a copy; as a
            # view, what the socket does not take at once is copied once, not twice.
            self.flush()
            super().write(memoryview(data))
            return
        if not self._pending:
            self._loop_ref.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self.transport.is_closing():
                super().write(data)

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTCPFactory(TCPTransportFactory):
    """aiormq's plain TCP transport with a ``CoalescingWriter``."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)
        loop = asyncio.get_running_loop()
        stream = FrameStream(loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: stream, host=url.host or "localhost", port=url.port or 5672, **kwargs
            )
        except OSError as exc:
            raise amqp_exc.AMQPConnectionError(*exc.args) from exc
        # FrameStream reads like the StreamReader aiormq expects; the writer needs no reader
        # (a lost connection reaches drain() through the protocol).
        return stream, CoalescingWriter(transport, stream, None, loop)  # type: ignore[return-value]


class CoalescingConnection(RobustConnection):
    """``aio_pika.RobustConnection`` whose plain-TCP sockets use ``CoalescingTCPFactory``
    (TLS connections keep aiormq's own transport)."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop, **kwargs)
        if self.url.scheme == "amqp":
            self.kwargs["transport_factory"] = CoalescingTCPFactory()
