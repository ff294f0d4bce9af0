"""Whether a request's caller is still there: its reply queue exists.

The SDK's reply queue is exclusive and auto-delete (docs/wire.md): it goes when its client
closes or dies. A request naming a reply queue that no longer exists has nobody to answer,
so the ingress drops it unrun (``workers.intake``). ``Callers.gone`` asks the transport
(``queue_stats``: a passive declare on RabbitMQ) and keeps each answer for ``ttl_s``
seconds, for at most ``max_entries`` reply queues; concurrent questions about one queue
share one ask. Only ``NotFound`` means gone: RabbitMQ answers ``RESOURCE_LOCKED`` for an
exclusive queue of another connection (its client is there; ``ACCESS_REFUSED`` if the
worker's user may not look), and a channel lost under the ask (``ChannelBroken``, not kept)
or any other failure leaves the request to run: an answer nobody reads costs less than a
request not run.
"""

from __future__ import annotations

import asyncio
import time

from conveyor.errors import ChannelBroken, NotFound, TransportError
from conveyor.transport import Transport

#: How long an answer about a reply queue is kept.
TTL_S = 1.0
#: Reply queues remembered at once; the oldest answer goes first.
MAX_ENTRIES = 4096


class Callers:
    def __init__(
        self, transport: Transport, *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES
    ) -> None:
        self._transport = transport
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        #: reply queue -> (answer good until, gone)
        self._known: dict[str, tuple[float, bool]] = {}
        self._asking: dict[str, asyncio.Future[bool]] = {}
        #: Questions the broker was asked (the rest were answered from the cache).
        self.asked = 0

    async def gone(self, reply_to: str) -> bool:
        """True when the queue ``reply_to`` does not exist (its caller is gone)."""
        known = self._known.get(reply_to)
        if known is not None and time.monotonic() < known[0]:
            return known[1]
        waiting = self._asking.get(reply_to)
        if waiting is not None:
            return await asyncio.shield(waiting)
        answer = asyncio.get_running_loop().create_future()
        self._asking[reply_to] = answer
        gone = False
        try:
            gone = await self._ask(reply_to)
        finally:
            del self._asking[reply_to]
            answer.set_result(gone)  # a cancelled ask: unknown, so not gone
        return gone

    async def _ask(self, reply_to: str) -> bool:
        self.asked += 1
        try:
            await self._transport.queue_stats(reply_to)
        except NotFound:
            gone = True
        except ChannelBroken:
            return False  # no answer (another ask's error closed the channel, say)
        except TransportError:
            gone = False  # an answer: locked (exclusive to its client), refused, no reply
        else:
            gone = False
        if len(self._known) >= self._max_entries:
            del self._known[next(iter(self._known))]
        self._known.pop(reply_to, None)  # re-inserted: last in the eviction order
        self._known[reply_to] = (time.monotonic() + self._ttl_s, gone)
        return gone
