"""The brokerless broker: exchanges, queues, routing, dead-lettering and the memory budget.

One ``Broker`` per process (or per test) holds all state; every connection made with
``Broker.connect()`` sees the same exchanges and queues. All state changes happen
synchronously on the event loop thread, so no locks are needed; the transport's async
methods are thin wrappers around the methods here.

Publishing to several queues is atomic here: if any target queue refuses the message
(``reject-publish`` at its limit) it is enqueued nowhere and ``BackpressureError`` names
that queue. (RabbitMQ nacks such a publish too, but still enqueues the copies the other
queues accepted; a retry after backpressure therefore duplicates there, not here.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from conveyor.errors import NotFound, TransportError, UnroutableError
from conveyor.transport import ExchangeSpec, HeaderValue, Message, QueueSpec

from .exchanges import Exchange, make_exchange
from .memory import MemoryMeter, MemoryStatistics
from .queue import BrokerQueue, DeathReason, Envelope, QueueStatistics

if TYPE_CHECKING:
    from .transport import BrokerlessTransport

log = logging.getLogger("brokerless")

DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class BrokerStatistics:
    memory: MemoryStatistics
    exchanges: int
    queues: int


class Broker:
    """An in-process AMQP 0-9-1 style broker; ``connect()`` gives a ``Transport``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._meter = MemoryMeter(max_bytes)
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, BrokerQueue] = {}

    def connect(self) -> BrokerlessTransport:
        from .transport import BrokerlessTransport

        return BrokerlessTransport(self)

    def statistics(self) -> BrokerStatistics:
        return BrokerStatistics(
            memory=self._meter.statistics(),
            exchanges=len(self._exchanges),
            queues=len(self._queues),
        )

    # -- topology --------------------------------------------------------------------

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        if not spec.name or spec.name.startswith("amq."):
            raise TransportError(f"exchange name {spec.name!r} is reserved")
        existing = self._exchanges.get(spec.name)
        if existing is None:
            self._exchanges[spec.name] = make_exchange(spec)
        elif existing.spec != spec:
            raise TransportError(
                f"exchange {spec.name!r} exists with different arguments "
                f"({existing.spec} != {spec}) (PRECONDITION_FAILED)"
            )

    def declare_queue(self, spec: QueueSpec, owner: object) -> None:
        if not spec.name:
            raise TransportError(
                "brokerless queues need a name (server-named queues are not supported)"
            )
        existing = self._queues.get(spec.name)
        if existing is None:
            self._queues[spec.name] = BrokerQueue(
                spec, self._dead_letter, owner if spec.exclusive else None
            )
            return
        self._check_exclusive(existing, owner)
        if existing.spec != spec:
            raise TransportError(
                f"queue {spec.name!r} exists with different arguments "
                f"({existing.spec} != {spec}) (PRECONDITION_FAILED)"
            )

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self.queue(queue)
        self._bindable(exchange).bind(queue, routing_key)

    def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self.queue(queue)
        self._bindable(exchange).unbind(queue, routing_key)

    def delete_queue(self, name: str) -> None:
        """Delete a queue (unknown names are ignored, as on RabbitMQ)."""
        queue = self._queues.pop(name, None)
        if queue is None:
            return
        for exchange in self._exchanges.values():
            exchange.unbind_queue(name)
        for subscriber in queue.delete():
            subscriber.queue_deleted()

    def consumer_gone(self, queue: BrokerQueue) -> None:
        """Delete an ``auto_delete`` queue once its last consumer is gone."""
        if (
            queue.spec.auto_delete
            and queue.had_subscribers
            and queue.statistics().consumers == 0
            and self._queues.get(queue.name) is queue
        ):
            self.delete_queue(queue.name)

    def delete_exchange(self, name: str) -> None:
        self._exchanges.pop(name, None)

    def delete_owned_by(self, owner: object) -> None:
        for name in [n for n, q in self._queues.items() if q.owner is owner]:
            self.delete_queue(name)

    def queue(self, name: str, owner: object | None = None) -> BrokerQueue:
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound(f"no queue {name!r} (NOT_FOUND)")
        if owner is not None:
            self._check_exclusive(queue, owner)
        return queue

    def queue_statistics(self, name: str) -> QueueStatistics:
        return self.queue(name).statistics()

    def _bindable(self, exchange: str) -> Exchange:
        if exchange == "":
            raise TransportError("the default exchange cannot be bound to (ACCESS_REFUSED)")
        found = self._exchanges.get(exchange)
        if found is None:
            raise NotFound(f"no exchange {exchange!r} (NOT_FOUND)")
        return found

    @staticmethod
    def _check_exclusive(queue: BrokerQueue, owner: object) -> None:
        if queue.owner is not None and queue.owner is not owner:
            raise TransportError(
                f"queue {queue.name!r} is exclusive to another connection (RESOURCE_LOCKED)"
            )

    # -- routing ---------------------------------------------------------------------

    def route(self, exchange: str, message: Message, routing_key: str) -> list[BrokerQueue]:
        if exchange == "":
            queue = self._queues.get(routing_key)
            return [] if queue is None else [queue]
        found = self._exchanges.get(exchange)
        if found is None:
            raise NotFound(f"no exchange {exchange!r} (NOT_FOUND)")
        return [self._queues[name] for name in found.route(message, routing_key)]

    def publish(self, exchange: str, message: Message, routing_key: str, mandatory: bool) -> None:
        queues = self.route(exchange, message, routing_key)
        if not queues:
            if mandatory:
                raise UnroutableError(exchange, routing_key)
            return
        size = len(message.body)
        for queue in queues:
            queue.check_accepts(size)
        charge = self._meter.charge(size, len(queues))
        for queue in queues:
            queue.put(Envelope(message, exchange, routing_key, charge))

    def _dead_letter(self, source: BrokerQueue, envelope: Envelope, reason: DeathReason) -> None:
        """Republish a rejected/expired/dropped message to its queue's dead-letter exchange."""
        spec = source.spec
        envelope.charge.release()
        if spec.dead_letter_exchange is None:
            return
        deaths = (*envelope.deaths, (source.name, reason))
        if any(q == source.name for q, _ in envelope.deaths) and all(
            r is not DeathReason.REJECTED for _, r in deaths
        ):
            log.warning("dropping message dead-lettered in a cycle through queue %r", source.name)
            return
        routing_key = spec.dead_letter_routing_key or envelope.routing_key
        message = replace(
            envelope.message,
            headers=_death_headers(envelope, source.name, reason),
            expiration_ms=None,
        )
        try:
            targets = self.route(spec.dead_letter_exchange, message, routing_key)
        except TransportError as exc:
            log.warning("dropping dead-lettered message from %r: %s", source.name, exc)
            return
        targets = [q for q in targets if not q.refuses(envelope.size)]
        if not targets:
            log.debug("dead-lettered message from %r reached no queue", source.name)
            return
        # outside the budget: dead-lettering must not fail, and it adds at most one body
        charge = self._meter.charge(envelope.size, len(targets), enforce=False)
        for queue in targets:
            queue.put(Envelope(message, spec.dead_letter_exchange, routing_key, charge, deaths))


def _death_headers(envelope: Envelope, queue: str, reason: DeathReason) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = dict(envelope.message.headers)
    headers.setdefault("x-first-death-reason", reason.value)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-exchange", envelope.exchange)
    headers["x-last-death-reason"] = reason.value
    headers["x-last-death-queue"] = queue
    headers["x-last-death-exchange"] = envelope.exchange
    return headers
