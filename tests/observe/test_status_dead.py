"""`conveyor status` marks the backlogged stage; `conveyor dead --replay` brings a dead
letter back to an answer; `clean` refuses while workers are attached. Both brokers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from conveyor.app import dead
from conveyor.app.cmd_status import render, sample
from conveyor.app.status import compare
from conveyor.app.transports import BrokerTarget
from conveyor.client import Client
from conveyor.topology import Topology
from conveyor.transport import Delivery, Transport
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_expected, chain_plan
from workers.stage_worker import StageWorker


async def _until(predicate_coro, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    until = time.monotonic() + within
    while not await predicate_coro():
        assert time.monotonic() < until, "condition not reached"
        await asyncio.sleep(0.05)


async def _depth(transport: Transport, queue: str) -> int:
    return (await transport.queue_stats(queue)).depth


async def test_status_marks_the_stage_with_a_backlog(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 3, name=unique)
    s0, s1, s2 = plan.stage_names
    topo = Topology.of(plan)
    workers = [StageWorker(plan, await broker.connect(), [s]) for s in (s0, s2)]  # none for s1
    admin = await broker.connect()
    try:
        for w in workers:
            await w.start()
        async with Client(plan, await broker.connect()) as client:
            calls = [asyncio.ensure_future(client.infer({"x": np.ones((1, 4), np.float32)}))
                     for _ in range(12)]

            async def backlog() -> bool:
                # Requests travel in batches: 12 requests are a message or a few.
                return await _depth(admin, topo.stage_queue(s1)) >= 1

            await _until(backlog)
            before = await sample(plan, admin, [])
            after = await sample(plan, admin, [])
            rows = compare(plan, before, after, 1.0)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for w in workers:
            await w.stop(grace=0.5)
    by_stage = {r.stage: r for r in rows}
    assert by_stage[s1].bottleneck and by_stage[s1].unserved and (by_stage[s1].depth or 0) >= 1
    assert not by_stage[s0].bottleneck and by_stage[s0].consumers == 1
    console = Console(record=True, width=200)
    console.print(render(plan, BrokerTarget("amqp://x/"), rows))
    text = console.export_text()
    line = next(row for row in text.splitlines() if f" {s1} " in row)
    assert "bottleneck" in line and "none" in line
    assert f"--stage {s1}" in text.replace("\n", " ").replace("│", " ").replace("  ", " ")
    assert "bottleneck" not in next(row for row in text.splitlines() if f" {s0} " in row)


async def test_dead_replay_brings_a_request_back_to_an_answer(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    s0, s1 = plan.stage_names
    topo = Topology.of(plan)
    first = StageWorker(plan, await broker.connect(), [s0])
    admin = await broker.connect()
    faulty = await broker.connect()
    second: StageWorker | None = None
    try:
        await first.start()

        async def reject(delivery: Delivery) -> None:  # a broken stage-1 worker
            await delivery.reject()

        consumer = await faulty.consume(topo.stage_queue(s1), reject, prefetch=4)
        async with Client(plan, await broker.connect()) as client:
            x = np.full((1, 4), 0.5, np.float32)
            call = asyncio.ensure_future(client.infer({"x": x}, timeout=60))

            async def one_dead() -> bool:
                return await _depth(admin, topo.dead_letter_queue) == 1

            await _until(one_dead)
            letters, depth = await dead.show(admin, plan, 10)
            assert depth == 1 and len(letters) == 1
            assert (letters[0].reason, letters[0].stage) == ("rejected", s1)
            assert len(letters[0].trace) == 32  # the SDK's traceparent, as a trace id
            await _until(one_dead)  # showing left it there
            assert not call.done()
            await consumer.cancel()  # the cause is gone: a sound worker takes over
            second = StageWorker(plan, await broker.connect(), [s1])
            await second.start()
            replayed, problems = await dead.replay(admin, plan)
            assert (replayed, problems) == (1, [])
            outputs = await asyncio.wait_for(call, 20)
        np.testing.assert_allclose(outputs["y"], chain_expected(x, 2), rtol=1e-5)
        assert await _depth(admin, topo.dead_letter_queue) == 0
    finally:
        await first.stop(grace=0.5)
        if second is not None:
            await second.stop(grace=0.5)


async def test_status_reads_a_conveyor_run_process_through_its_metrics(
    tmp_path: Path, unique: str
) -> None:
    import socket
    import sys

    (tmp_path / "plan").mkdir()
    plan = chain_plan(tmp_path / "plan", 2, name=unique)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "run", str(plan.directory), "--embedded",
        "--metrics-port", str(port), stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while (await proc.stdout.readline()).strip() != b"conveyor: ready":
                pass
        out = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor", "status", str(plan.directory), "--metrics",
            f"http://127.0.0.1:{port}/metrics", "--interval", "0.3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())},
        )
        stdout, stderr = await asyncio.wait_for(out.communicate(), 60)
        assert out.returncode == 0, stderr.decode()
    finally:
        proc.terminate()
        await proc.wait()
    rows = {line.split("│")[1].strip(): line for line in stdout.decode().splitlines()
            if line.count("│") > 5}
    for stage in plan.stage_names:
        cells = [c.strip() for c in rows[stage].split("│")]
        assert cells[2:4] == ["0", "1"]  # depth 0, one consumer: the run process


async def test_status_reads_rates_from_heartbeats_without_metrics(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    """No --metrics: the completions per stage come from the workers' heartbeats, and the
    table says so."""
    from contextlib import AsyncExitStack

    from conveyor.app.status_heartbeats import HeartbeatTap
    from workers.control.agent import ControlAgent

    plan = chain_plan(tmp_path, 2, name=unique)
    topo = Topology.of(plan)
    workers = [StageWorker(plan, await broker.connect(), [s]) for s in plan.stage_names]
    admin = await broker.connect()
    requests = 30
    async with AsyncExitStack() as stack:
        for i, w in enumerate(workers):
            await w.start()
            stack.push_async_callback(w.stop, 0.5)
            await stack.enter_async_context(
                ControlAgent(w.transport, topo, w, f"w{i}-{unique}", period=0.2))
        tap = HeartbeatTap(admin, plan)
        await tap.start()
        stack.push_async_callback(tap.close)
        assert await tap.wait_first(), "no heartbeat within the first wait"
        before = await sample(plan, admin, [], tap)
        started = time.monotonic()
        async with Client(plan, await broker.connect()) as client:
            for _ in range(requests):
                await client.infer({"x": np.ones((1, 4), np.float32)})

        async def all_counted() -> bool:
            after = await sample(plan, admin, [], tap)
            return all(after[s].ok - before[s].ok >= requests for s in plan.stage_names)

        await _until(all_counted, 10)
        after = await sample(plan, admin, [], tap)
        rows = compare(plan, before, after, time.monotonic() - started)
        assert tap.workers == 2
    for s in plan.stage_names:
        assert (after[s].ok - before[s].ok, after[s].errors) == (requests, 0), s
    assert all(r.completion_rps > 0 and r.consumers == 1 for r in rows)
    console = Console(record=True, width=200)
    console.print(render(plan, BrokerTarget("amqp://x/"), rows, tap))
    assert "heartbeats of 2 worker(s)" in console.export_text()
