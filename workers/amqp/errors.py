"""The one place where aio-pika / aiormq / pamqp errors become Conveyor errors.

``with translated("declare queue", queue=name, timeout=t): await ...`` turns what the
AMQP stack raises into the exception tree of ``conveyor.errors`` (``raise ... from exc``):

* broker ``NOT_FOUND``            -> ``NotFound`` naming the queue or exchange
* ``PRECONDITION_FAILED``, ``ACCESS_REFUSED``, ``RESOURCE_LOCKED``
                                   -> ``TransportError`` with the broker's reason
* a returned mandatory publish     -> ``UnroutableError``
* a nacked publish                 -> ``BackpressureError`` (a full reject-publish queue)
* closed channel or connection     -> ``ChannelBroken``
* a timeout                        -> ``TransportError`` naming the operation and limit
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aiormq.exceptions as amqp_exc

from conveyor.errors import (
    BackpressureError,
    ChannelBroken,
    ConveyorError,
    NotFound,
    TransportError,
    UnroutableError,
)


def broker_reason(exc: BaseException) -> str:
    """The broker's text (``NOT_FOUND - no queue 'x' in vhost '/'``) when it sent one."""
    for arg in reversed(exc.args):
        if isinstance(arg, str) and arg:
            return arg
    return str(exc) or type(exc).__name__


def _subject(queue: str | None, exchange: str | None) -> str:
    parts = []
    if queue is not None:
        parts.append(f"queue {queue!r}")
    if exchange is not None:
        parts.append(f"exchange {exchange!r}")
    return " ".join(parts)


def translate(
    exc: BaseException,
    operation: str,
    *,
    queue: str | None = None,
    exchange: str | None = None,
    routing_key: str = "",
    timeout: float | None = None,
) -> ConveyorError | None:
    """The Conveyor error for ``exc``, or None when it is not an AMQP-stack error."""
    subject = _subject(queue, exchange)
    where = f"{operation} {subject}".strip()
    if isinstance(exc, amqp_exc.PublishError):
        return UnroutableError(exchange or "", routing_key)
    if isinstance(exc, amqp_exc.DeliveryError):
        target = f"exchange {exchange or ''!r} routing key {routing_key!r}"
        return BackpressureError(
            f"broker refused (nack) the message to {target}: a queue it routes to is full "
            "(x-overflow=reject-publish) or the broker is out of resources",
            queue=queue if queue is not None else (routing_key if not exchange else None),
        )
    if isinstance(exc, amqp_exc.ChannelNotFoundEntity):
        return NotFound(f"{where}: not found on the broker ({broker_reason(exc)})")
    if isinstance(
        exc,
        amqp_exc.ChannelPreconditionFailed
        | amqp_exc.ChannelAccessRefused
        | amqp_exc.ChannelLockedResource,
    ):
        return TransportError(f"{where}: broker refused: {broker_reason(exc)}")
    if isinstance(exc, TimeoutError):
        limit = f" after {timeout:g} s" if timeout is not None else ""
        return TransportError(f"{where}: no answer from the broker{limit}")
    if isinstance(
        exc,
        amqp_exc.ChannelInvalidStateError
        | amqp_exc.ChannelClosed
        | amqp_exc.AMQPConnectionError
        | ConnectionError,
    ):
        return ChannelBroken(f"{where}: channel or connection closed ({broker_reason(exc)})")
    if isinstance(exc, amqp_exc.AMQPError):
        return TransportError(f"{where}: {type(exc).__name__}: {broker_reason(exc)}")
    return None


@contextmanager
def translated(
    operation: str,
    *,
    queue: str | None = None,
    exchange: str | None = None,
    routing_key: str = "",
    timeout: float | None = None,
) -> Iterator[None]:
    """Re-raise AMQP-stack errors raised inside the block as Conveyor errors."""
    try:
        yield
    except ConveyorError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        mapped = translate(
            exc,
            operation,
            queue=queue,
            exchange=exchange,
            routing_key=routing_key,
            timeout=timeout,
        )
        if mapped is None:
            raise
        raise mapped from exc
