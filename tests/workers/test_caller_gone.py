"""Requests whose caller is gone (its reply queue deleted) are not run; the others are.

A client queues requests while no worker runs and leaves (its exclusive reply queue goes
with it); a second client's requests queue behind them. When the worker starts, none of
the first client's requests is computed: each is acked and dropped (outcome
``caller_gone``, not dead-lettered) once its reply queue has stayed missing for the
grace, and every request of the live client is answered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from conveyor.client import Client
from conveyor.errors import TransportClosed
from conveyor.plan import Plan
from conveyor.topology import Topology
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from workers import serve
from workers.callers import GRACE_S
from workers.stage_worker import StageWorker

RNG = np.random.default_rng(21)
LEFT = 20
LIVE = 10


def rand() -> np.ndarray:
    return RNG.random((1, 4), dtype=np.float32)


def outcome(worker: StageWorker, stage: str, name: str) -> float:
    value = worker.metrics.registry.get_sample_value(
        "conveyor_requests_total", {"worker": worker.worker_id, "stage": stage, "outcome": name}
    )
    return value or 0.0


async def queued(client: Client, n: int) -> list[asyncio.Task[dict[str, np.ndarray]]]:
    """``n`` requests sent by ``client`` and confirmed by the broker (awaited in tasks)."""
    xs = [rand() for _ in range(n)]
    tasks = [asyncio.create_task(client.infer({"x": x})) for x in xs]
    await until(lambda: client.stats().sent == n, 10.0, "the requests to be confirmed")
    return tasks


@pytest.mark.parametrize("pack", [True, False], ids=["packs", "alone"])
async def test_requests_of_a_caller_that_left_are_not_run(
    broker: BrokerHandle, tmp_path: Path, unique: str, pack: bool
) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=2, name=unique).directory)
    left_transport = await broker.connect()
    left = await Client(plan, left_transport, pack=pack, on_no_consumer="off").open()
    orphans = await queued(left, LEFT)
    await left.close()
    await left_transport.close()  # the caller's process is gone, and its reply queue
    for result in await asyncio.gather(*orphans, return_exceptions=True):
        assert isinstance(result, TransportClosed), result

    live = await Client(plan, await broker.connect(), pack=pack, on_no_consumer="off").open()
    xs = [rand() for _ in range(LIVE)]
    answers = [asyncio.create_task(live.infer({"x": x})) for x in xs]
    worker = await serve(plan, await broker.connect(), None, "cpu")
    try:
        for x, got in zip(xs, await asyncio.gather(*answers), strict=True):
            np.testing.assert_allclose(got["y"], chain_expected(x, k=2), rtol=1e-5)
        ran = {s.stage: s.requests for s in worker.stats().stages if s.stage in plan.stage_names}
        assert ran == {s.name: LIVE for s in plan.stages}, ran
        # Dropped once their reply queue has been missing for the grace (workers.callers).
        await until(lambda: outcome(worker, plan.stages[0].name, "caller_gone") == LEFT,
                    3 * GRACE_S, f"the {LEFT} requests of the caller that left to be dropped")
    finally:
        await worker.stop(grace=2.0)
    try:
        # Stopped: whatever it had not settled would be back in its queue now.
        topology = Topology.of(plan)
        queues = [topology.input_queue(0), topology.stage_queue(plan.stages[1].name),
                  topology.dead_letter_queue]
        transport = live.transport
        assert transport is not None
        depths = {q: (await transport.queue_stats(q)).depth for q in queues}
        assert not any(depths.values()), depths
    finally:
        await live.close()
