"""``workers.amqp.frames``: aiormq's body framing with fewer copies, same bytes.

The unit tests compare the replacements with aiormq's own code on the same frames and
feed hand-made frame streams to the receiver; the RabbitMQ tests send bodies around the
frame size and several MB long, interleaved with small messages, and compare them byte
for byte on arrival.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any

import aiormq.connection
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.amqp import Rabbit
from workers.amqp import frames as amqp_frames
from workers.amqp import speedups

FRAME_MAX = 131_072
CONTENT = FRAME_MAX - 8  # body bytes per frame


class _Channel:
    """What ``split_body`` reads of a channel."""

    max_content_size = CONTENT


def _marshal(frames: Iterable[Any], channel: int, marshall: Any) -> bytes:
    return bytes(marshall(ChannelFrame, channel, list(frames)).payload)


def _publish_frames(body: bytes, split: Any) -> list[Any]:
    return [
        spec.Basic.Publish(exchange="x", routing_key="k"),
        ContentHeader(body_size=len(body), properties=spec.Basic.Properties(message_id="m")),
        *split(_Channel(), body),
    ]


@pytest.mark.parametrize("size", [0, 1, CONTENT - 1, CONTENT, CONTENT + 1, 3 * CONTENT + 17])
def test_publish_bytes_equal_aiormqs(size: int) -> None:
    body = os.urandom(size)
    ours = _marshal(_publish_frames(body, amqp_frames.split_body), 3, amqp_frames.marshall)
    assert isinstance(amqp_frames.ORIGINAL_MARSHALL, classmethod)
    theirs = _marshal(
        _publish_frames(body, amqp_frames.ORIGINAL_SPLIT_BODY), 3,
        amqp_frames.ORIGINAL_MARSHALL.__func__,
    )
    assert ours == theirs
    expected_frames = -(-size // CONTENT)
    assert len(amqp_frames.split_body(_Channel(), body)) == expected_frames  # type: ignore[arg-type]


def test_marshall_drops_frames_after_close_ok_like_aiormq() -> None:
    frames = [spec.Connection.CloseOk(), Heartbeat()]
    frame = amqp_frames.marshall(ChannelFrame, 0, frames)
    assert frame.should_close
    assert bytes(frame.payload) == pamqp.frame.marshal(spec.Connection.CloseOk(), 0)


def _stream(*frames: tuple[int, Any]) -> bytes:
    return b"".join(pamqp.frame.marshal(f, ch) for ch, f in frames)


def _delivery(channel: int, body: bytes, tag: int) -> list[tuple[int, Any]]:
    frames: list[tuple[int, Any]] = [
        (channel, spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, exchange="",
                                     routing_key="q")),
        (channel, ContentHeader(body_size=len(body))),
    ]
    frames += [(channel, ContentBody(body[i : i + CONTENT])) for i in range(0, len(body), CONTENT)]
    return frames


async def _receive(data: bytes) -> list[tuple[int, Any]]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return [(ch, frame) async for _, ch, frame in amqp_frames.BodyJoiningReceiver(reader)]


async def test_receiver_joins_a_large_body_and_passes_other_channels_through() -> None:
    big = os.urandom(3 * CONTENT + 5)
    small = b"tiny body"
    first, second = _delivery(1, big, 1), _delivery(2, small, 7)
    # Channel 2's whole message arrives between channel 1's body frames.
    data = _stream(*first[:3], (0, Heartbeat()), *second, *first[3:])
    got = await _receive(data)
    ch1 = [f for ch, f in got if ch == 1]
    ch2 = [f for ch, f in got if ch == 2]
    assert [type(f).__name__ for f in ch1] == ["Deliver", "ContentHeader", "ContentBody"]
    assert bytes(ch1[2].value) == big
    assert [type(f).__name__ for f in ch2] == ["Deliver", "ContentHeader", "ContentBody"]
    assert bytes(ch2[2].value) == small
    # The heartbeat and channel 2's message pass while channel 1's body is gathered; the
    # body is handed over when its last frame arrives.
    assert [(ch, type(f).__name__) for ch, f in got][2:] == [
        (0, "Heartbeat"), (2, "Deliver"), (2, "ContentHeader"), (2, "ContentBody"),
        (1, "ContentBody"),
    ]


async def test_receiver_yields_small_bodies_frame_by_frame_like_aiormq() -> None:
    body = os.urandom(1000)
    got = await _receive(_stream(*_delivery(1, body, 1)))
    assert [type(f).__name__ for _, f in got] == ["Deliver", "ContentHeader", "ContentBody"]
    assert bytes(got[2][1].value) == body


async def test_receiver_rejects_a_body_longer_than_its_header() -> None:
    body = os.urandom(2 * CONTENT)
    frames = _delivery(1, body, 1)
    frames[1] = (1, ContentHeader(body_size=CONTENT + 10))
    with pytest.raises(InvalidFrameError, match="more than the 131074 bytes"):
        await _receive(_stream(*frames))


async def test_receiver_rejects_a_body_frame_without_its_end_byte() -> None:
    data = bytearray(_stream(*_delivery(1, os.urandom(2 * CONTENT), 1)))
    data[-1] = 0
    with pytest.raises(InvalidFrameError, match="Last byte"):
        await _receive(bytes(data))


async def test_receiver_reports_a_connection_closed_mid_body() -> None:
    data = _stream(*_delivery(1, os.urandom(2 * CONTENT), 1))
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await _receive(data[: len(data) - 1000])


async def test_receiver_refuses_a_protocol_header_as_first_frame() -> None:
    with pytest.raises(ProtocolSyntaxError):
        await _receive(b"AMQP\x00\x00\x09\x01")


# -- on RabbitMQ -------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_bodies_of_every_size_arrive_intact_through_rabbitmq(rabbit: Rabbit) -> None:
    sizes = [0, 1, CONTENT - 1, CONTENT, CONTENT + 1, 2 * CONTENT, 3_300_000, 17, 900_000]
    bodies = [os.urandom(n) for n in sizes]
    queue = rabbit.name("frames")
    publisher, consumer = await rabbit.connect(), await rabbit.connect()
    # Opening a transport installs the replacements when the gate says on (these
    # connections use them); with CONVEYOR_AMQP_SPEEDUPS=0 this runs the plain path.
    if speedups.decide(True).on:
        assert aiormq.connection.FrameReceiver is amqp_frames.BodyJoiningReceiver
        assert ChannelFrame.marshall.__func__ is amqp_frames.marshall  # type: ignore[attr-defined]
    else:
        assert speedups.untouched()
    await publisher.declare_queue(QueueSpec(name=queue))
    received: dict[str, bytes] = {}
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received[str(delivery.message.message_id)] = delivery.message.body
        await delivery.ack()
        if len(received) == len(bodies):
            done.set()

    await consumer.consume(queue, handler, prefetch=3)
    await asyncio.gather(*(
        publisher.publish("", Message(body=b, message_id=str(i)), routing_key=queue)
        for i, b in enumerate(bodies)
    ))
    async with asyncio.timeout(30):
        await done.wait()
    assert {k: len(v) for k, v in received.items()} == {str(i): n for i, n in enumerate(sizes)}
    assert all(received[str(i)] == b for i, b in enumerate(bodies))
