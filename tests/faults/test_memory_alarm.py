"""A broker memory alarm under a running client and workers: every wait ends on time.

RabbitMQ's memory alarm (``set_vm_memory_high_watermark`` to almost nothing) makes the
broker stop reading from every connection that publishes (``connection.blocked``): no
publish is confirmed until the alarm clears. Proved on the fault suite's own node:

* the client, with and without request packs: every ``infer(timeout=T)`` made during the
  alarm returns within T + 1 s with ``DeadlineExceeded`` (never confirmed) whose message
  says that the broker is blocking publishes and what to do; once the alarm is cleared the
  same client is answered again; nothing confirmed is lost;
* a worker whose output publish or reply is blocked: the requests it holds are settled
  (dropped as expired, not run again) when their deadline passes, not after the 30 s
  confirm timeout;
  nothing is dead-lettered and the queues are empty once the alarm has cleared.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conveyor.app.connect import connect
from conveyor.errors import DeadlineExceeded
from conveyor.plan import Plan
from conveyor.topology_setup import stage_queues
from tests.faults.checker import Checker
from tests.faults.node import RabbitNode
from tests.faults.rig import Workers, plan_queues, queue_depths, wait_consumed
from tests.support.cases import Case
from tests.support.polling import until

#: Each request's timeout while the alarm is on (the bound under test is T + 1 s).
ALARM_TIMEOUT_S = 3.0
REQUESTS = 20


def raise_alarm(node: RabbitNode) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.000001")


def clear_alarm(node: RabbitNode) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.4")


def alarms(node: RabbitNode) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


async def wait_alarm(node: RabbitNode, on: bool) -> None:
    async def reached() -> bool:
        return ("memory" in await asyncio.to_thread(alarms, node)) is on

    await until(reached, 30.0, f"the memory alarm to be {'on' if on else 'off'}", every=0.2)


def unsettled(node: RabbitNode, plan: Plan) -> dict[str, tuple[int, int]]:
    """(ready, unacknowledged) messages of every queue of the plan that holds any."""
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                   "messages_unacknowledged")
    ours = set(plan_queues(plan))
    found: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ours and (int(parts[1]) or int(parts[2])):
            found[parts[0]] = (int(parts[1]), int(parts[2]))
    return found


async def queues_empty(node: RabbitNode, plan: Plan) -> bool:
    """Nothing left in the plan's queues, its dead-letter queue included."""
    return not any((await queue_depths(node.url, plan)).values())


async def timed(client: object, request: object, within: float) -> tuple[float, object]:
    began = time.monotonic()
    try:
        got: object = await client.infer(request, timeout=within)  # type: ignore[attr-defined]
    except Exception as exc:  # sorted by the test: typed or not
        got = exc
    return time.monotonic() - began, got


async def answered_again(client: object, case: Case, checker: Checker, first: int) -> None:
    """Requests after the alarm: all answered (the same client goes on)."""
    inputs = case.requests(REQUESTS, seed=first)
    for i, request in enumerate(inputs):
        checker.sent(first + i, request)
    results = await asyncio.gather(*(timed(client, r, 20.0) for r in inputs))
    for i, (_, got) in enumerate(results):
        if isinstance(got, BaseException):
            checker.failed(first + i, got)
        else:
            checker.answered(first + i, got)  # type: ignore[arg-type]


@pytest.mark.parametrize("pack", [True, False], ids=["packs", "alone"])
async def test_infer_returns_within_its_timeout_under_a_memory_alarm(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path, pack: bool
) -> None:
    workers = Workers(fault_plan, node.url, tmp_path)
    checker = Checker(fault_mlp.reference)
    try:
        async with connect(node.url, plan=fault_plan, timeout=20.0, pack=pack) as client:
            workers.start_all()
            await wait_consumed(node.url, fault_plan, workers)
            await answered_again(client, fault_mlp, checker, 0)
            raise_alarm(node)
            try:
                await wait_alarm(node, on=True)
                blocked = fault_mlp.requests(REQUESTS, seed=1000)
                # Staggered: some start while earlier ones already wait on the block.
                tasks = []
                for request in blocked:
                    tasks.append(asyncio.create_task(timed(client, request, ALARM_TIMEOUT_S)))
                    await asyncio.sleep(0.05)  # the offered load, not a synchronisation
                results = await asyncio.gather(*tasks)
            finally:
                clear_alarm(node)
            await wait_alarm(node, on=False)
            for took, got in results:
                assert isinstance(got, DeadlineExceeded), got
                assert got.confirmed is False, got
                assert "blocking publishes" in str(got) and "alarm" in str(got), got
                assert took <= ALARM_TIMEOUT_S + 1.0, f"infer returned after {took:.2f} s"
            print(f"pack={pack}: {len(results)} infer(timeout={ALARM_TIMEOUT_S:g}) under the "
                  f"alarm returned after {min(t for t, _ in results):.2f} to "
                  f"{max(t for t, _ in results):.2f} s")
            await answered_again(client, fault_mlp, checker, 2000)
            report = checker.report(wire_duplicates=client.stats().dropped_replies)
        await until(lambda: queues_empty(node, fault_plan), 30.0, "the plan's queues to empty")
    except BaseException:
        print(workers.logs())
        raise
    finally:
        await asyncio.to_thread(workers.stop_all)
    assert (report.lost, report.duplicated, report.wrong, report.untyped) == (0, 0, 0, 0), report
    assert report.correct == 2 * REQUESTS, report


@pytest.mark.parametrize("held", [0, 2], ids=["output-publish", "reply"])
async def test_a_workers_blocked_publishes_end_at_the_requests_deadline(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path, held: int
) -> None:
    """Requests the broker confirmed before the alarm reach a worker whose publish is then
    blocked (stage 0's output to stage 1, or the last stage's reply): it settles them at
    their deadline (dropped as expired, not requeued to run again), long before the
    transport's 30 s confirm timeout. The stages before ``held`` run before the alarm."""
    workers = Workers(fault_plan, node.url, tmp_path)
    stage = fault_plan.stages[held].name
    # Room for the worker processes to start under the alarm and run the requests.
    deadline_s = 12.0
    try:
        async with connect(node.url, plan=fault_plan, timeout=20.0,
                           on_no_consumer="off") as client:
            for before in fault_plan.stages[:held]:
                workers.start(before.name)
            inputs = fault_mlp.requests(REQUESTS, seed=3000)
            tasks = [asyncio.create_task(timed(client, r, deadline_s)) for r in inputs]
            sent_at = time.monotonic()
            await until(lambda: client.stats().sent == REQUESTS, 10.0, "requests confirmed")
            queue = stage_queues(fault_plan, fault_plan.stages[held])[0]

            def waiting_for_held() -> bool:
                return list(unsettled(node, fault_plan)) == [queue]

            await until(waiting_for_held, 10.0, lambda: f"requests in {queue}: "
                        f"{unsettled(node, fault_plan)}", every=0.2)
            raise_alarm(node)
            try:
                await wait_alarm(node, on=True)
                for after in fault_plan.stages[held:]:
                    workers.start(after.name)
                results = await asyncio.gather(*tasks)
                for took, got in results:
                    assert isinstance(got, DeadlineExceeded), got
                    assert took <= deadline_s + 1.0, f"infer returned after {took:.2f} s"
                # The worker took them (nothing ready) and settles them by their deadline.
                await until(lambda: not unsettled(node, fault_plan),
                            deadline_s + 3.0 - (time.monotonic() - sent_at),
                            lambda: f"the worker to settle: {unsettled(node, fault_plan)}",
                            every=0.2)
                print(f"{stage}: inputs settled {time.monotonic() - sent_at:.1f} s after "
                      "the send")
                # ... because that stage ran them and its publish ended there.
                assert "dropped as expired" in workers.logs_of(stage), workers.logs()
            finally:
                clear_alarm(node)
            await wait_alarm(node, on=False)
            checker = Checker(fault_mlp.reference)
            await answered_again(client, fault_mlp, checker, 0)
            report = checker.report()
        await until(lambda: queues_empty(node, fault_plan), 30.0, "the plan's queues to empty")
    except BaseException:
        print(workers.logs())
        raise
    finally:
        await asyncio.to_thread(workers.stop_all)
    assert report.correct == REQUESTS, report
