"""Crash loops end: a message whose worker died at each delivery is dead-lettered and answered.

A worker that dies with deliveries in hand (an out-of-memory kill, a segfault in a kernel)
never settles them; the broker hands them out again marked ``redelivered``. Quorum queues
and brokerless count deliveries exactly, classic RabbitMQ queues only say "redelivered".
So the guard counts itself, the same way on every queue: each redelivered message is
replaced by fresh copies carrying the deaths so far in header ``x-conveyor-deliveries``
(one per request: a pack or batch is split; published where the message came from, same
exchange and routing key), and the redelivered one is acked. A copy runs in a batch of
its own (``Item.alone``), and a worker runs one such copy at a time (``_admit_suspect``),
so the requests around a killer die with it once at most and are then answered. A copy that is
redelivered again once ``limit`` runs have died is not copied: it is dead-lettered
(rejected), and each request it carries is answered with ``CrashLoopError`` naming the
cause. With limit 3 a crashing request runs three
times at most.

A message the worker gives back itself (an output publish failed: ``requeue``) is not a
death when it comes back to the same worker. One returned without a crash otherwise (a
graceful stop that gave back what it had not started, a flexible worker moved by the
controller, a requeue seen by another worker) counts as a death: the broker cannot tell
them apart. The limit is per message and small, so at worst a request that
came back that often is refused; docs/operations.md says so.
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
#: (its queue is full): the broker would hand it straight back otherwise.
COPY_RETRY_S = 1.0

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
        #: Messages dead-lettered here and copies published (for tests and stats).
        self.dead_lettered = 0
        self.copied = 0
        #: The copy of a message whose earlier runs died that this worker runs now.
        self._suspect: Delivery | None = None
        #: Redelivered messages whose copies are being published; set when none is.
        self._copying = 0
        self._copied = asyncio.Event()
        self._copied.set()
        #: Ids of messages this worker requeued itself (ordered: the oldest is forgotten).
        self._given_back: dict[str, None] = {}

    async def admit(self, delivery: Delivery, stage: str, *, ingress: bool) -> bool:
        """True: run it. False: settled here (replaced by a copy, or dead-lettered).
        ``stage``: the stage the message is for (named in logs and replies)."""
        if not delivery.redelivered:
            if self._suspect is None and DELIVERIES_HEADER not in delivery.message.headers:
                return True
            return await self._admit_suspect(delivery)
        message = delivery.message
        if message.message_id is not None and message.message_id in self._given_back:
            del self._given_back[message.message_id]
            return True  # this worker gave it back itself: not a death
        # This copy died (delivery_count - 1) times: 1 on a classic queue, which is exact
        # because every redelivery is replaced by a copy.
        deaths = deaths_before(message) + max(1, delivery.delivery_count - 1)
        if deaths >= self.limit:
            await self._dead_letter(delivery, deaths, stage, ingress=ingress)
            return False
        self._copying += 1
        self._copied.clear()
        try:
            for copy in copies_of(message, deaths, ingress=ingress):
                await self.transport.publish(delivery.exchange, copy, delivery.routing_key)
        except TransportError as exc:
            log.warning(
                "stage %s: could not re-publish redelivered message %s (%s); giving it back "
                "in %g s",
                stage, message.message_id, exc, COPY_RETRY_S,
            )
            await asyncio.sleep(COPY_RETRY_S)
            with contextlib.suppress(TransportError):
                await delivery.requeue()
            return False
        finally:
            self._copying -= 1
            if self._copying == 0:
                self._copied.set()
        self.copied += 1
        await delivery.ack()
        return False

    async def _admit_suspect(self, delivery: Delivery) -> bool:
        """A copy whose earlier runs died runs only while this worker holds no other such
        copy: if it kills the worker, what dies with it has never died before, so the
        requests around a killer are charged one death at most. Another one goes back to
        the tail of its queue (same count: it was not run)."""
        message = delivery.message
        if deaths_before(message) == 0:
            return True
        if self._suspect is None:
            self._suspect = delivery
            # Messages being replaced by copies are unsettled until their copies are
            # confirmed: if this one kills the worker meanwhile, they would be charged.
            await self._copied.wait()
            return True
        try:
            await self.transport.publish(delivery.exchange, message, delivery.routing_key)
        except TransportError:
            await delivery.requeue()
            return False
        # Not held back before the ack: dying then would redeliver it, charged with a
        # death, next to its copy. Bouncing lasts only while the suspect runs.
        await delivery.ack()
        return False

    def settled(self, delivery: Delivery) -> None:
        """A delivery this worker ran is settled (frees the suspect's slot)."""
        if delivery is self._suspect:
            self._suspect = None

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
