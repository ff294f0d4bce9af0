"""The ``Transport`` protocol: the broker operations everything above it uses.

Two implementations keep AMQP 0-9-1 semantics: ``workers.amqp.AmqpTransport`` (RabbitMQ
through aio-pika) and ``brokerless.BrokerlessTransport`` (in-process). One conformance
suite (``tests/transport/``) runs against both.

Semantics every implementation honours:

* ``publish`` returns once the broker has confirmed the message. A message that reaches
  no queue raises ``UnroutableError``; one refused by a full queue (``overflow=
  "reject-publish"``) raises ``BackpressureError``. A message never vanishes silently.
  ``timeout`` bounds the wait for the confirm (``TransportError`` when it passes; the
  transport's own limit when None, or when it is the shorter): a worker passes the time
  left to the requests it publishes for, so a broker that blocks publishers (RabbitMQ's
  memory and disk alarms, ``Throttled``) holds them no longer than their deadline.
* ``consume`` delivers at most ``prefetch`` unacknowledged messages to that consumer.
  ``Consumer.set_prefetch`` changes the limit of a running consumer.
* A delivery is settled exactly once: ``ack``, ``reject`` (dead-lettered when the queue
  has a dead-letter exchange, dropped otherwise) or ``requeue``. Unsettled deliveries of
  a consumer that is cancelled or whose channel dies are redelivered with
  ``redelivered=True``.
* ``close(grace)`` stops consuming, waits up to ``grace`` seconds for handlers in
  flight, then closes; nothing accepted is lost (unsettled messages are redelivered).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

HeaderValue = str | int | float | bool | bytes | None


class ExchangeType(StrEnum):
    DIRECT = "direct"
    FANOUT = "fanout"
    TOPIC = "topic"
    #: RabbitMQ's consistent-hash exchange: binding key is a weight ("1"), the routing
    #: key (or ``hash_header``) is hashed onto the ring.
    HASH = "x-consistent-hash"
    #: RabbitMQ's random exchange: one bound queue chosen at random per message.
    RANDOM = "x-random"


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType = ExchangeType.DIRECT
    durable: bool = False
    #: HASH only: hash this header instead of the routing key.
    hash_header: str | None = None


@dataclass(frozen=True)
class QueueSpec:
    name: str
    durable: bool = False
    #: Deleted when its last consumer goes (reply queues).
    auto_delete: bool = False
    exclusive: bool = False
    max_length: int | None = None
    max_length_bytes: int | None = None
    overflow: Literal["reject-publish", "drop-head"] = "reject-publish"
    message_ttl_ms: int | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    #: RabbitMQ quorum queue (durable, replicated); brokerless treats it as a normal queue
    #: but honours ``delivery_limit`` the same way.
    quorum: bool = False
    #: Dead-letter a message returned (requeued or its consumer lost) after more than this
    #: many deliveries: 2 means three deliveries, as RabbitMQ 3.10 quorum queues do
    #: (quorum only on RabbitMQ).
    delivery_limit: int | None = None


@dataclass(frozen=True)
class Message:
    body: bytes
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    content_type: str = "application/msgpack"
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    #: Per-message TTL in milliseconds (AMQP ``expiration``).
    expiration_ms: int | None = None
    timestamp: float | None = None
    type: str | None = None


class Delivery(Protocol):
    """One message handed to a consumer; settle it exactly once."""

    @property
    def message(self) -> Message: ...
    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def delivery_count(self) -> int:
        """1 on first delivery; more after redeliveries (best effort on classic queues)."""
        ...

    async def ack(self) -> None: ...
    async def reject(self) -> None:
        """Negative-acknowledge without requeue: dead-lettered if the queue has a DLX."""
        ...

    async def requeue(self) -> None: ...


Handler = Callable[[Delivery], Awaitable[None]]


class Consumer(Protocol):
    @property
    def queue(self) -> str: ...
    @property
    def prefetch(self) -> int: ...
    async def set_prefetch(self, prefetch: int) -> None: ...
    async def cancel(self) -> None:
        """Stop receiving; unsettled deliveries go back to the queue as redelivered."""
        ...


@dataclass(frozen=True)
class QueueStats:
    name: str
    #: Messages ready for delivery (not counting unacknowledged ones).
    depth: int
    consumers: int


@runtime_checkable
class Transport(Protocol):
    async def declare_exchange(self, spec: ExchangeSpec) -> None: ...
    async def declare_queue(self, spec: QueueSpec) -> None: ...
    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None: ...
    async def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None: ...
    async def delete_queue(self, name: str) -> None: ...
    async def delete_exchange(self, name: str) -> None: ...
    async def publish(
        self,
        exchange: str,
        message: Message,
        routing_key: str = "",
        *,
        mandatory: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (bounds the broker's confirm)
    ) -> None: ...
    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Consumer: ...
    async def queue_stats(self, queue: str) -> QueueStats: ...
    async def close(self, grace: float = 5.0) -> None: ...


@runtime_checkable
class Reconnecting(Protocol):
    """A transport that repairs lost connections itself (RabbitMQ's; the embedded broker
    never loses one). What it restores: its channels, and the consumers with the queues
    declared through it. What it cannot: deliveries in flight and messages that were in a
    queue the broker lost; whoever owns them (the client's requests, a worker's plan
    topology) acts in ``callback``, run after each restore."""

    def add_reconnect_callback(self, callback: Callable[[], Awaitable[None]]) -> None: ...


@runtime_checkable
class Throttled(Protocol):
    """A transport whose broker may block publishers (RabbitMQ: ``connection.blocked``,
    sent under a memory or disk alarm); the embedded broker refuses at once instead
    (``BackpressureError``). ``publish_blocked``: its publishing connection is blocked
    now, so no publish will be confirmed until the broker lifts the block."""

    @property
    def publish_blocked(self) -> bool: ...
