"""``workers.amqp.reader.FrameStream``: the socket's bytes, in order, read exactly.

Driven the way the event loop drives a ``BufferedProtocol`` (``get_buffer`` then
``buffer_updated``) for the edge cases, and over a real socket for the whole path.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from workers.amqp import reader as amqp_reader
from workers.amqp.reader import FrameStream


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def arrive(stream: FrameStream, data: bytes) -> None:
    """What the transport does when ``data`` comes off the socket (in as many reads)."""
    while data:
        buf = stream.get_buffer(-1)
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        stream.buffer_updated(n)
        data = data[n:]


def new_stream() -> tuple[FrameStream, FakeTransport]:
    stream = FrameStream(asyncio.get_running_loop())
    transport = FakeTransport()
    stream.connection_made(transport)
    return stream, transport


async def test_reads_come_out_in_order_across_arrivals() -> None:
    stream, _ = new_stream()
    data = os.urandom(100_000)
    arrive(stream, data[:10])

    async def read_three() -> bytes:
        return b"".join([await stream.readexactly(n) for n in (7, 60_000, 39_993)])

    reads = asyncio.ensure_future(read_three())
    await asyncio.sleep(0)
    arrive(stream, data[10:70_000])
    await asyncio.sleep(0)
    arrive(stream, data[70_000:])
    assert await asyncio.wait_for(reads, 5) == data


async def test_one_reader_at_a_time() -> None:
    stream, _ = new_stream()
    first = asyncio.ensure_future(stream.readexactly(1))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already waiting"):
        await stream.readexactly(1)
    arrive(stream, b"x")
    assert await first == b"x"


async def test_a_read_larger_than_the_staging_buffer_grows_it() -> None:
    stream, _ = new_stream()
    data = os.urandom(3 * amqp_reader.STAGING_BYTES + 5)
    read = asyncio.ensure_future(stream.readexactly(len(data)))
    await asyncio.sleep(0)
    arrive(stream, data)
    assert await asyncio.wait_for(read, 5) == data


async def test_readinto_takes_what_arrived_then_lets_the_socket_fill_the_rest() -> None:
    stream, _ = new_stream()
    data = os.urandom(500_000)
    arrive(stream, data[:1000])
    target = bytearray(400_000)
    read = asyncio.ensure_future(stream.readinto(memoryview(target)))
    await asyncio.sleep(0)
    # With the staged bytes used up, the socket's next reads go straight into target.
    buf = stream.get_buffer(-1)
    assert len(buf) == len(target) - 1000
    buf[:5000] = data[1000:6000]
    stream.buffer_updated(5000)
    arrive(stream, data[6000:])
    await asyncio.wait_for(read, 5)
    assert bytes(target) == data[:400_000]
    assert await stream.readexactly(100_000) == data[400_000:]


async def test_eof_in_the_middle_of_a_read_is_an_incomplete_read() -> None:
    stream, _ = new_stream()
    arrive(stream, b"abc")
    stream.eof_received()
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await stream.readexactly(10)
    assert info.value.partial == b"abc"
    assert stream.at_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await stream.readinto(memoryview(bytearray(4)))


async def test_a_lost_connection_raises_its_error_to_the_reader() -> None:
    stream, _ = new_stream()
    read = asyncio.ensure_future(stream.readexactly(10))
    await asyncio.sleep(0)
    stream.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectionResetError, match="reset by peer"):
        await asyncio.wait_for(read, 5)
    assert isinstance(stream.exception(), ConnectionResetError)


async def test_reading_pauses_while_too_much_is_unread_and_resumes_when_read() -> None:
    stream, transport = new_stream()
    arrive(stream, bytes(amqp_reader.PAUSE_ABOVE + 1))
    assert transport.paused
    await stream.readexactly(amqp_reader.PAUSE_ABOVE // 2 + 2)
    assert not transport.paused


async def test_bytes_cross_a_real_socket_intact() -> None:
    data = os.urandom(5_000_000)

    async def send(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(data), 77_777):
            writer.write(data[i : i + 77_777])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(send, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stream = FrameStream(loop)
    transport, _ = await loop.create_connection(lambda: stream, "127.0.0.1", port)
    try:
        head = await asyncio.wait_for(stream.readexactly(8), 10)
        body = bytearray(3_000_000)
        await asyncio.wait_for(stream.readinto(memoryview(body)), 10)
        tail = await asyncio.wait_for(stream.readexactly(len(data) - 3_000_008), 10)
        assert head + bytes(body) + tail == data
        assert await asyncio.wait_for(stream.read(), 10) == b""
        assert stream.at_eof()
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
