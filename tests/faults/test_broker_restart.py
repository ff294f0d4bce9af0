"""The broker restarts under a running client and workers: the same client goes on.

``stop_app`` for 5 s then ``start_app``, ``kill -9`` of the broker then a new boot, and
the broker closing every connection (a network loss), each in the middle of a paced
stream of requests. Proved: requests the broker had confirmed before or during the
outage are answered (or fail with a typed error) within their deadline and none is lost;
requests sent after the broker's return are answered within 10 s of it; nothing answered
is wrong or reaches the caller twice; the queues are empty at the end (durable topology
and persistent messages by default, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.app.connect import connect
from conveyor.plan import Plan
from tests.faults.checker import Checker, Report
from tests.faults.node import RabbitNode
from tests.faults.rig import Workers, queue_depths, wait_consumed
from tests.support.cases import Case

RATE_PER_S = 50.0
#: Each request's deadline: the outage (5 s, or a boot of about 6 s) plus reconnects fit.
DEADLINE_S = 30.0
RECOVERY_LIMIT_S = 10.0


@dataclass
class Run:
    report: Report
    #: Seconds from the broker answering again to the first answer to a request sent
    #: after that.
    recovery_s: float
    outage_s: float
    resent: int
    #: Every request sent once the first answer after the return had come was answered.
    all_answered_after: bool = True
    #: The workers' logs and the broker's view at the end, printed when a check fails.
    diagnostics: str = ""


async def run_through(node: RabbitNode, case: Case, plan: Plan, log_dir: Path,
                      fault: Callable[[RabbitNode], None], *, before_s: float = 3.0,
                      after_s: float = 12.0, durable: bool = True,
                      deadline_s: float = DEADLINE_S) -> Run:
    workers = Workers(plan, node.url, log_dir, *([] if durable else ["--no-durable"]))
    checker = Checker(case.reference)
    answered_at: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    try:
        async with connect(node.url, plan=plan, timeout=deadline_s, durable=durable) as client:
            workers.start_all()
            await wait_consumed(node.url, plan, workers)
            tasks: list[asyncio.Task[None]] = []

            async def one(rid: int) -> None:
                request = case.requests(1, seed=rid)[0]
                checker.sent(rid, request)
                sent_at[rid] = time.monotonic()
                try:
                    got = await client.infer(request)
                except Exception as exc:  # the checker sorts typed from untyped
                    checker.failed(rid, exc)
                    return
                answered_at[rid] = time.monotonic()
                checker.answered(rid, got)

            async def stream(until: asyncio.Event) -> None:
                rid = 0
                while not until.is_set():
                    tasks.append(asyncio.create_task(one(rid)))
                    rid += 1
                    await asyncio.sleep(1 / RATE_PER_S)  # the offered load

            done = asyncio.Event()
            sender = asyncio.create_task(stream(done))
            await asyncio.sleep(before_s)  # requests in flight when the fault comes
            down_at = time.monotonic()
            await asyncio.to_thread(fault, node)
            back_at = time.monotonic()
            await asyncio.sleep(after_s)
            done.set()
            await sender
            await asyncio.gather(*tasks)
            report = checker.report(wire_duplicates=client.stats().dropped_replies)
            resent = client.stats().resent
        after = [answered_at[r] for r, t in sent_at.items() if t >= back_at and r in answered_at]
        recovery = (min(after) - back_at) if after else float("inf")
        depths = await queue_depths(node.url, plan)
        assert not any(depths.values()), f"messages left behind: {depths}"
        diagnostics = ""
        if report.lost or report.duplicated or report.wrong or report.untyped:
            lost = ", ".join(f"{sent_at[r] - down_at:+.2f}" for r in checker.lost())
            diagnostics = (f"{workers.logs()}\n{broker_view(node)}\nlost requests sent at "
                           f"(s after the fault began; it took {back_at - down_at:.2f} s): "
                           f"{lost}")
    except BaseException:
        print(workers.logs())
        print(broker_view(node))
        raise
    finally:
        await asyncio.to_thread(workers.stop_all)
    late = [r for r, t in sent_at.items() if t >= back_at + recovery]
    run = Run(report, recovery, back_at - down_at, resent,
              all(r in answered_at for r in late), diagnostics)
    print(f"outage {run.outage_s:.1f} s, recovery {run.recovery_s:.2f} s after the broker's "
          f"return, {run.resent} requests re-sent")
    return run


def broker_view(node: RabbitNode) -> str:
    """What the broker holds (queues, consumers, channels), printed when a run fails."""
    views = [
        ("list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"),
        ("list_consumers", "queue_name", "channel_pid", "prefetch_count", "active"),
        ("list_channels", "pid", "connection", "consumer_count", "messages_unacknowledged",
         "prefetch_count", "global_prefetch_count"),
    ]
    out = []
    for view in views:
        try:
            out.append(f"--- rabbitmqctl {view[0]}\n" + node.ctl(*view))
        except Exception as exc:  # diagnostics only: the failure itself is raised
            out.append(f"--- rabbitmqctl {view[0]}: {exc}")
    return "\n".join(out)


def stop_start_app(node: RabbitNode) -> None:
    node.stop_app()
    time.sleep(5.0)  # the outage itself
    node.start_app()


def kill_and_boot(node: RabbitNode) -> None:
    node.kill()
    node.start()


def drop_connections(node: RabbitNode) -> None:
    """Connection loss without a restart: the broker closes every client connection (the
    client's exclusive reply queue goes with its connection)."""
    node.ctl("close_all_connections", "fault test: connection loss")


def check(run: Run) -> None:
    try:
        _check(run)
    except AssertionError:
        print(run.diagnostics)
        raise


def _check(run: Run) -> None:
    report = run.report
    assert (report.lost, report.duplicated, report.wrong, report.untyped) == (0, 0, 0, 0), report
    assert run.recovery_s <= RECOVERY_LIMIT_S, f"answers again only after {run.recovery_s:.1f} s"
    # Requests sent while the broker was down may fail typed; the others are answered.
    assert report.correct >= report.requests - RATE_PER_S * (run.outage_s + 3), report


@pytest.mark.parametrize(
    "fault", [stop_start_app, kill_and_boot, drop_connections],
    ids=["stop_app", "kill-9", "connections-closed"],
)
async def test_client_and_workers_survive_a_broker_restart(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path,
    fault: Callable[[RabbitNode], None],
) -> None:
    check(await run_through(node, fault_mlp, fault_plan, tmp_path, fault))


@pytest.mark.slow
async def test_workers_declare_a_lost_non_durable_topology_again(
    node: RabbitNode, fault_mlp: Case, fault_plan: Plan, tmp_path: Path
) -> None:
    """``--no-durable``: the broker's restart loses the queues, exchanges and the requests
    in them (so those time out: expected here), but workers declare the topology again
    on reconnecting and the same client is answered again.

    Slow-only because it is not yet reliable: in 1 run of 6 one worker's consumer did not
    come back (its queue filled; bench/RESULTS.md, fault suite). The durable default
    above is what the suite guarantees."""
    run = await run_through(node, fault_mlp, fault_plan, tmp_path, kill_and_boot,
                            durable=False, deadline_s=15.0, after_s=25.0)
    assert (run.report.duplicated, run.report.wrong, run.report.untyped) == (0, 0, 0)
    # Slower than with durable topology (measured 1.8-12.4 s): until the topology is back,
    # publishes to the missing input exchange close the publishing channel (NOT_FOUND),
    # and publishes already on their way into that channel make RabbitMQ close the whole
    # connection (504 CHANNEL_ERROR "expected 'channel.open'"), which costs a reconnect.
    assert run.recovery_s <= 2 * RECOVERY_LIMIT_S, f"answers again after {run.recovery_s:.1f} s"
    assert run.all_answered_after, run.report
