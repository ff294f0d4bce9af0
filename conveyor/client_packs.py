"""The client's request packs: the requests made in one event-loop turn leave together.

``PackSender`` collects the requests ``Client.infer`` makes in one loop turn, per routing
key, and publishes them when the turn ends: one message per routing key (a request pack,
``conveyor.packs``) up to the pack limits, a lone request as it is. A publish that the
loss of the connection cuts short is tried again once it is back (``publish_through_loss``);
another failure lands on each request's future; a request abandoned before its turn ends is
not sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from conveyor.envelope import RequestMeta
from conveyor.errors import ChannelBroken, TransportClosed
from conveyor.packs import pack_requests
from conveyor.wire import encode

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.transport import Message, Transport

#: A request pack holds at most this many requests and (past its first) this many bytes
#: of tensors. Large requests gain from packs too (W2, 602 KB images: RabbitMQ's CPU per
#: request 1.8 -> 1.1 ms); the byte cap bounds how long a pack holds up a queue.
PACK_MAX_REQUESTS = 64
PACK_MAX_BYTES = 4 << 20
#: Pauses between tries of a publish cut short by a lost connection: doubling to the cap.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


@dataclass
class Outgoing:
    """A request waiting for this loop turn's flush."""

    meta: RequestMeta
    arrays: dict[str, np.ndarray]
    future: asyncio.Future[dict[str, np.ndarray]]
    nbytes: int
    routing_key: str = ""
    #: The broker confirmed a publish of it (re-sent after a reconnect, it may be again).
    confirmed: bool = False


class PackSender:
    """Publishes the requests of each loop turn to ``exchange`` on ``transport``."""

    def __init__(
        self, plan_hash: str, exchange: str, *, max_requests: int = PACK_MAX_REQUESTS
    ) -> None:
        self.plan_hash = plan_hash
        self.exchange = exchange
        #: Requests per pack (the plan's ``limits.pack_requests`` caps it).
        self.max_requests = min(max_requests, PACK_MAX_REQUESTS)
        #: Where requests go; None once the client closes (queued requests then fail).
        self.transport: Transport | None = None
        #: Requests and messages published so far.
        self.sent = 0
        self.messages = 0
        self._outgoing: dict[str, list[Outgoing]] = {}
        self._flush_scheduled = False
        self._publishing: set[asyncio.Task[None]] = set()

    def enqueue(self, routing_key: str, item: Outgoing) -> None:
        self._outgoing.setdefault(routing_key, []).append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        """Abandon what is queued and cancel the publishes under way."""
        self.transport = None
        for item in (i for items in self._outgoing.values() for i in items):
            if not item.future.done():
                item.future.cancel()
        self._outgoing.clear()
        if self._publishing:
            for task in self._publishing:
                task.cancel()
            await asyncio.gather(*self._publishing, return_exceptions=True)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, {}
        transport = self.transport
        for routing_key, items in outgoing.items():
            # Abandoned (cancelled or timed out) before it went out: not sent at all.
            live = [item for item in items if not item.future.done()]
            if transport is None:
                fail_all(live, TransportClosed("client closed before the request was sent"))
                continue
            for chunk in chunks(live, self.max_requests):
                # A task of its own: this runs in a loop callback, and AMQP publishes need
                # a task (asyncio.timeout) to wait for their confirm.
                task = asyncio.create_task(self._send(transport, routing_key, chunk))
                self._publishing.add(task)
                task.add_done_callback(self._publishing.discard)

    async def _send(self, transport: Transport, routing_key: str, items: list[Outgoing]) -> None:
        try:
            if len(items) == 1:
                item = items[0]
                message = item.meta.to_message(encode(item.arrays))
            else:
                message = pack_requests(self.plan_hash, [(i.meta, i.arrays) for i in items])
            # Bounded by the last deadline of its requests, also when the broker blocks
            # publishers and no confirm comes (their futures expire on their own then).
            async with asyncio.timeout(_seconds_left(items)):
                sent = await publish_through_loss(
                    transport, self.exchange, message, routing_key,
                    awaited=lambda: any(not i.future.done() for i in items),
                )
        except TimeoutError:
            return
        except Exception as exc:  # each caller gets it from its future (typed if ours)
            fail_all(items, exc)
            return
        if not sent:  # every caller gave up (its deadline) while the broker was away
            return
        for item in items:
            item.confirmed = True
        self.sent += len(items)
        self.messages += 1


def _seconds_left(items: list[Outgoing]) -> float | None:
    """Until the last of the requests' deadlines (None when one has none)."""
    deadlines = [i.meta.deadline for i in items]
    if any(d is None for d in deadlines):
        return None
    return max(d for d in deadlines if d is not None) - time.time()


def packable(arrays: Mapping[str, np.ndarray]) -> int:
    """The bytes a request adds to a pack; -1 when it must go alone (its tensors do not
    agree on a batch size, so stacking would mix requests' rows)."""
    if len(arrays) == 1:  # the common case, without building a set
        (array,) = arrays.values()
        return array.nbytes if array.ndim else -1
    sizes = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(sizes) != 1 or -1 in sizes:
        return -1
    return sum(a.nbytes for a in arrays.values())


def chunks(
    items: list[Outgoing], max_requests: int = PACK_MAX_REQUESTS
) -> Iterator[list[Outgoing]]:
    """``items`` in packs of at most ``max_requests`` requests and (past the first)
    PACK_MAX_BYTES bytes; a request that cannot be stacked goes alone."""
    chunk: list[Outgoing] = []
    size = 0
    for item in items:
        if item.nbytes < 0:
            yield [item]
            continue
        if chunk and (len(chunk) >= max_requests or size + item.nbytes > PACK_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.nbytes
    if chunk:
        yield chunk


async def publish_through_loss(
    transport: Transport, exchange: str, message: Message, routing_key: str, *,
    awaited: Callable[[], bool],
) -> bool:
    """Publish; when the connection's loss cuts the publish short (``ChannelBroken``), try
    again once the transport is back, for as long as ``awaited()`` (some caller still waits:
    each request's own deadline ends that). False when nobody waits any more (not sent).
    A second copy is harmless: workers run a request id once and the client takes one
    reply per id (docs/wire.md)."""
    pause = RETRY_FIRST_S
    while True:
        try:
            await transport.publish(exchange, message, routing_key)
            return True
        except ChannelBroken:
            if not awaited():
                return False
        await asyncio.sleep(pause)  # the reconnect is aio-pika's, at its own interval
        pause = min(2 * pause, RETRY_MAX_S)


def fail_all(items: list[Outgoing], error: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
