"""Large message bodies through aiormq with a few copies instead of dozens.

aiormq moves a message body through ``io.BytesIO`` objects frame by frame: publishing,
``Channel._split_body`` copies the body into frame-sized pieces and
``ChannelFrame.marshall`` appends each framed piece to a ``BytesIO`` that grows by an
eighth at a time (reallocating, and so copying, everything written so far about twenty
times for a 3 MB body); consuming, ``FrameReceiver`` reads each frame through a
``BytesIO`` and ``Channel._read_content`` appends every body frame to another growing one.
A W2 (MobileNetV2) pack is 3.3 MB in 25 frames of RabbitMQ's 128 KiB ``frame_max``: those
copies and the per-frame Python around them took more CPU than sending the bytes.

Three replacements produce and accept the same bytes (``workers.amqp.speedups`` decides
whether they are put in place, and does it):

* ``Channel._split_body`` slices the body with ``memoryview`` (no copy);
* ``ChannelFrame.marshall`` frames everything with one ``b"".join`` (one copy);
* ``BodyJoiningReceiver`` (aiormq's ``FrameReceiver``) reads each body frame straight into
  one buffer per channel and hands the channel the whole body as a single ``ContentBody``
  after the content header, so the channel's ``BytesIO`` sees one write. Frames of other
  channels that arrive between the parts of a body pass through unchanged.

The wire bytes are unchanged (tests compare them with aiormq's own marshalling). aiormq
has no extension point for these, so they are patched on its classes, for the whole
process. This module imports on any aiormq; ``ORIGINAL_*`` are None where a piece is
missing (the gate then installs nothing).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiormq.abc
import aiormq.channel
import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.constants import FRAME_BODY, FRAME_END, FRAME_END_CHAR, FRAME_HEADER_SIZE
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

log = logging.getLogger(__name__)
T = TypeVar("T")

_FRAME_HEAD = struct.Struct(">BHI")
#: Bodies larger than this are gathered into one buffer. Smaller ones usually travel in
#: one frame and go through aiormq's own path; either way is correct for any frame_max.
JOIN_ABOVE = 64 * 1024

#: aiormq's own pieces as imported (the gate restores and compares with them; tests compare
#: bytes with them); None where this aiormq lacks one.
ORIGINAL_SPLIT_BODY = aiormq.channel.Channel.__dict__.get("_split_body")
ORIGINAL_MARSHALL = aiormq.abc.ChannelFrame.__dict__.get("marshall")
ORIGINAL_RECEIVER = getattr(aiormq.connection, "FrameReceiver", None)
#: What BodyJoiningReceiver extends: aiormq's receiver, or a stand-in where there is none
#: (the class is then never installed, but the module still imports).
_RECEIVER_BASE: type[Any] = ORIGINAL_RECEIVER if isinstance(ORIGINAL_RECEIVER, type) else object


# -- publishing ------------------------------------------------------------------------


def split_body(self: aiormq.channel.Channel, body: bytes) -> list[ContentBody]:
    """``Channel._split_body`` without copying: frame-sized ``memoryview`` slices."""
    if not body:
        return []
    size = self.max_content_size
    if len(body) < size:
        return [ContentBody(body)]
    view = memoryview(body)
    return [ContentBody(view[i : i + size]) for i in range(0, len(body), size)]  # type: ignore[arg-type]


def marshall(
    cls: type[aiormq.abc.ChannelFrame],
    channel_number: int,
    frames: Any,
    drain_future: asyncio.Future[Any] | None = None,
) -> aiormq.abc.ChannelFrame:
    """``ChannelFrame.marshall`` with body frames framed in place and one final join."""
    parts: list[Any] = []
    should_close = False
    for frame in frames:
        if should_close:
            log.warning(
                "It looks like you are going to send a frame %r after the connection is "
                "closed, it's pointless, the frame is dropped.", frame,
            )
            continue
        if isinstance(frame, spec.Connection.CloseOk):
            should_close = True
        if isinstance(frame, ContentBody):
            value = frame.value
            parts.append(_FRAME_HEAD.pack(FRAME_BODY, channel_number, len(value)))
            parts.append(value)
            parts.append(FRAME_END_CHAR)
        else:
            parts.append(pamqp.frame.marshal(frame, channel_number))
    return cls(payload=b"".join(parts), drain_future=drain_future, should_close=should_close)


# -- consuming -------------------------------------------------------------------------


class _Body:
    """A body being gathered for one channel."""

    __slots__ = ("buffer", "filled")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.filled = 0


class BodyJoiningReceiver(_RECEIVER_BASE):  # type: ignore[misc]
    """aiormq's ``FrameReceiver`` that yields a message body as one ``ContentBody``.

    After a content header announcing a body longer than one frame, the body frames of
    that channel are read into one ``bytearray`` and yielded together when the last one
    arrives (the frames a channel receives stay in the AMQP order: method, header, body).
    """

    # set by aiormq's FrameReceiver.__init__
    reader: asyncio.StreamReader
    lock: asyncio.Lock
    started: bool

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._bodies: dict[int, _Body] = {}

    async def get_frame(self) -> Any:
        async with self.lock:
            while True:
                received = await self._next()
                if received is not None:
                    return received

    async def _read(self, count: int) -> bytes:
        return await self._io(self.reader.readexactly(count))

    @staticmethod
    async def _io(read: Awaitable[T]) -> T:
        try:
            return await read
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected",
            ) from e
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e

    async def _next(self) -> Any:
        """One frame for aiormq, or None when a body frame was only stored."""
        if self.reader.at_eof():
            raise StopAsyncIteration
        head = await self._read(FRAME_HEADER_SIZE)
        if not self.started:
            if head.startswith(b"AMQP"):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        frame_type, channel, size = _FRAME_HEAD.unpack(head)
        body = self._bodies.get(channel) if frame_type == FRAME_BODY else None
        if body is not None:
            return await self._gather(channel, body, size)
        data = head + await self._read(size + 1)
        try:
            weight, channel, frame = pamqp.frame.unmarshal(data)
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e
        if isinstance(frame, ContentHeader) and frame.body_size > JOIN_ABOVE:
            self._bodies[channel] = _Body(frame.body_size)
        return weight, channel, frame

    async def _gather(self, channel: int, body: _Body, size: int) -> Any:
        """Put one body frame's payload in place; the whole body once it is complete."""
        end = body.filled + size
        if end > len(body.buffer):
            raise InvalidFrameError(
                f"channel {channel}: body frames carry more than the {len(body.buffer)} "
                "bytes its content header announced"
            )
        slot = memoryview(body.buffer)[body.filled : end]
        readinto = getattr(self.reader, "readinto", None)
        if readinto is not None:  # workers.amqp.reader.FrameStream: no copy of ours
            await self._io(readinto(slot))
            frame_end = await self._read(1)
        else:
            data = await self._read(size + 1)
            slot[:] = memoryview(data)[:size]
            frame_end = data[size:]
        if frame_end[0] != FRAME_END:
            raise InvalidFrameError("Last byte error")
        body.filled = end
        if end < len(body.buffer):
            return None
        del self._bodies[channel]
        return FRAME_HEADER_SIZE + end + 1, channel, ContentBody(body.buffer)  # type: ignore[arg-type]
