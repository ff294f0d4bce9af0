"""Why a message is dead: the ``x-conveyor-death-*`` headers of a worker's dead letter.

A worker that refuses a message for good publishes a copy of it to the plan's dead-letter
exchange with these headers (docs/wire.md section 8), then acks the original
(``workers.dead_letters``). ``Death`` is the record; ``to_headers`` / ``from_headers``
write and read it (``from_headers`` is None for a message the broker dead-lettered
itself, which carries RabbitMQ's ``x-first-death-*`` headers instead).

=================================  ============================================================
header                             value
=================================  ============================================================
``x-conveyor-death-code``          the error code (``ConveyorError.code``, docs/wire.md section 3)
``x-conveyor-death-message``       the error's text (at most 2048 characters, then "(truncated)")
``x-conveyor-death-stage``         the stage that refused it
``x-conveyor-death-worker``        the worker id
``x-conveyor-death-requests``      JSON array of the failed request ids (the first 32)
``x-conveyor-death-failed``        int: how many of its requests failed
``x-conveyor-death-trace``         trace id of the first failed request (32 hex for a
                                   ``traceparent``), absent when it had none
``x-conveyor-death-at``            unix time in seconds it was dead-lettered (decimal string)
``x-conveyor-death-queue``         the queue it was consumed from (absent when unknown)
``x-conveyor-death-exchange``      the exchange it had been published to (replay goes there,
                                   with the dead letter's routing key, which is the original's)
=================================  ============================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from conveyor.transport import HeaderValue

HEADER_PREFIX = "x-conveyor-death-"
HEADER_CODE = "x-conveyor-death-code"
HEADER_MESSAGE = "x-conveyor-death-message"
HEADER_STAGE = "x-conveyor-death-stage"
HEADER_WORKER = "x-conveyor-death-worker"
HEADER_REQUESTS = "x-conveyor-death-requests"
HEADER_FAILED = "x-conveyor-death-failed"
HEADER_TRACE = "x-conveyor-death-trace"
HEADER_AT = "x-conveyor-death-at"
HEADER_QUEUE = "x-conveyor-death-queue"
HEADER_EXCHANGE = "x-conveyor-death-exchange"

#: Request ids named in ``HEADER_REQUESTS`` (the rest are only counted in ``HEADER_FAILED``).
MAX_REQUEST_IDS = 32
#: Characters of the error's text in ``HEADER_MESSAGE``.
MAX_MESSAGE_TEXT = 2048


@dataclass(frozen=True)
class Death:
    """What a worker's dead letter says about why it died."""

    code: str
    message: str
    stage: str
    worker: str
    exchange: str
    at: float
    request_ids: tuple[str, ...] = ()
    failed: int = 0
    trace: str | None = None
    queue: str | None = None

    def to_headers(self) -> dict[str, HeaderValue]:
        text = self.message
        if len(text) > MAX_MESSAGE_TEXT:
            text = text[:MAX_MESSAGE_TEXT] + " ... (truncated)"
        headers: dict[str, HeaderValue] = {
            HEADER_CODE: self.code,
            HEADER_MESSAGE: text,
            HEADER_STAGE: self.stage,
            HEADER_WORKER: self.worker,
            # JSON: an array any AMQP client can read (request ids may hold commas).
            HEADER_REQUESTS: json.dumps(list(self.request_ids[:MAX_REQUEST_IDS])),
            HEADER_FAILED: self.failed,
            # A string, as the deadline: pamqp would send a float as 32 bits.
            HEADER_AT: repr(self.at),
            HEADER_EXCHANGE: self.exchange,
        }
        if self.trace is not None:
            headers[HEADER_TRACE] = self.trace
        if self.queue is not None:
            headers[HEADER_QUEUE] = self.queue
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, object]) -> Death | None:
        """The death a worker recorded in ``headers``; None when it recorded none.
        Lenient: a dead letter is read to be shown, and a malformed field reads as empty."""
        code = _text(headers.get(HEADER_CODE))
        if not code:
            return None
        return cls(
            code=code,
            message=_text(headers.get(HEADER_MESSAGE)),
            stage=_text(headers.get(HEADER_STAGE)),
            worker=_text(headers.get(HEADER_WORKER)),
            exchange=_text(headers.get(HEADER_EXCHANGE)),
            at=_number(headers.get(HEADER_AT)),
            request_ids=_ids(headers.get(HEADER_REQUESTS)),
            failed=_count(headers.get(HEADER_FAILED)),
            trace=_text(headers.get(HEADER_TRACE)) or None,
            queue=_text(headers.get(HEADER_QUEUE)) or None,
        )


def without_death_headers(headers: Mapping[str, HeaderValue]) -> dict[str, HeaderValue]:
    """``headers`` less the ``x-conveyor-death-*`` ones (a replayed message is not dead)."""
    return {k: v for k, v in headers.items() if not k.startswith(HEADER_PREFIX)}


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _number(value: object) -> float:
    """A number (a decimal string, an int or an AMQP decimal); NaN for anything else."""
    if isinstance(value, bytes | bytearray):
        value = _text(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        return math.nan
    try:
        return float(value)
    except ValueError:
        return math.nan


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _ids(value: object) -> tuple[str, ...]:
    try:
        ids = json.loads(_text(value))
    except ValueError:
        return ()
    if not isinstance(ids, list):
        return ()
    return tuple(i for i in ids if isinstance(i, str))
