"""Dead letters that say why: a worker dead-letters a refused message itself.

A message a worker refuses for good (unreadable, tensors off the plan, a ``reply_to``
outside the plan's scheme, an inference error, a crash loop) is published by the worker to
the plan's dead-letter exchange as a copy carrying its cause in the ``x-conveyor-death-*``
headers (``conveyor.deaths``, docs/wire.md section 8), and the original is acked once the
broker confirmed the copy: publish-then-ack, as replies are. The caller shields the step
from cancellation (``workers.settlement.Lot``). When the publish fails (the broker refuses
it, the dead queue is gone, the channel died) the original is rejected instead, so the
broker dead-letters it with its own ``x-death`` headers: nothing is lost, only the cause
(the worker's log still has it, by request id).

The copy keeps the original's body, properties and ``x-conveyor-*`` request headers, so
``conveyor dead --replay`` can publish it back to its stage; it drops the broker's headers
of an earlier death (``x-death``, ``x-first-death-*``, ...) and any expiration. What the
broker dead-letters itself (TTL, max length, a quorum queue's delivery limit) carries the
broker's headers alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from conveyor.deaths import HEADER_PREFIX, Death
from conveyor.errors import TransportError
from conveyor.topology import Topology
from conveyor.tracing import trace_of
from conveyor.transport import Delivery, HeaderValue, Message, Transport
from workers.settlement import Cause

log = logging.getLogger(__name__)

#: Headers the broker set on an earlier death (prefixes); a copy must not carry them over.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
#: The cause of a dead letter whose lot recorded none (a guard of last resort).
_UNKNOWN = Cause("conveyor_error", "refused by the worker (no cause recorded; see its log)")


def death_of(
    causes: Sequence[Cause], *, stage: str, worker: str, queue: str | None, exchange: str
) -> Death:
    """The ``Death`` of a delivery whose requests failed for ``causes``: the first one
    gives code, text, stage and trace (``stage``: where it was consumed, when the cause
    names none)."""
    first = causes[0] if causes else _UNKNOWN
    return Death(
        code=first.code,
        message=first.message,
        stage=first.stage or stage,
        worker=worker,
        exchange=exchange,
        at=time.time(),
        request_ids=tuple(c.request_id for c in causes if c.request_id is not None),
        failed=len(causes),
        trace=None if first.trace_id is None else trace_of(first.trace_id),
        queue=queue,
    )


def dead_copy(message: Message, death: Mapping[str, HeaderValue]) -> Message:
    """``message`` as its dead letter: ``death``'s headers added, the broker's headers of
    an earlier death and any expiration dropped."""
    headers = {
        k: v for k, v in message.headers.items()
        if not k.startswith(_BROKER_HEADERS) and not k.startswith(HEADER_PREFIX)
    }
    headers.update(death)
    return replace(message, headers=headers, expiration_ms=None)


class DeadLetters:
    """Dead-letters a worker's refused deliveries with their cause (see the module doc)."""

    def __init__(self, transport: Transport, topology: Topology, worker_id: str) -> None:
        self.transport = transport
        self.exchange = topology.dead_letter_exchange
        self.worker_id = worker_id
        #: Copies published (each then acked), and deliveries rejected instead.
        self.published = 0
        self.fallbacks = 0

    async def send(
        self,
        delivery: Delivery,
        causes: Sequence[Cause],
        *,
        stage: str,
        queue: str | None = None,
    ) -> None:
        """Publish ``delivery``'s dead letter naming ``causes``, then ack it; reject it
        when the publish fails. ``TransportError`` only from the ack or the reject."""
        death = death_of(
            causes, stage=stage, worker=self.worker_id, queue=queue, exchange=delivery.exchange
        )
        copy = dead_copy(delivery.message, death.to_headers())
        try:
            await self.transport.publish(self.exchange, copy, delivery.routing_key)
        except TransportError as exc:
            self.fallbacks += 1
            log.warning(
                "stage %s: could not publish the dead letter of message %s to %s (%s); "
                "rejected it instead (the broker dead-letters it, without its cause)",
                stage, delivery.message.message_id, self.exchange, exc,
            )
            await delivery.reject()
            return
        self.published += 1
        await delivery.ack()
