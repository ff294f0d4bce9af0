"""Whether a request's caller is still there: its reply queue exists, and keeps existing.

The SDK's reply queue is exclusive and auto-delete (docs/wire.md): it goes when its client
closes or dies, and also, for a moment, when its client's connection drops and comes back
(the client declares the queue again, then sends again what was in flight). A request
naming a reply queue that is gone for good has nobody to answer, so the ingress drops it
unrun (``workers.intake``); one whose caller is only reconnecting must run.

``Callers.gone`` asks the transport (``queue_stats``: a passive declare on RabbitMQ):

* present: not gone; the answer is kept for ``ttl_s`` (one ask per reply queue and second);
* missing: gone only once it has been missing for ``grace_s`` (missing at the first ask,
  and still missing ``grace_s`` later, with no answer "present" between). Until then the
  question waits, asking again every ``recheck_s``, and ends with "not gone" as soon as
  the queue is back; a reconnecting client is back well within the grace (the SDK
  reconnects at once, then every ``reconnect_interval_s``, 2 s). A "gone" answer is never
  kept: the next question asks again, so a client that comes back (and sends again) is
  seen at once. Concurrent questions about one queue share one ask, so a flood of a
  departed caller's requests costs one ask at a time.

Only ``NotFound`` means missing: RabbitMQ answers ``RESOURCE_LOCKED`` for an exclusive
queue of another connection (its client is there; ``ACCESS_REFUSED`` if the worker's user
may not look), and a channel lost under the ask (``ChannelBroken``) or any other failure
leaves the request to run: an answer nobody reads costs less than a request not run.
Before this rule (a "gone" answer kept for 1 s), a worker that looked while a client
reconnected dropped a second of that client's requests, resent ones included: 49 lost in
the fault suite's connection-loss test (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import time

from conveyor.errors import ChannelBroken, NotFound, TransportError
from conveyor.transport import Transport

#: How long an answer "present" is kept.
TTL_S = 1.0
#: How long a reply queue must stay missing before its caller counts as gone.
GRACE_S = 5.0
#: How often a question waiting out the grace asks again (it ends as soon as the queue is
#: back: the delivery it holds takes a slot of the worker's prefetch meanwhile).
RECHECK_S = 0.25
#: Reply queues remembered at once (answers and first misses); the oldest go first.
MAX_ENTRIES = 4096


class Callers:
    def __init__(
        self,
        transport: Transport,
        *,
        ttl_s: float = TTL_S,
        grace_s: float = GRACE_S,
        recheck_s: float = RECHECK_S,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._transport = transport
        self._ttl_s = ttl_s
        self._grace_s = grace_s
        self._recheck_s = recheck_s
        self._max_entries = max_entries
        #: reply queue -> "present" good until (monotonic)
        self._present: dict[str, float] = {}
        #: reply queue -> when it was first found missing since last seen present
        self._missing_since: dict[str, float] = {}
        self._asking: dict[str, asyncio.Future[bool | None]] = {}
        #: Questions the broker was asked (the rest were answered from what is kept).
        self.asked = 0

    async def gone(self, reply_to: str) -> bool:
        """True when the queue ``reply_to`` has been missing for ``grace_s`` (its caller is
        gone); may wait up to ``grace_s`` to tell a reconnecting caller from a gone one."""
        while True:
            until = self._present.get(reply_to)
            if until is not None and time.monotonic() < until:
                return False
            if not await self._shared_ask(reply_to):  # present, or no answer
                return False
            since = self._missing_since.get(reply_to, time.monotonic())
            left = since + self._grace_s - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, self._recheck_s))  # back (reconnected)? ask

    async def _shared_ask(self, reply_to: str) -> bool | None:
        """Missing (True), present (False) or no answer (None); one ask at a time."""
        waiting = self._asking.get(reply_to)
        if waiting is not None:
            return await asyncio.shield(waiting)
        answer: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._asking[reply_to] = answer
        missing: bool | None = None
        try:
            missing = await self._ask(reply_to)
        finally:
            del self._asking[reply_to]
            answer.set_result(missing)  # a cancelled ask: no answer, so not gone
        return missing

    async def _ask(self, reply_to: str) -> bool | None:
        self.asked += 1
        try:
            await self._transport.queue_stats(reply_to)
        except NotFound:
            self._missing(reply_to)
            return True
        except ChannelBroken:
            return None  # no answer (another ask's error closed the channel, say)
        except TransportError:
            pass  # an answer: locked (exclusive to its client), refused, no reply
        self._seen(reply_to)
        return False

    def _seen(self, reply_to: str) -> None:
        self._missing_since.pop(reply_to, None)
        _remember(self._present, reply_to, time.monotonic() + self._ttl_s, self._max_entries)

    def _missing(self, reply_to: str) -> None:
        self._present.pop(reply_to, None)
        if reply_to not in self._missing_since:
            _remember(self._missing_since, reply_to, time.monotonic(), self._max_entries)


def _remember(entries: dict[str, float], key: str, value: float, limit: int) -> None:
    """``entries[key] = value``, last in the eviction order, at most ``limit`` entries."""
    entries.pop(key, None)
    if len(entries) >= limit:
        del entries[next(iter(entries))]
    entries[key] = value
