"""One brokerless queue: a bounded buffer of ready messages plus its subscribers.

Modelled on trio's memory channels (``trio/_channel.py``): the buffer is bounded
(``max_length`` / ``max_length_bytes``; the broker's ``max_bytes`` above all queues),
a full buffer either refuses the publish (``reject-publish``, like a channel that would
block) or drops its oldest message (``drop-head``), a deleted queue is a distinct state,
and statistics are a frozen record.

AMQP details mirrored from RabbitMQ:

* limits count *ready* messages only (unacknowledged ones do not count);
* requeued and returned messages go back to the head, in their original order, and may
  exceed ``max_length``;
* TTL (queue ``message_ttl_ms`` and per-message ``expiration_ms``, whichever is shorter)
  is counted from the first enqueue; an expired message is removed when it reaches the
  head of the queue (so a short-lived message behind a long-lived one waits, as on
  RabbitMQ); unacknowledged messages never expire;
* ``delivery_limit``: a message returned after more than ``delivery_limit`` deliveries is
  dead-lettered instead (RabbitMQ quorum queues: limit 2 means three deliveries).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

from conveyor.errors import BackpressureError, TransportError
from conveyor.transport import Message, QueueSpec

from .memory import Charge


class DeathReason(StrEnum):
    """Why a message left its queue for the dead-letter exchange (RabbitMQ's names)."""

    REJECTED = "rejected"
    EXPIRED = "expired"
    MAXLEN = "maxlen"
    DELIVERY_LIMIT = "delivery_limit"


class QueueState(Enum):
    OPEN = "open"
    DELETED = "deleted"


class Envelope:
    """A message held by one queue, with that queue's bookkeeping."""

    __slots__ = (
        "charge",
        "deaths",
        "deliveries",
        "exchange",
        "expires_at",
        "message",
        "routing_key",
        "seq",
        "size",
    )

    def __init__(
        self,
        message: Message,
        exchange: str,
        routing_key: str,
        charge: Charge,
        deaths: tuple[tuple[str, DeathReason], ...] = (),
    ) -> None:
        self.message = message
        self.exchange = exchange
        self.routing_key = routing_key
        self.charge = charge
        self.size = len(message.body)
        #: (queue, reason) of earlier dead-letterings, for cycle detection.
        self.deaths = deaths
        self.deliveries = 0
        self.expires_at: float | None = None
        self.seq = 0


class Subscriber(Protocol):
    def has_capacity(self) -> bool: ...
    def deliver(self, envelope: Envelope) -> None: ...
    def queue_deleted(self) -> None:
        """The queue is gone: drop unsettled deliveries, stop."""
        ...


DeadLetter = Callable[["BrokerQueue", Envelope, DeathReason], None]


@dataclass(frozen=True)
class QueueStatistics:
    name: str
    state: QueueState
    #: Messages ready for delivery.
    ready: int
    ready_bytes: int
    #: Delivered and not yet settled.
    unacked: int
    consumers: int
    max_length: int | None
    max_length_bytes: int | None


class BrokerQueue:
    def __init__(self, spec: QueueSpec, dead_letter: DeadLetter, owner: object | None) -> None:
        self.spec = spec
        self.owner = owner
        self.state = QueueState.OPEN
        self.had_subscribers = False
        self._dead_letter = dead_letter
        self._ready: deque[Envelope] = deque()
        self._ready_bytes = 0
        self._unacked = 0
        self._subscribers: list[Subscriber] = []
        self._next = 0
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._dispatching = False

    @property
    def name(self) -> str:
        return self.spec.name

    # -- publishing ------------------------------------------------------------------

    def refuses(self, size: int) -> bool:
        """True when a ``reject-publish`` queue has no room for a message of ``size`` bytes."""
        spec = self.spec
        if spec.overflow != "reject-publish":
            return False
        if spec.max_length is not None and len(self._ready) >= spec.max_length:
            return True
        return (
            spec.max_length_bytes is not None and self._ready_bytes + size > spec.max_length_bytes
        )

    def check_accepts(self, size: int) -> None:
        self._check_open()
        if self.refuses(size):
            raise BackpressureError(
                f"queue {self.name!r} is full (max_length={self.spec.max_length}, "
                f"max_length_bytes={self.spec.max_length_bytes}, overflow=reject-publish)",
                queue=self.name,
            )

    def put(self, envelope: Envelope) -> None:
        """Enqueue at the tail (the caller checked ``refuses`` for reject-publish)."""
        self._check_open()
        now = asyncio.get_running_loop().time()
        ttls = [
            t for t in (self.spec.message_ttl_ms, envelope.message.expiration_ms) if t is not None
        ]
        envelope.expires_at = now + min(ttls) / 1000.0 if ttls else None
        self._seq += 1
        envelope.seq = self._seq
        self._ready.append(envelope)
        self._ready_bytes += envelope.size
        self._drop_overflow()
        self.dispatch()

    def _drop_overflow(self) -> None:
        spec = self.spec
        if spec.overflow != "drop-head":
            return
        while self._ready and (
            (spec.max_length is not None and len(self._ready) > spec.max_length)
            or (spec.max_length_bytes is not None and self._ready_bytes > spec.max_length_bytes)
        ):
            self._dead_letter(self, self._pop(), DeathReason.MAXLEN)

    # -- settling --------------------------------------------------------------------

    def acked(self, envelope: Envelope) -> None:
        self._unacked -= 1
        envelope.charge.release()
        self.dispatch()

    def rejected(self, envelope: Envelope) -> None:
        self._unacked -= 1
        self._dead_letter(self, envelope, DeathReason.REJECTED)
        self.dispatch()

    def returned(self, envelopes: Iterable[Envelope]) -> None:
        """Back to the head in original order (requeue, cancelled consumer, closed connection)."""
        limit = self.spec.delivery_limit
        for envelope in sorted(envelopes, key=lambda e: e.seq, reverse=True):
            self._unacked -= 1
            if limit is not None and envelope.deliveries > limit:
                self._dead_letter(self, envelope, DeathReason.DELIVERY_LIMIT)
            else:
                self._insert_in_order(envelope)
        self.dispatch()

    def _insert_in_order(self, envelope: Envelope) -> None:
        # ready messages stay sorted by seq; returned ones are old, so the scan is short
        index = 0
        for index, queued in enumerate(self._ready):  # noqa: B007
            if queued.seq > envelope.seq:
                break
        else:
            index = len(self._ready)
        self._ready.insert(index, envelope)
        self._ready_bytes += envelope.size

    # -- consumers -------------------------------------------------------------------

    def add_subscriber(self, subscriber: Subscriber) -> None:
        self._check_open()
        self._subscribers.append(subscriber)
        self.had_subscribers = True
        self.dispatch()

    def remove_subscriber(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def dispatch(self) -> None:
        """Hand ready messages to subscribers with room, round-robin, skipping expired ones."""
        if self._dispatching or self.state is QueueState.DELETED:
            return
        self._dispatching = True
        try:
            now = asyncio.get_running_loop().time()
            while self._ready and self._subscribers:
                self._expire_head(now)
                if not self._ready:
                    break
                subscriber = self._next_with_capacity()
                if subscriber is None:
                    break
                envelope = self._pop()
                envelope.deliveries += 1
                self._unacked += 1
                subscriber.deliver(envelope)
            self._expire_head(now)
            self._arm_timer()
        finally:
            self._dispatching = False

    def _next_with_capacity(self) -> Subscriber | None:
        n = len(self._subscribers)
        for i in range(n):
            index = (self._next + i) % n
            subscriber = self._subscribers[index]
            if subscriber.has_capacity():
                self._next = (index + 1) % n
                return subscriber
        return None

    # -- expiry ----------------------------------------------------------------------

    def _expire_head(self, now: float) -> None:
        while self._ready:
            expires_at = self._ready[0].expires_at
            if expires_at is None or expires_at > now:
                return
            self._dead_letter(self, self._pop(), DeathReason.EXPIRED)

    def _arm_timer(self) -> None:
        head_expiry = self._ready[0].expires_at if self._ready else None
        if self._timer is not None:
            if head_expiry is not None and self._timer.when() == head_expiry:
                return
            self._timer.cancel()
            self._timer = None
        if head_expiry is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(head_expiry, self._on_timer, head_expiry)

    def _on_timer(self, when: float) -> None:
        self._timer = None
        # call_at may fire up to the clock resolution early; the timer's own time is due
        self._expire_head(max(when, asyncio.get_running_loop().time()))
        self.dispatch()

    # -- lifecycle -------------------------------------------------------------------

    def delete(self) -> list[Subscriber]:
        """Drop every ready message; return the subscribers, which must drop their deliveries."""
        self.state = QueueState.DELETED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._ready:
            self._pop().charge.release()
        subscribers, self._subscribers = self._subscribers, []
        return subscribers

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            name=self.name,
            state=self.state,
            ready=len(self._ready),
            ready_bytes=self._ready_bytes,
            unacked=self._unacked,
            consumers=len(self._subscribers),
            max_length=self.spec.max_length,
            max_length_bytes=self.spec.max_length_bytes,
        )

    def _pop(self) -> Envelope:
        envelope = self._ready.popleft()
        self._ready_bytes -= envelope.size
        return envelope

    def _check_open(self) -> None:
        if self.state is QueueState.DELETED:
            raise TransportError(f"queue {self.name!r} was deleted")
