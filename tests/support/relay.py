"""A TCP relay between a test's client and the broker, to make network faults on cue.

    relay = Relay(("127.0.0.1", 5672)); port = await relay.start()
    relay.hold()        # bytes from clients are kept, not forwarded (a stalled network)
    await relay.drop()  # every connection aborted; new ones are accepted and forwarded
    await relay.cut()   # the listener closed too: the "node" is gone
    relay.refuse()      # new connections are closed at once (the network is down) ...
    relay.accept()      # ... until this

``held`` counts the bytes kept while holding: a test waits on it to know a frame left.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class Relay:
    """127.0.0.1:<port> -> ``upstream``, with faults the test triggers."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.held = 0
        self.refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    @classmethod
    async def before(cls, url: str) -> tuple[Relay, str]:
        """A started relay to the broker of AMQP ``url``, and ``url`` through it."""
        parts = urlsplit(url)
        relay = cls((parts.hostname or "127.0.0.1", parts.port or 5672))
        port = await relay.start()
        credentials = parts.netloc.rsplit("@", 1)[0]
        return relay, urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))

    def hold(self) -> None:
        """Stop forwarding what clients send (answers from the broker still pass)."""
        self.held = 0
        self._flowing.clear()

    def refuse(self) -> None:
        """Close each new connection at once, until ``accept``."""
        self.refusing = True

    def accept(self) -> None:
        self.refusing = False

    async def drop(self) -> None:
        """Abort every relayed connection; later connections flow normally."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._flowing.set()

    async def cut(self) -> None:
        """Close the listener and abort every connection."""
        assert self.server is not None
        self.server.close()
        await self.drop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        for task in (asyncio.create_task(self._pipe(reader, up_writer, upward=True)),
                     asyncio.create_task(self._pipe(up_reader, writer, upward=False))):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    upward: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(1 << 16):
                if upward and not self._flowing.is_set():
                    self.held += len(data)
                    await self._flowing.wait()  # dropped while held: cancelled here
                writer.write(data)
                await writer.drain()
        writer.close()
