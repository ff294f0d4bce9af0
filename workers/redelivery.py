"""Crash loops end: a message whose worker died at each delivery is dead-lettered and answered.

A worker that dies with deliveries in hand (an out-of-memory kill, a segfault in a kernel)
never settles them; the broker hands them out again marked ``redelivered``. Quorum queues
and brokerless count deliveries exactly, classic RabbitMQ queues only say "redelivered".
So the guard counts itself, the same way on every queue, and charges a death only to what
may have caused it:

* A redelivered message is a *suspect*: it is replaced by copies carrying the deaths so
  far in header ``x-conveyor-deliveries`` (one per request: a pack or batch is split, so
  the requests that did not kill the worker stop sharing the fate of the one that did),
  published to the work queue's **suspect queue** (``Topology.suspect_queue``, through the
  default exchange), and acked.
* A worker consumes each suspect queue with prefetch 1 (a join: one part per source, of
  one request at a time, ``JoinTurns``), and a copy runs in a batch of its own
  (``Item.alone``): the next suspect reaches a worker only once the one before was
  answered, its reply confirmed and it was acked. So when a worker dies, the only
  suspect it held is the one it was running (or about to run), and the requests around a
  killer are charged one death at most, the first time, when nothing could tell them
  apart. A suspect starts only while no copy is being published here, so a death does
  not catch half-moved messages (that would only duplicate them: a copy's count comes
  from the header of what was redelivered, never from a duplicate).
* A suspect that comes back redelivered once ``limit`` runs have died is not copied: it
  is dead-lettered (rejected), and each request it carries is answered with
  ``CrashLoopError`` naming the cause. With limit 3 a crashing request runs three times
  at most.

A message the worker gives back itself (an output publish failed: ``requeue``) is not a
death when it comes back to the same worker. One returned without a crash otherwise (a
graceful stop that gave back what it had not started, a flexible worker moved by the
controller, a requeue seen by another worker) counts as a death: the broker cannot tell
them apart. So does a suspect waiting for its turn behind a batch that kills the worker
for the first time. The limit is per message and small, so at worst a request that came
back that often is refused; docs/operations.md says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from conveyor import wire
from conveyor.envelope import RequestMeta
from conveyor.errors import CodecError, CrashLoopError, TransportError
from conveyor.packs import encode_stage_message, read_requests, request_pieces
from conveyor.transport import Delivery, HeaderValue, Message, Transport
from workers.settlement import Cause

log = logging.getLogger(__name__)

#: Header of a copy: how many runs of this message died before it was published.
DELIVERIES_HEADER = "x-conveyor-deliveries"
#: Broker-set headers a copy must not carry over (they describe the old message).
_BROKER_HEADERS = ("x-delivery-count", "x-death")
#: Requeued message ids remembered (a message comes back within moments, or not here).
GIVEN_BACK_MEMORY = 10_000
#: Seconds to wait before giving a message back when its copy could not be published
#: (the suspect queue is missing, the connection failed): the broker would hand it
#: straight back otherwise.
COPY_RETRY_S = 1.0

#: Seconds a join's suspect part of another request waits before going to the tail.
BOUNCE_S = 0.05

#: Sends one request's error reply (``Outbox.send_error``).
Answer = Callable[[RequestMeta, CrashLoopError], Awaitable[None]]
#: Dead-letters a delivery naming its causes (``DeadLetters.send``; None: reject it).
DeadLetterSend = Callable[..., Awaitable[None]]


def deaths_before(message: Message) -> int:
    """Runs of this message that died before this copy was published (0 if none)."""
    value = message.headers.get(DELIVERIES_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


class RedeliveryGuard:
    """Decides what to do with a redelivered message (see the module doc)."""

    def __init__(
        self,
        transport: Transport,
        limit: int,
        answer: Answer,
        *,
        dead_letter: DeadLetterSend | None = None,
    ) -> None:
        self.transport = transport
        self.limit = limit
        self._answer = answer
        self._dead_letter_send = dead_letter
        #: Messages dead-lettered here and messages moved to a suspect queue.
        self.dead_lettered = 0
        self.copied = 0
        #: Redelivered messages whose copies are being published; set when none is.
        self._copying = 0
        self._copied = asyncio.Event()
        self._copied.set()
        #: Ids of messages this worker requeued itself (ordered: the oldest is forgotten).
        self._given_back: dict[str, None] = {}
        #: The request whose parts each join suspect queue lets in now.
        self._turns = JoinTurns()

    def settled(self, suspects: str, delivery: Delivery) -> None:
        """A delivery from join suspect queue ``suspects`` is settled (ends a turn)."""
        self._turns.done(suspects, delivery.message)

    def consuming(self, suspects: str) -> None:
        """A consumer of ``suspects`` starts: what an earlier one held went back."""
        self._turns.forget(suspects)

    async def admit(
        self,
        delivery: Delivery,
        stage: str,
        *,
        ingress: bool,
        suspects: str,
        suspect: bool,
        join: bool = False,
    ) -> bool:
        """True: run it. False: settled here (moved to ``suspects``, or dead-lettered).
        ``stage``: the stage the message is for (named in logs and replies); ``suspects``:
        the suspect queue of the queue it came from; ``suspect``: it came from that one;
        ``join``: the stage is a join (its suspects go one request at a time)."""
        if not delivery.redelivered:
            if suspect and join and not self._turns.take(suspects, delivery.message):
                await self._bounce(delivery, suspects)
                return False
            if suspect:
                await self._copied.wait()
            return True
        message = delivery.message
        if message.message_id is not None and message.message_id in self._given_back:
            del self._given_back[message.message_id]
            return True  # this worker gave it back itself: not a death
        # This copy died (delivery_count - 1) times: 1 on a classic queue, which is exact
        # because every redelivery is replaced by a copy.
        deaths = deaths_before(message) + max(1, delivery.delivery_count - 1)
        if deaths >= self.limit:
            await self._dead_letter(delivery, deaths, stage, ingress=ingress)
        else:
            await self._move(delivery, deaths, suspects, stage, ingress=ingress)
        return False

    async def _move(
        self, delivery: Delivery, deaths: int, suspects: str, stage: str, *, ingress: bool
    ) -> None:
        """Replace a redelivered message by its copies on the suspect queue."""
        message = delivery.message
        self._copying += 1
        self._copied.clear()
        try:
            for copy in copies_of(message, deaths, ingress=ingress):
                await self.transport.publish("", copy, suspects)
        except TransportError as exc:
            log.warning(
                "stage %s: could not move redelivered message %s to %s (%s); giving it back "
                "in %g s (a missing queue: declare the plan's topology again, conveyor "
                "topology)",
                stage, message.message_id, suspects, exc, COPY_RETRY_S,
            )
            await asyncio.sleep(COPY_RETRY_S)
            with contextlib.suppress(TransportError):
                await delivery.requeue()
            return
        finally:
            self._copying -= 1
            if self._copying == 0:
                self._copied.set()
        self.copied += 1
        await delivery.ack()

    async def _bounce(self, delivery: Delivery, suspects: str) -> None:
        """A join suspect of another request than the one whose parts are being let in:
        to the tail of its queue, after a pause (the partner may come through the stage
        queue, and would find this loop spinning otherwise)."""
        await asyncio.sleep(BOUNCE_S)
        try:
            await self.transport.publish("", delivery.message, suspects)
        except TransportError:
            with contextlib.suppress(TransportError):
                await delivery.requeue()
            return
        await delivery.ack()

    async def requeue(self, delivery: Delivery) -> None:
        """Give back a message this worker could not finish (an output publish failed);
        its redelivery here is not taken for a death (another worker may count one)."""
        key = delivery.message.message_id
        if key is not None:
            self._given_back[key] = None
            if len(self._given_back) > GIVEN_BACK_MEMORY:
                del self._given_back[next(iter(self._given_back))]
        await delivery.requeue()

    async def _dead_letter(
        self, delivery: Delivery, deaths: int, stage: str, *, ingress: bool
    ) -> None:
        self.dead_lettered += 1
        message = delivery.message
        metas: list[RequestMeta] = []
        with contextlib.suppress(CodecError):
            metas = [meta for meta, _ in read_requests(message, ingress=ingress).requests]
        log.error(
            "stage %s: message %s (%d request(s)) was delivered %d times and its worker died "
            "each time; dead-lettered",
            stage, message.message_id, len(metas), deaths,
        )
        causes = []
        for meta in metas:
            error = CrashLoopError(
                f"request {meta.request_id} was delivered {deaths} times to stage {stage!r} "
                "and its worker died each time; dead-lettered (see the worker's log for the "
                "cause, e.g. an out-of-memory kill)",
                stage=stage,
            )
            causes.append(Cause.of(error, meta, stage))
            await self._answer(meta, error)
        if self._dead_letter_send is None:
            await delivery.reject()
            return
        if not causes:
            text = f"delivered {deaths} times to stage {stage!r}; its worker died each time"
            causes.append(Cause(CrashLoopError.code, text, message.message_id, stage=stage))
        # Shielded: publish-then-ack; a cancel between them would dead-letter it twice.
        await asyncio.shield(self._dead_letter_send(delivery, causes, stage=stage))


class JoinTurns:
    """One request at a time per join suspect queue. A join holds a part until its partners
    come, so its suspect queue lets in one part per source; parts of several requests held
    together would all be charged when one of them kills the worker. So the first suspect
    part starts a turn for its request; parts of other requests go back to the tail of the
    queue (``_bounce``) until every part of that request let in is settled."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[str | None, int]] = {}

    def take(self, suspects: str, message: Message) -> bool:
        """True if ``message`` (one request: a join's messages carry one) may come in."""
        request, held = self._turns.get(suspects, (message.message_id, 0))
        if request != message.message_id:
            return False
        self._turns[suspects] = (request, held + 1)
        return True

    def done(self, suspects: str, message: Message) -> None:
        request, held = self._turns.get(suspects, (None, 0))
        if held and request == message.message_id:
            if held == 1:
                del self._turns[suspects]
            else:
                self._turns[suspects] = (request, held - 1)

    def forget(self, suspects: str) -> None:
        self._turns.pop(suspects, None)


def copies_of(message: Message, deaths: int, *, ingress: bool) -> list[Message]:
    """The copies replacing a redelivered message: one per request it carries (a pack or
    a batch is split, so the requests that did not kill the worker stop sharing the fate
    of the one that did), each with ``deaths`` in ``DELIVERIES_HEADER``."""
    extra = {DELIVERIES_HEADER: deaths}
    try:
        msg = read_requests(message, ingress=ingress)
    except CodecError:
        msg = None
    if msg is None or len(msg.requests) == 1:
        return [_without_broker_headers(message, extra)]
    copies = []
    for (meta, rows), piece in zip(msg.requests, request_pieces(msg), strict=True):
        if ingress:
            one = meta.to_message(wire.encode(piece))
        else:
            assert msg.plan_hash is not None  # stage messages always name their plan
            one = encode_stage_message(msg.plan_hash, msg.source, [(meta, rows)], piece)
        copies.append(_without_broker_headers(one, extra))
    return copies


def _without_broker_headers(
    message: Message, extra: Mapping[str, HeaderValue] | None = None
) -> Message:
    headers = {k: v for k, v in message.headers.items() if k not in _BROKER_HEADERS}
    headers.update(extra or {})
    return replace(message, headers=headers)
