"""``Callers.gone``: a reply queue missing for a moment (its client reconnecting) is not a
caller gone; one missing for the whole grace is; "present" is kept, "gone" never is.

A scripted transport answers the passive declares: each test says which asks find the
queue missing, and checks both the verdict and how many asks the broker got.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from conveyor.errors import ChannelBroken, NotFound, TransportError
from conveyor.transport import QueueStats
from workers.callers import Callers

GRACE = 0.3
QUEUE = "conveyor.p.reply.c1"


class ScriptedTransport:
    """``queue_stats`` raises what ``answer(ask_number, seconds_since_start)`` returns."""

    def __init__(self, answer: Callable[[int, float], Exception | None]) -> None:
        self.answer = answer
        self.asks = 0
        self.start = time.monotonic()

    async def queue_stats(self, queue: str) -> QueueStats:
        self.asks += 1
        await asyncio.sleep(0.01)  # a round trip: concurrent questions overlap it
        error = self.answer(self.asks, time.monotonic() - self.start)
        if error is not None:
            raise error
        return QueueStats(queue, 0, 0)


def callers(transport: ScriptedTransport) -> Callers:
    return Callers(transport, ttl_s=1.0, grace_s=GRACE, recheck_s=GRACE / 3)  # type: ignore[arg-type]


async def test_a_queue_back_within_the_grace_is_not_gone() -> None:
    """Missing at the first ask (the client's connection just dropped), present at the next
    one: the request runs as soon as the queue is back, without waiting out the grace."""
    transport = ScriptedTransport(lambda n, _: NotFound("no queue") if n == 1 else None)
    started = time.monotonic()
    assert await callers(transport).gone(QUEUE) is False
    assert GRACE / 3 <= time.monotonic() - started < GRACE
    assert transport.asks == 2


async def test_a_queue_missing_for_the_whole_grace_is_gone() -> None:
    transport = ScriptedTransport(lambda _n, _t: NotFound("no queue"))
    started = time.monotonic()
    assert await callers(transport).gone(QUEUE) is True
    assert time.monotonic() - started >= GRACE
    assert 3 <= transport.asks <= 5  # asked again every recheck_s within the grace


async def test_gone_is_never_kept_so_a_returning_client_is_seen_at_once() -> None:
    """Gone for longer than the grace, then its client reconnects and sends again: the
    first question after its return finds it (no wait, no stale "gone")."""
    back = {"now": False}
    transport = ScriptedTransport(lambda _n, _t: None if back["now"] else NotFound("gone"))
    c = callers(transport)
    assert await c.gone(QUEUE) is True
    assert await c.gone(QUEUE) is True  # still missing: gone at once, past the grace
    back["now"] = True
    started = time.monotonic()
    assert await c.gone(QUEUE) is False
    assert time.monotonic() - started < GRACE
    asks = transport.asks
    assert await c.gone(QUEUE) is False  # present is kept: no new ask
    assert transport.asks == asks


async def test_a_miss_after_a_present_answer_starts_a_new_grace() -> None:
    """Present, then missing (a second reconnect): the grace counts from the new miss."""
    transport = ScriptedTransport(lambda n, _: NotFound("no queue") if n in (1, 3) else None)
    c = Callers(transport, ttl_s=0.0, grace_s=GRACE, recheck_s=GRACE)  # type: ignore[arg-type]
    assert await c.gone(QUEUE) is False  # missing, then back within the grace
    started = time.monotonic()
    assert await c.gone(QUEUE) is False  # missing again: a fresh grace, then back
    assert time.monotonic() - started >= GRACE
    assert transport.asks == 4


async def test_concurrent_questions_share_one_ask() -> None:
    transport = ScriptedTransport(lambda _n, _t: NotFound("gone"))
    c = callers(transport)
    verdicts = await asyncio.gather(*(c.gone(QUEUE) for _ in range(50)))
    assert verdicts == [True] * 50
    assert 3 <= transport.asks <= 5  # one ask at a time for all fifty questions


@pytest.mark.parametrize(
    "error", [ChannelBroken("channel lost"), TransportError("RESOURCE_LOCKED")],
    ids=["no-answer", "locked"],
)
async def test_anything_but_not_found_runs_the_request(error: Exception) -> None:
    transport = ScriptedTransport(lambda _n, _t: error)
    started = time.monotonic()
    assert await callers(transport).gone(QUEUE) is False
    assert time.monotonic() - started < GRACE
