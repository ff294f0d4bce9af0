"""Consumers and deliveries of the RabbitMQ transport (see ``workers.amqp`` for the rules).

Each ``AmqpConsumer`` owns one aio-pika robust channel, so ``basic.qos`` on it is that
consumer's prefetch. Every ``AmqpDelivery`` remembers the aiormq channel it came on; once
that channel is closed its delivery tag is dead, and settling it is a logged no-op.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING, cast

import aiormq.exceptions as amqp_exc
from aio_pika import IncomingMessage
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from conveyor.errors import TransportError
from conveyor.transport import Handler, Message
from workers.amqp.convert import delivery_count, from_incoming
from workers.amqp.errors import translated

if TYPE_CHECKING:
    import aiormq
    from aiormq.abc import AbstractChannel

log = logging.getLogger(__name__)


class Settlement(enum.Enum):
    PENDING = "pending"
    ACKED = "acked"
    REJECTED = "rejected"
    REQUEUED = "requeued"
    #: The channel died first: the broker redelivers it, nothing was sent.
    STALE = "stale"


_VERB = {Settlement.ACKED: "ack", Settlement.REJECTED: "reject", Settlement.REQUEUED: "requeue"}


class AmqpDelivery:
    """One message from RabbitMQ; settle it once with ``ack``, ``reject`` or ``requeue``."""

    __slots__ = ("_channel", "_consumer", "_incoming", "_message", "settlement")

    def __init__(self, incoming: AbstractIncomingMessage, consumer: AmqpConsumer) -> None:
        self._incoming = incoming
        self._channel: AbstractChannel = incoming.channel
        self._consumer = consumer
        self._message: Message | None = None
        self.settlement = Settlement.PENDING

    @property
    def _queue(self) -> str:
        return self._consumer.queue

    @property
    def message(self) -> Message:
        if self._message is None:
            self._message = from_incoming(self._incoming)
        return self._message

    @property
    def exchange(self) -> str:
        return self._incoming.exchange or ""

    @property
    def routing_key(self) -> str:
        return self._incoming.routing_key or ""

    @property
    def redelivered(self) -> bool:
        return bool(self._incoming.redelivered)

    @property
    def delivery_count(self) -> int:
        return delivery_count(self._incoming)

    @property
    def stale(self) -> bool:
        """True once the channel this came on is closed (its tag can no longer be settled)."""
        return self._channel.is_closed

    async def ack(self) -> None:
        await self._settle(Settlement.ACKED)

    async def reject(self) -> None:
        await self._settle(Settlement.REJECTED)

    async def requeue(self) -> None:
        await self._settle(Settlement.REQUEUED)

    async def _settle(self, outcome: Settlement) -> None:
        if self.settlement is not Settlement.PENDING:
            raise TransportError(
                f"delivery {self._incoming.delivery_tag} from queue {self._queue!r} "
                f"is already settled ({self.settlement.value})"
            )
        tag = self._incoming.delivery_tag
        if tag is None or self.stale:
            self._mark_stale(outcome)
            return
        try:
            with translated(f"{_VERB[outcome]} delivery", queue=self._queue):
                # wait=False: queue the frame without waiting for the socket to drain
                # (AMQP has no ack-ok; a frame lost with the connection means a redelivery)
                if outcome is Settlement.ACKED:
                    await self._channel.basic_ack(tag, wait=False)
                elif outcome is Settlement.REJECTED:
                    await self._channel.basic_reject(tag, requeue=False, wait=False)
                else:
                    await self._consumer.requeue_at_head(self._channel, tag)
        except TransportError:
            # The frame may never have left; if the channel is gone the broker will
            # redeliver, which is the documented outcome of a stale delivery.
            if not self._channel.is_closed:
                raise
            self._mark_stale(outcome)
            return
        self.settlement = outcome

    def _mark_stale(self, wanted: Settlement) -> None:
        self.settlement = Settlement.STALE
        log.debug(
            "%s of delivery %s from queue %r skipped: its channel closed, the broker redelivers it",
            wanted.value,
            self._incoming.delivery_tag,
            self._queue,
        )


class ConsumerState(enum.Enum):
    ACTIVE = "active"
    STOPPED = "stopped"  # no new deliveries; handlers may still run
    CLOSED = "closed"  # channel closed; unsettled deliveries went back to the queue


class AmqpConsumer:
    """A consumer on its own channel; the channel's ``basic.qos`` is its prefetch.

    * ``channel_limit`` (classic, not auto-delete queues): the prefetch is the channel's
      limit (``basic.qos(global=True)``, set before consuming). It counts every unsettled
      delivery of the channel and RabbitMQ applies a change at once, so ``set_prefetch``
      is one ``basic.qos`` and the limit is exact across changes. A requeue briefly
      cancels the consumer so that the requeued message stays first (``requeue_at_head``).
    * otherwise (quorum queues refuse a channel limit; an auto-delete queue would vanish
      in that brief cancel; queues of unknown type): the per-consumer limit
      (``global=False``). RabbitMQ applies a new one only to consumers started after it,
      so ``set_prefetch`` sets it, consumes again on the same channel and cancels the old
      tag; until the old tag's deliveries settle, up to old + new may be unsettled.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        handler: Handler,
        prefetch: int,
        timeout: float,
        *,
        channel_limit: bool,
    ) -> None:
        self._channel = channel
        self._channel_limit = channel_limit
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self._timeout = timeout
        self._tag: str | None = None
        self._state = ConsumerState.ACTIVE
        self._lock = asyncio.Lock()
        self._in_flight: set[asyncio.Task[object]] = set()
        self._ending: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queue(self) -> str:
        return self._queue.name

    @property
    def prefetch(self) -> int:
        return self._prefetch

    @property
    def state(self) -> ConsumerState:
        return self._state

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        return len(self._in_flight)

    async def start(self) -> None:
        self._channel.reopen_callbacks.add(self._watch_broker_cancel)
        with translated("consume", queue=self.queue, timeout=self._timeout):
            await self._watch_broker_cancel()
            await self._set_qos(self._prefetch)
            self._tag = await self._queue.consume(self._on_message, timeout=self._timeout)

    async def set_prefetch(self, prefetch: int) -> None:
        """Apply a new limit to this running consumer (see the class docstring)."""
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        async with self._lock:
            if self._state is not ConsumerState.ACTIVE:
                raise TransportError(f"consumer of queue {self.queue!r} is {self._state.value}")
            if prefetch == self._prefetch:
                return
            with translated("set prefetch", queue=self.queue, timeout=self._timeout):
                await self._set_qos(prefetch)
                if not self._channel_limit:
                    await self._consume_again()
                self._prefetch = prefetch

    async def requeue_at_head(self, channel: AbstractChannel, delivery_tag: int) -> None:
        """``basic.reject(requeue=True)`` such that the message is the next one delivered.

        Under a channel limit the queue handles the limiter's "resume" (sent when the
        reject frees a slot) before the requeue, and would deliver the next message
        first. Without a consumer there is nothing to resume: cancel, reject, consume.

        The three steps run on the delivery's own aiormq channel, not through aio-pika's
        queue: ``RobustQueue.cancel`` forgets the consumer before the broker answers, so
        a connection lost in between left the channel's restore nothing to consume again
        (tests/amqp/test_requeue_on_a_dying_connection.py). Here the robust registration
        stays, and a channel that dies mid-way comes back consuming.
        """
        async with self._lock:
            tag = self._tag
            if (
                not self._channel_limit
                or self._prefetch == 0
                or self._state is not ConsumerState.ACTIVE
                or tag is None
            ):
                await channel.basic_reject(delivery_tag, requeue=True)
                return
            await channel.basic_cancel(tag, timeout=self._timeout)
            try:
                await channel.basic_reject(delivery_tag, requeue=True)
            finally:
                # A restore may have consumed again on this channel meanwhile.
                consumers = cast("aiormq.Channel", channel).consumers  # aiormq's own class
                if not channel.is_closed and tag not in consumers:
                    await channel.basic_consume(
                        self.queue, self._on_delivered, consumer_tag=tag, timeout=self._timeout
                    )

    async def _on_delivered(self, message: DeliveredMessage) -> None:
        # What aio-pika's queue hands its consumers, for the re-consume above.
        await self._on_message(IncomingMessage(message, no_ack=False))

    async def _set_qos(self, prefetch: int) -> None:
        # aio-pika remembers this call and repeats it when it reopens the channel, before
        # it consumes again: a channel limit is active before the consumer exists.
        await self._channel.set_qos(
            prefetch_count=prefetch, global_=self._channel_limit, timeout=self._timeout
        )

    async def _consume_again(self) -> None:
        # New tag first, then cancel the old one: an auto-delete queue never sees zero
        # consumers. The old tag's deliveries stay on this channel and settle normally.
        new_tag = await self._queue.consume(self._on_message, timeout=self._timeout)
        old_tag, self._tag = self._tag, new_tag
        if old_tag is not None:
            await self._queue.cancel(old_tag, timeout=self._timeout)

    async def _watch_broker_cancel(self, _sender: object = None) -> None:
        # The broker cancels a consumer whose queue was deleted. aio-pika would try to
        # consume again every reconnect interval for ever; this consumer ends instead.
        # (Called again by aio-pika each time it reopens the channel.)
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        if frame.consumer_tag != self._tag or self._state is not ConsumerState.ACTIVE:
            return
        log.warning(
            "RabbitMQ cancelled the consumer of queue %r (queue deleted?); it stops", self.queue
        )
        self._state = ConsumerState.STOPPED
        self._tag = None
        self._ending = asyncio.get_running_loop().create_task(self._end_after_broker_cancel())

    async def _end_after_broker_cancel(self) -> None:
        await self.cancel_handlers()
        await self.close_channel()

    async def stop(self) -> None:
        """Stop new deliveries (``basic.cancel``); running handlers go on."""
        async with self._lock:
            if self._state is not ConsumerState.ACTIVE:
                return
            self._state = ConsumerState.STOPPED
            tag, self._tag = self._tag, None
            if tag is None or self._channel.is_closed:
                return
            try:
                with translated("cancel consumer", queue=self.queue, timeout=self._timeout):
                    await self._queue.cancel(tag, timeout=self._timeout)
            except TransportError as exc:
                # Closing the channel next ends the consumer anyway.
                log.debug("basic.cancel on queue %r failed: %s", self.queue, exc)

    async def wait_idle(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for running handlers; True when none is left."""
        if not self._in_flight:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    async def cancel_handlers(self) -> None:
        """Cancel handlers still running (not the caller's own) and wait for them."""
        tasks = [t for t in self._in_flight if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_closed(self) -> None:
        """Return once the consumer has ended (``cancel``, transport close, or the broker
        cancelled it because its queue was deleted)."""
        await self._closed.wait()

    async def close_channel(self) -> None:
        """Close the channel: the broker requeues every unsettled delivery."""
        self._state = ConsumerState.CLOSED
        self._closed.set()
        if self._channel.is_closed:
            return
        try:
            with translated("close consumer channel", queue=self.queue):
                await self._channel.close()
        except TransportError as exc:
            log.debug("closing the channel of queue %r: %s", self.queue, exc)

    async def cancel(self) -> None:
        """Stop receiving, cancel running handlers, close the channel: every unsettled
        delivery goes back to the queue (``redelivered=True``).

        A handler that calls ``cancel`` itself is not cancelled; its own delivery is
        stale afterwards, so settling it is a no-op (the broker redelivers it).
        """
        await self.stop()
        await self.cancel_handlers()
        await self.close_channel()

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
            self._idle.clear()
        delivery = AmqpDelivery(incoming, self)
        try:
            await self._handler(delivery)
        except Exception:
            log.exception("handler for queue %r failed", self.queue)
            if delivery.settlement is Settlement.PENDING:
                await self._reject_after_failure(delivery)
        finally:
            if task is not None:
                self._in_flight.discard(task)
                if not self._in_flight:
                    self._idle.set()

    async def _reject_after_failure(self, delivery: AmqpDelivery) -> None:
        # A handler that raised leaves the message to the dead-letter path (poison
        # messages must not loop); the error was logged above.
        try:
            await delivery.reject()
        except (TransportError, amqp_exc.AMQPError) as exc:
            log.warning("could not reject a failed delivery on %r: %s", self.queue, exc)
