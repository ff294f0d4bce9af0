"""A stage worker SIGKILLed every 2 s and restarted: nothing lost, duplicated or wrong.

The middle stage of a three-stage plan runs two worker processes; every 2 s the older one
is killed with SIGKILL (no shutdown: its unacknowledged deliveries return to the queue)
and a new one started, while a client streams requests. The checker then reads every
outcome by request id against the whole model, and every queue of the plan is empty.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.app.connect import connect
from conveyor.plan import Plan
from tests.faults.checker import Checker, Report
from tests.faults.node import RabbitNode
from tests.faults.rig import Workers, queue_depths, wait_consumed
from tests.support.cases import Case, Request

KILL_EVERY_S = 2.0
#: Requests are sent at this rate, so that the run spans several kills (2,000: 10 s).
RATE_PER_S = 200.0


async def paced(items: list[Request]) -> AsyncIterator[Request]:
    for item in items:
        yield item
        await asyncio.sleep(1 / RATE_PER_S)  # the offered load, not a synchronisation


async def run_with_kills(node: RabbitNode, case: Case, plan: Plan, log_dir: Path,
                         requests: int) -> tuple[Report, int]:
    workers = Workers(plan, node.url, log_dir)
    victim = plan.stages[1].name
    checker = Checker(case.reference)
    inputs = case.requests(requests, seed=7)
    kills = 0
    try:
        async with connect(node.url, plan=plan, timeout=120.0) as client:
            workers.start_all()
            workers.start(victim)
            await wait_consumed(node.url, plan, workers)

            async def killer() -> None:
                nonlocal kills
                while True:
                    await asyncio.sleep(KILL_EVERY_S)  # the fault's period, not a sync
                    live = workers.live(victim)
                    if live:
                        live[0].kill()
                        await asyncio.to_thread(live[0].wait)
                        kills += 1
                    workers.start(victim)

            task = asyncio.create_task(killer())
            try:
                for rid, item in enumerate(inputs):
                    checker.sent(rid, item)
                rid = 0
                async for out in client.infer_many(paced(inputs), concurrency=64,
                                                   return_exceptions=True):
                    if isinstance(out, dict):
                        checker.answered(rid, out)
                    else:
                        checker.failed(rid, out)
                    rid += 1
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            report = checker.report(wire_duplicates=client.stats().dropped_replies)
        depths = await queue_depths(node.url, plan)
        assert not any(depths.values()), f"messages left behind: {depths}"
    except BaseException:
        print(workers.logs())
        raise
    finally:
        await asyncio.to_thread(workers.stop_all)
    return report, kills


async def test_sigkill_of_a_stage_worker_every_2s(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path
) -> None:
    began = time.monotonic()
    report, kills = await run_with_kills(node, fault_mlp, fault_plan, tmp_path, 2000)
    print(f"worker kills: {kills} in {time.monotonic() - began:.1f} s")
    assert kills >= 2, "the run ended before the faults began; send more requests"
    assert (report.lost, report.duplicated, report.wrong, report.untyped) == (0, 0, 0, 0), report
    assert report.correct == 2000, report


@pytest.mark.slow
async def test_sigkill_soak_30000_requests(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path
) -> None:
    report, kills = await run_with_kills(node, fault_mlp, fault_plan, tmp_path, 30000)
    print(f"worker kills: {kills}")
    assert report.correct == 30000, report
