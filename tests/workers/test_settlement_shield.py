"""A lot's settle starts at once and cannot be lost to a cancel of whoever finished it."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.transport import Message
from workers.settlement import Lot, Outcome


class FakeDelivery:
    """Records settles; ``gate`` (if set) makes ack wait like a network round trip."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.settled: list[str] = []
        self.message = Message(body=b"")
        self.exchange = self.routing_key = ""
        self.redelivered = False
        self.delivery_count = 1

    async def ack(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.settled.append("ack")

    async def reject(self) -> None:
        self.settled.append("reject")

    async def requeue(self) -> None:
        self.settled.append("requeue")


async def test_a_settle_that_needs_no_wait_is_done_when_the_last_request_is() -> None:
    delivery = FakeDelivery()
    lot = Lot(delivery, 2)
    first, second = lot.request(), lot.request()
    await first.done(Outcome.OK)
    assert delivery.settled == []
    await second.done(Outcome.FAILED)
    assert delivery.settled == ["reject"]
    assert lot.outcome is Outcome.FAILED


async def test_cancelling_the_caller_does_not_lose_a_settle_that_waits() -> None:
    gate = asyncio.Event()
    delivery = FakeDelivery(gate)
    settled: list[Lot] = []
    finished = asyncio.Event()

    def on_settled(lot: Lot) -> None:
        settled.append(lot)
        finished.set()

    lot = Lot(delivery, 1, on_settled)
    caller = asyncio.create_task(lot.request().done(Outcome.OK))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert delivery.settled == []
    gate.set()
    await asyncio.wait_for(finished.wait(), 5.0)
    assert delivery.settled == ["ack"]
    assert settled == [lot]
