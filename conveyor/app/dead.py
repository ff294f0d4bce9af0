"""A plan's dead letters: read them, send them back to their stage, or drop them.

Every input and stage queue of a plan dead-letters to ``conveyor.<H>.dead``
(``conveyor.topology_setup``). A message a worker refused (bad input, inference failure,
crash loop) is a copy the worker published with its cause in ``x-conveyor-death-*``
headers (``conveyor.deaths``: error code and text, stage, worker, failed request ids,
trace id, time, queue and exchange). What the broker dead-lettered itself (expired, dropped
by a full queue, a quorum queue's delivery limit, or a worker's plain reject when its
dead-letter publish failed) carries the broker's ``x-first-death-*`` headers: why
(``rejected``, ``expired``, ``maxlen``, ``delivery_limit``), from which queue, first
published to which exchange. ``replay`` publishes each back to that exchange with its
routing key (so to the stage whose queue it died in), without the death headers, and acks
it once the broker confirmed; ``purge`` acks them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from conveyor.deaths import Death, without_death_headers
from conveyor.envelope import HEADER_TRACE
from conveyor.errors import TransportError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.topology_setup import stage_queues
from conveyor.tracing import trace_of
from conveyor.transport import Consumer, Delivery, Message, Transport

#: Seconds to wait for the deliveries the queue's depth promised.
READ_WAIT = 3.0


@dataclass(frozen=True)
class DeadLetter:
    request_id: str | None
    reason: str
    queue: str
    stage: str | None
    exchange: str
    routing_key: str
    trace: str
    message: Message
    #: What the worker that dead-lettered it said (None: the broker dead-lettered it).
    death: Death | None = None


def describe(plan: Plan, delivery: Delivery) -> DeadLetter:
    h = delivery.message.headers
    death = Death.from_headers(h)
    stages = {q: s.name for s in plan.stages for q in stage_queues(plan, s)}
    topo = Topology.of(plan)
    stages.update({topo.suspect_queue(q): s for q, s in list(stages.items())})  # crash loops
    if death is not None:
        queue = death.queue or ""
        return DeadLetter(
            request_id=(death.request_ids[0] if death.request_ids else None)
            or delivery.message.message_id or delivery.message.correlation_id,
            reason="rejected",
            queue=queue,
            stage=death.stage or stages.get(queue),
            exchange=death.exchange,
            routing_key=delivery.routing_key,
            trace=death.trace or trace_of(_text(h.get(HEADER_TRACE)) or None),
            message=delivery.message,
            death=death,
        )
    queue = _text(h.get("x-first-death-queue"))
    trace = h.get(HEADER_TRACE)
    return DeadLetter(
        request_id=delivery.message.message_id or delivery.message.correlation_id,
        reason=_text(h.get("x-first-death-reason")) or "?",
        queue=queue,
        stage=stages.get(queue),
        exchange=_text(h.get("x-first-death-exchange")),
        routing_key=delivery.routing_key,
        trace=trace_of(_text(trace) or None),
        message=delivery.message,
    )


def render(letter: DeadLetter) -> list[str]:
    """The lines ``conveyor dead`` prints for one dead letter."""
    d = letter
    lines = [
        f"  request {d.request_id or '-'} trace {d.trace}: {d.reason} at stage "
        f"{d.stage or '-'} (queue {d.queue or '-'}; first sent to {d.exchange or '-'} "
        f"key {d.routing_key!r})"
    ]
    death = d.death
    if death is None:
        lines.append("    cause: not recorded (dead-lettered by the broker; see the workers' "
                     "logs by request id)")
        return lines
    lines.append(f"    {death.code}: {death.message}")
    when = (
        "-" if math.isnan(death.at)
        else datetime.fromtimestamp(death.at, UTC).isoformat(timespec="milliseconds")
    )
    others = [i for i in death.request_ids if i != d.request_id]
    more = f"; {death.failed} failed request(s)" if death.failed > 1 else ""
    named = f": also {', '.join(others)}" if others else ""
    lines.append(f"    by worker {death.worker or '-'} at {when}{more}{named}")
    return lines


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


async def show(transport: Transport, plan: Plan, limit: int) -> tuple[list[DeadLetter], int]:
    """The first ``limit`` dead letters (left in the queue) and how many there are."""
    queue = Topology.of(plan).dead_letter_queue
    depth = (await transport.queue_stats(queue)).depth
    deliveries, consumer = await _read(transport, queue, min(limit, depth))
    letters = [describe(plan, d) for d in deliveries]
    await consumer.cancel()  # unsettled: back to the queue, in order
    return letters, depth


async def replay(transport: Transport, plan: Plan) -> tuple[int, list[str]]:
    """Publish every dead letter back where it first went; (replayed, problems)."""
    return await _drain(transport, plan, resend=True)


async def purge(transport: Transport, plan: Plan) -> int:
    """Drop every dead letter; how many."""
    done, _ = await _drain(transport, plan, resend=False)
    return done


async def _drain(transport: Transport, plan: Plan, *, resend: bool) -> tuple[int, list[str]]:
    queue = Topology.of(plan).dead_letter_queue
    depth = (await transport.queue_stats(queue)).depth
    deliveries, consumer = await _read(transport, queue, depth)
    done, problems = 0, []
    try:
        for delivery in deliveries:
            letter = describe(plan, delivery)
            if resend:
                if not letter.exchange:
                    problems.append(f"{letter.request_id}: no exchange it came from; kept")
                    continue
                headers = without_death_headers(letter.message.headers)
                again = replace(letter.message, headers=headers)
                try:
                    await transport.publish(letter.exchange, again, letter.routing_key)
                except TransportError as exc:
                    problems.append(f"{letter.request_id}: {exc}; kept")
                    continue
            await delivery.ack()
            done += 1
    finally:
        await consumer.cancel()
    return done, problems


async def _read(
    transport: Transport, queue: str, wanted: int
) -> tuple[list[Delivery], Consumer]:
    got: list[Delivery] = []
    enough = asyncio.Event()
    if wanted <= 0:
        enough.set()

    async def handler(delivery: Delivery) -> None:
        got.append(delivery)
        if len(got) >= wanted:
            enough.set()

    consumer = await transport.consume(queue, handler, prefetch=max(1, wanted))
    until = time.monotonic() + READ_WAIT
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), max(0.0, until - time.monotonic()))
    return got, consumer


__all__ = ["DeadLetter", "describe", "purge", "render", "replay", "show"]
