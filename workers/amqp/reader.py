"""The reading end of an AMQP socket: bytes land where they are going.

``asyncio.StreamReader`` receives into a fresh ``bytes``, appends it to its buffer and
copies it out again on ``readexactly``: three copies of every byte before aiormq sees
it. ``FrameStream`` is the connection's protocol (a ``BufferedProtocol``) and its reader
at once: small reads (frame headers, methods) come out of a staging buffer, and
``readinto`` lets the socket write a message body straight into the caller's buffer
(``workers.amqp.frames.BodyJoiningReceiver`` gathers bodies that way). It offers the
part of the ``StreamReader`` interface that aiormq and ``asyncio.StreamWriter`` use.
"""

from __future__ import annotations

import asyncio
from asyncio.streams import FlowControlMixin

#: Initial staging buffer; it grows to hold the largest single read asked for.
STAGING_BYTES = 256 * 1024
#: Reading pauses while this much has arrived and not been read.
PAUSE_ABOVE = 4 * 1024 * 1024


class FrameStream(FlowControlMixin, asyncio.BufferedProtocol):
    """Protocol and reader of one socket (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop = loop
        self._staging = bytearray(STAGING_BYTES)
        self._start = 0  # unread bytes are self._staging[_start:_end]
        self._end = 0
        #: The rest of a ``readinto`` destination while the socket fills it directly.
        self._target: memoryview | None = None
        self._into_target = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exception: BaseException | None = None
        self._transport: asyncio.ReadTransport | None = None
        self._reading_paused = False
        self._closed: asyncio.Future[None] = loop.create_future()

    # -- protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.ReadTransport):
            self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None and self._start == self._end:
            self._into_target = True
            return self._target
        self._into_target = False
        if self._end == len(self._staging):
            self._make_room(self._end - self._start + 1)
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_target:
            assert self._target is not None
            self._target = self._target[nbytes:] if nbytes < len(self._target) else None
            if self._target is None:
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start > PAUSE_ABOVE and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if exc is not None:
            self._exception = exc
        self._eof = True
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed

    # -- reader --------------------------------------------------------------------------

    def exception(self) -> BaseException | None:
        return self._exception

    def at_eof(self) -> bool:
        return self._eof and self._start == self._end

    async def readexactly(self, n: int) -> bytes:
        while self._end - self._start < n:
            if self._eof:
                partial = bytes(self._staging[self._start : self._end])
                self._start = self._end
                raise asyncio.IncompleteReadError(partial, n)
            if self._start + n > len(self._staging):
                self._make_room(n)
            await self._wait()
        data = bytes(self._staging[self._start : self._start + n])
        self._consumed(n)
        return data

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view`` exactly: from what has arrived, then straight from the socket."""
        have = min(self._end - self._start, len(view))
        view[:have] = self._staging[self._start : self._start + have]
        self._consumed(have)
        if have == len(view):
            return
        self._target = view[have:]
        try:
            while self._target is not None:
                if self._eof:
                    got = len(view) - len(self._target)
                    raise asyncio.IncompleteReadError(bytes(view[:got]), len(view))
                await self._wait()
        finally:
            self._target = None
            self._into_target = False

    async def read(self, n: int = -1) -> bytes:
        """What has arrived (aiormq reads the rest of a bad first frame with it)."""
        if self._start == self._end and not self._eof:
            await self._wait()
        data = bytes(self._staging[self._start : self._end])
        self._consumed(len(data))
        return data

    # -- internals -----------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Move the unread bytes to the front; grow the buffer until ``need`` bytes fit."""
        unread = self._end - self._start
        size = len(self._staging)
        while size < max(need, unread + 1):
            size *= 2
        if size != len(self._staging):
            fresh = bytearray(size)
            fresh[:unread] = self._staging[self._start : self._end]
            self._staging = fresh
        else:
            self._staging[:unread] = self._staging[self._start : self._end]
        self._start, self._end = 0, unread

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        if self._reading_paused and self._end - self._start <= PAUSE_ABOVE // 2:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    async def _wait(self) -> None:
        if self._exception is not None:
            raise self._exception
        if self._waiter is not None:
            raise RuntimeError("a read was asked while another one is already waiting")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._exception is not None:
            raise self._exception

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
