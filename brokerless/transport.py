"""``BrokerlessTransport``: the ``conveyor.transport.Transport`` protocol on a ``Broker``.

One transport is one "connection". Handlers run as tasks, one per delivery; the
consumer keeps a reference to each until it finishes. A handler marked with
``conveyor.eager.mark_eager`` runs its first step without a task of its own: the
consumer's deliveries of one loop turn start in one callback, and only a handler that
has to wait gets a task (to go on with); one that finishes at once costs no task.

A handler that raises has its delivery rejected (dead-lettered when the queue has a
dead-letter exchange) and the error logged; a handler that returns without settling
leaves the delivery unacknowledged (it counts against the prefetch) until it is settled,
or until its consumer is cancelled or its connection closes, when it goes back to the
queue as redelivered.

``Consumer.cancel()`` stops deliveries at once, cancels the consumer's running handlers
(except the one calling ``cancel``, which may still settle its own delivery) and returns
every unsettled delivery to the queue. ``close(grace)`` is the gentle version for the
whole connection: stop consuming, let handlers finish for up to ``grace`` seconds (they
may still publish and settle), cancel the rest, return what is unsettled, delete this
connection's exclusive queues.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING

from conveyor.eager import is_eager, step
from conveyor.errors import ConfigError, TransportClosed, TransportError
from conveyor.transport import (
    Consumer,
    Delivery,
    ExchangeSpec,
    Handler,
    Message,
    QueueSpec,
    QueueStats,
    Transport,
)

from .broker import Broker
from .queue import BrokerQueue, Envelope

log = logging.getLogger("brokerless")

#: Publishes on one connection within one turn of the event loop before ``publish``
#: yields: a publish is confirmed when it returns (the enqueue is the confirm), so it
#: need not wait, but a loop that only publishes must still let consumers run.
PUBLISH_BURST = 64


class ConnectionState(Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ConsumerState(Enum):
    ACTIVE = "active"
    #: No new deliveries; handlers in flight may still settle (close grace period).
    STOPPED = "stopped"
    CANCELLED = "cancelled"


class DeliveryState(Enum):
    PENDING = "pending"
    ACKED = "acked"
    REJECTED = "rejected"
    REQUEUED = "requeued"
    #: Given back to the queue because its consumer was cancelled or its connection closed.
    RETURNED = "returned"
    #: Its queue was deleted; settling it does nothing.
    DROPPED = "dropped"


class BrokerlessDelivery:
    """One message handed to one consumer; ``state`` says how (and whether) it was settled."""

    __slots__ = ("_consumer", "_count", "_envelope", "state")

    def __init__(self, consumer: BrokerlessConsumer, envelope: Envelope) -> None:
        self._consumer = consumer
        self._envelope = envelope
        self._count = envelope.deliveries
        self.state = DeliveryState.PENDING

    @property
    def message(self) -> Message:
        return self._envelope.message

    @property
    def exchange(self) -> str:
        return self._envelope.exchange

    @property
    def routing_key(self) -> str:
        return self._envelope.routing_key

    @property
    def redelivered(self) -> bool:
        return self._count > 1

    @property
    def delivery_count(self) -> int:
        return self._count

    @property
    def envelope(self) -> Envelope:
        return self._envelope

    async def ack(self) -> None:
        self._consumer.settle(self, DeliveryState.ACKED)

    async def reject(self) -> None:
        self._consumer.settle(self, DeliveryState.REJECTED)

    async def requeue(self) -> None:
        self._consumer.settle(self, DeliveryState.REQUEUED)


class BrokerlessConsumer:
    """A subscription to one queue: at most ``prefetch`` unsettled deliveries (0 = no limit)."""

    def __init__(
        self, transport: BrokerlessTransport, queue: BrokerQueue, handler: Handler, prefetch: int
    ) -> None:
        self._transport = transport
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self.state = ConsumerState.ACTIVE
        self._unsettled: dict[BrokerlessDelivery, None] = {}  # ordered set
        self._tasks: dict[asyncio.Task[None], BrokerlessDelivery] = {}
        self._delivered = 0
        #: Eager handlers: deliveries whose handler starts in the next ``_start_waiting``.
        self._eager = is_eager(handler)
        self._waiting: deque[BrokerlessDelivery] = deque()
        self._start_scheduled = False
        #: The delivery whose eager handler is running its first step right now.
        self._inline: BrokerlessDelivery | None = None

    @property
    def queue(self) -> str:
        return self._queue.name

    @property
    def broker_queue(self) -> BrokerQueue:
        return self._queue

    @property
    def prefetch(self) -> int:
        return self._prefetch

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    async def set_prefetch(self, prefetch: int) -> None:
        self._transport.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._prefetch = check_prefetch(prefetch)
        self._queue.dispatch()

    async def cancel(self) -> None:
        if self.state is not ConsumerState.ACTIVE:
            return
        self.stop()
        self._waiting.clear()  # not started: like a task cancelled before its first step
        await finish_handlers(self._tasks, grace=0.0)
        self.finish()
        self._transport.forget(self)

    # -- the queue's side (Subscriber) -----------------------------------------------

    def has_capacity(self) -> bool:
        return self.state is ConsumerState.ACTIVE and (
            self._prefetch == 0 or len(self._unsettled) < self._prefetch
        )

    def deliver(self, envelope: Envelope) -> None:
        delivery = BrokerlessDelivery(self, envelope)
        self._unsettled[delivery] = None
        self._delivered += 1
        if self._eager:
            self._waiting.append(delivery)
            if not self._start_scheduled:
                self._start_scheduled = True
                asyncio.get_running_loop().call_soon(self._start_waiting)
            return
        task = asyncio.get_running_loop().create_task(
            self._run(delivery), name=f"brokerless:{self.queue}:{self._delivered}"
        )
        self._tasks[task] = delivery
        task.add_done_callback(self._forget_task)

    def queue_deleted(self) -> None:
        self.state = ConsumerState.CANCELLED
        for delivery in self._unsettled:
            delivery.state = DeliveryState.DROPPED
            delivery.envelope.charge.release()
        self._unsettled.clear()
        self._transport.forget(self)

    # -- settling --------------------------------------------------------------------

    def settle(self, delivery: BrokerlessDelivery, outcome: DeliveryState) -> None:
        self._transport.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        if delivery.state is DeliveryState.DROPPED:
            return
        if delivery.state is not DeliveryState.PENDING:
            raise TransportError(
                f"delivery {delivery.delivery_count} of message "
                f"{delivery.message.message_id!r} from queue {self.queue!r} is already "
                f"{delivery.state.value}; settle a delivery once"
            )
        delivery.state = outcome
        del self._unsettled[delivery]
        if outcome is DeliveryState.ACKED:
            self._queue.acked(delivery.envelope)
        elif outcome is DeliveryState.REJECTED:
            self._queue.rejected(delivery.envelope)
        else:
            self._queue.returned([delivery.envelope])

    def _give_back(self, deliveries: list[BrokerlessDelivery]) -> None:
        for delivery in deliveries:
            delivery.state = DeliveryState.RETURNED
            del self._unsettled[delivery]
        if deliveries:
            self._queue.returned([d.envelope for d in deliveries])

    # -- handlers --------------------------------------------------------------------

    async def _run(self, delivery: BrokerlessDelivery) -> None:
        try:
            await self._handler(delivery)
        except Exception:
            log.exception(
                "handler for queue %r failed on message %r; rejecting it",
                self.queue,
                delivery.message.message_id,
            )
            if delivery.state is DeliveryState.PENDING and self._transport.usable:
                self.settle(delivery, DeliveryState.REJECTED)
        finally:
            if self.state is not ConsumerState.ACTIVE and delivery.state is DeliveryState.PENDING:
                self._give_back([delivery])

    def _start_waiting(self) -> None:
        """Start the handlers of the deliveries waiting when this was scheduled (eager
        handlers); one that suspends goes on as a task, kept like any handler task."""
        self._start_scheduled = False
        waiting = self._waiting
        for _ in range(len(waiting)):
            if not waiting:  # the consumer was cancelled meanwhile
                return
            delivery = waiting.popleft()
            if delivery.state is DeliveryState.RETURNED:
                continue  # given back before its handler started
            self._inline = delivery
            try:
                task = step(self._run(delivery))
            except asyncio.CancelledError:
                continue  # the handler cancelled itself: as a task that was cancelled
            finally:
                self._inline = None
            if task is not None:
                task.set_name(f"brokerless:{self.queue}:{self._delivered}")
                self._tasks[task] = delivery
                task.add_done_callback(self._forget_task)

    @property
    def starting(self) -> bool:
        """True while deliveries wait for their (eager) handlers to start."""
        return bool(self._waiting)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def handler_tasks(self) -> dict[asyncio.Task[None], BrokerlessDelivery]:
        return dict(self._tasks)

    def stop(self) -> None:
        """No more deliveries; handlers in flight continue."""
        if self.state is ConsumerState.ACTIVE:
            self.state = ConsumerState.STOPPED
            self._queue.remove_subscriber(self)

    def finish(self) -> None:
        """Return every unsettled delivery except the calling handler's own."""
        own = self._inline
        if own is None:
            current = asyncio.current_task()
            own = self._tasks.get(current) if current is not None else None
        self._waiting.clear()
        self._give_back([d for d in self._unsettled if d is not own])
        self.state = ConsumerState.CANCELLED


async def finish_handlers(
    tasks: dict[asyncio.Task[None], BrokerlessDelivery], grace: float
) -> None:
    """Wait up to ``grace`` for handler tasks (not the caller's own), then cancel the rest."""
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not current and not t.done()]
    if not pending:
        return
    if grace > 0:
        await asyncio.wait(pending, timeout=grace)
    late = [t for t in pending if not t.done()]
    for task in late:
        task.cancel()
    if late:
        _, stuck = await asyncio.wait(late, timeout=max(grace, 1.0))
        for task in stuck:
            log.warning("handler task %s ignored cancellation", task.get_name())


def check_prefetch(prefetch: int) -> int:
    if prefetch < 0:
        raise ConfigError(f"prefetch must be >= 0 (0 = unlimited), got {prefetch}")
    return prefetch


class BrokerlessTransport:
    """One connection to a ``Broker``; implements ``conveyor.transport.Transport``."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._state = ConnectionState.OPEN
        self._consumers: dict[BrokerlessConsumer, None] = {}
        self._closed = asyncio.Event()
        #: Publishes since the last turn of the loop (see ``PUBLISH_BURST``).
        self._burst = 0

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def usable(self) -> bool:
        return self._state is not ConnectionState.CLOSED

    @property
    def connected(self) -> bool:
        """Open (readiness: ``conveyor.app.observe.broker_check``)."""
        return self._state is ConnectionState.OPEN

    def require(self, *states: ConnectionState) -> None:
        if self._state not in states:
            raise TransportClosed(f"brokerless connection is {self._state.value}")

    def forget(self, consumer: BrokerlessConsumer) -> None:
        self._consumers.pop(consumer, None)
        self._broker.consumer_gone(consumer.broker_queue)

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.declare_exchange(spec)

    async def declare_queue(self, spec: QueueSpec) -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.declare_queue(spec, owner=self)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.bind_queue(queue, exchange, routing_key)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.unbind_queue(queue, exchange, routing_key)

    async def delete_queue(self, name: str) -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.delete_queue(name)

    async def delete_exchange(self, name: str) -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.delete_exchange(name)

    async def publish(
        self,
        exchange: str,
        message: Message,
        routing_key: str = "",
        *,
        mandatory: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (confirmed at once: nothing to bound)
    ) -> None:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        self._broker.publish(exchange, message, routing_key, mandatory)
        # Confirmed: it is in every queue it routes to (or raised). No round trip to wait
        # for; yield only after a burst, so a publishing loop cannot starve the consumers.
        self._burst += 1
        if self._burst == 1:
            asyncio.get_running_loop().call_soon(self._end_burst)
        elif self._burst >= PUBLISH_BURST:
            await asyncio.sleep(0)

    def _end_burst(self) -> None:
        self._burst = 0

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> BrokerlessConsumer:
        self.require(ConnectionState.OPEN)
        target = self._broker.queue(queue, owner=self)
        consumer = BrokerlessConsumer(self, target, handler, check_prefetch(prefetch))
        self._consumers[consumer] = None
        target.add_subscriber(consumer)
        return consumer

    async def queue_stats(self, queue: str) -> QueueStats:
        self.require(ConnectionState.OPEN, ConnectionState.CLOSING)
        stats = self._broker.queue_statistics(queue)
        return QueueStats(name=stats.name, depth=stats.ready, consumers=stats.consumers)

    async def close(self, grace: float = 5.0) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        if self._state is ConnectionState.CLOSING:
            await self._closed.wait()
            return
        self._state = ConnectionState.CLOSING
        try:
            consumers = list(self._consumers)
            for consumer in consumers:
                consumer.stop()
            if any(c.starting for c in consumers):
                # Their handlers start on the next turn (as tasks made before would):
                # let them, so they get the grace period too.
                await asyncio.sleep(0)
            tasks = {t: d for c in consumers for t, d in c.handler_tasks.items()}
            await finish_handlers(tasks, grace)
            for consumer in consumers:
                consumer.finish()
                self.forget(consumer)
            self._broker.delete_owned_by(self)
        finally:
            self._state = ConnectionState.CLOSED
            self._closed.set()


if TYPE_CHECKING:  # the classes satisfy the protocols (checked by mypy, free at run time)
    _transport: type[Transport] = BrokerlessTransport
    _consumer: type[Consumer] = BrokerlessConsumer
    _delivery: type[Delivery] = BrokerlessDelivery
