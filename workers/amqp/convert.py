"""Conversions between Conveyor's transport records and AMQP frames and arguments."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from conveyor.errors import ConfigError
from conveyor.transport import ExchangeSpec, ExchangeType, Message, QueueSpec

#: Header RabbitMQ quorum queues set on redeliveries: how many times it was returned.
DELIVERY_COUNT_HEADER = "x-delivery-count"


def exchange_arguments(spec: ExchangeSpec) -> dict[str, Any]:
    if spec.hash_header is not None:
        if spec.type is not ExchangeType.HASH:
            raise ConfigError(
                f"exchange {spec.name!r}: hash_header only applies to {ExchangeType.HASH.value}"
            )
        return {"hash-header": spec.hash_header}
    return {}


def queue_arguments(spec: QueueSpec) -> dict[str, Any]:
    """``x-*`` arguments for ``queue.declare``; the same spec always gives the same dict."""
    args: dict[str, Any] = {}
    if spec.quorum:
        if not spec.durable or spec.exclusive or spec.auto_delete:
            raise ConfigError(
                f"queue {spec.name!r}: a quorum queue must be durable, "
                "not exclusive and not auto-delete"
            )
        args["x-queue-type"] = "quorum"
    if spec.delivery_limit is not None:
        if not spec.quorum:
            raise ConfigError(
                f"queue {spec.name!r}: RabbitMQ enforces delivery_limit on quorum queues only"
            )
        args["x-delivery-limit"] = spec.delivery_limit
    if spec.max_length is not None:
        args["x-max-length"] = spec.max_length
    if spec.max_length_bytes is not None:
        args["x-max-length-bytes"] = spec.max_length_bytes
    if spec.max_length is not None or spec.max_length_bytes is not None:
        args["x-overflow"] = spec.overflow
    if spec.message_ttl_ms is not None:
        args["x-message-ttl"] = spec.message_ttl_ms
    if spec.dead_letter_exchange is not None:
        args["x-dead-letter-exchange"] = spec.dead_letter_exchange
    if spec.dead_letter_routing_key is not None:
        args["x-dead-letter-routing-key"] = spec.dead_letter_routing_key
    return args


def to_properties(message: Message, *, persistent: bool) -> Basic.Properties:
    return Basic.Properties(
        content_type=message.content_type,
        headers=dict(message.headers) if message.headers else None,
        delivery_mode=2 if persistent else 1,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
        message_id=message.message_id,
        timestamp=(
            datetime.fromtimestamp(message.timestamp, tz=UTC)
            if message.timestamp is not None
            else None
        ),
        message_type=message.type,
    )


def from_incoming(incoming: AbstractIncomingMessage) -> Message:
    """The ``Message`` of a delivery. Header values outside ``HeaderValue`` (RabbitMQ's
    ``x-death`` tables, timestamps) are passed on as pamqp decoded them."""
    expiration = incoming.expiration
    stamp = incoming.timestamp
    headers: dict[str, Any] = dict(incoming.headers) if incoming.headers else {}
    return Message(
        body=incoming.body,
        headers=headers,
        content_type=incoming.content_type or "",
        message_id=incoming.message_id,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        # aio-pika exposes the expiration in seconds
        expiration_ms=round(expiration * 1000) if isinstance(expiration, int | float) else None,
        timestamp=stamp.timestamp() if stamp is not None else None,
        type=incoming.type,
    )


def delivery_count(incoming: AbstractIncomingMessage) -> int:
    """1 for a first delivery; quorum queues count returns in ``x-delivery-count``,
    classic queues only say ``redelivered`` (counted as 2)."""
    returned = (incoming.headers or {}).get(DELIVERY_COUNT_HEADER)
    if isinstance(returned, int) and not isinstance(returned, bool):
        return returned + 1
    return 2 if incoming.redelivered else 1
