"""Guards on both brokers: crash loops end, size limits, reply-queue scheme, full queues."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.client import Client
from conveyor.errors import BackpressureError, CrashLoopError, RequestTooLarge, TransportError
from conveyor.plan import Plan, PlanLimits, QueueSettings
from conveyor.topology import Topology
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology
from conveyor.transport import QueueSpec, Transport
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan, join_expected, join_plan
from workers import serve
from workers.session import StageSession
from workers.stage_worker import StageWorker

MARKER = 777.0


class WorkerDied(BaseException):
    """Stands for the process dying: nothing below catches it, nothing is settled."""


def limited(
    tmp_path: Path, unique: str, k: int = 2, max_batch: int = 8, **limits: Any
) -> Plan:
    plan = chain_plan(tmp_path, k=k, name=unique, max_delay_ms=0, max_batch=max_batch)
    return Plan.load(plan.with_settings(limits=PlanLimits(**limits)).save(tmp_path).directory)


def rand(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 4), dtype=np.float32)


class Supervisor:
    """Runs one worker for ``stages`` (default all), restarting it (a new connection) when
    it dies, as systemd or Kubernetes would. A worker dies when a batch holds ``marker``."""

    def __init__(
        self,
        broker: BrokerHandle,
        plan: Plan,
        monkeypatch: pytest.MonkeyPatch,
        stages: list[str] | None = None,
        marker: float = MARKER,
    ) -> None:
        self.broker = broker
        self.plan = plan
        self.stages = stages
        self.deaths = 0
        self.runs_with_marker = 0
        self.worker: StageWorker | None = None
        self.transport: Transport | None = None
        self._died = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        real = StageSession.run_bound

        def run_bound(session: StageSession, feeds: Mapping[str, Any]) -> Any:
            if any(np.any(np.asarray(v) == marker) for v in feeds.values()):
                self.runs_with_marker += 1
                self._loop.call_soon_threadsafe(self._died.set)
                raise WorkerDied
            return real(session, feeds)

        monkeypatch.setattr(StageSession, "run_bound", run_bound)

    async def run(self) -> None:
        """Until ``stop``: not by cancelling this task, which aiormq may swallow (an RPC
        whose reply lands as the cancel arrives returns its result: Python 3.11's
        ``wait_for``), leaving the loop waiting for a death that never comes."""
        while not self._stopping.is_set():
            self.transport = await self.broker.connect()
            self.worker = await serve(self.plan, self.transport, self.stages, "cpu")
            died = asyncio.ensure_future(self._died.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({died, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (died, stopping):
                waiter.cancel()
            if not self._died.is_set():
                return
            self._died.clear()
            self.deaths += 1
            # Dead: the connection goes without settling anything (the broker redelivers).
            await self.transport.close(grace=0)
            with contextlib.suppress(Exception):
                await self.worker.stop(grace=0)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End ``task`` (running ``run``) and stop the last worker."""
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=20)
        if task not in done:
            task.cancel()
            raise AssertionError("the supervisor did not stop within 20 s")
        task.result()
        if self.worker is not None:
            await self.worker.stop(grace=1.0)


async def depth_reaches(transport: Transport, queue: str, depth: int) -> None:
    """Polls the broker's counter (nothing to wait on) for 10 s at most."""
    give_up = time.monotonic() + 10
    while True:
        if (await transport.queue_stats(queue)).depth >= depth:
            return
        assert time.monotonic() < give_up, f"{queue} never held {depth} messages"
        await asyncio.sleep(0.01)


@pytest.fixture
async def harness_of(broker: BrokerHandle) -> AsyncIterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        await h.close()


@pytest.mark.timeout(120)  # a hang fails with a stack dump (pytest-timeout), not CI's limit
async def test_a_request_that_kills_its_worker_is_dead_lettered_after_three_runs(
    broker: BrokerHandle,
    harness_of: list[Harness],
    tmp_path: Path,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = limited(tmp_path, unique, delivery_limit=3)
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    supervisor = Supervisor(broker, plan, monkeypatch)
    task = asyncio.create_task(supervisor.run())
    try:
        xs = [rand(1 + i % 3) for i in range(20)]
        ids = [await client.send({"x": x}) for x in xs[:10]]
        killer = await client.send({"x": np.full((1, 4), MARKER, np.float32)})
        ids += [await client.send({"x": x}) for x in xs[10:]]
        await client.wait_for([*ids, killer], within=30, dead=1)
    finally:
        await supervisor.stop(task)
    result = client.one(killer)
    assert isinstance(result, CrashLoopError), result
    assert "delivered 3 times" in str(result) and killer in str(result)
    assert supervisor.runs_with_marker == 3  # at most the limit
    assert supervisor.deaths == 3
    for rid, x in zip(ids, xs, strict=True):
        for got in client.replies[rid]:  # duplicates (a copy and what it replaced) agree
            assert not isinstance(got, Exception), f"neighbour {rid}: {got!r}"
            np.testing.assert_allclose(got["y"], chain_expected(x, 2), rtol=1e-5)
    assert {m.message_id for m in client.dead} == {killer}


@pytest.mark.timeout(120)
async def test_a_request_that_kills_its_join_worker_is_dead_lettered_after_three_runs(
    broker: BrokerHandle,
    harness_of: list[Harness],
    tmp_path: Path,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A join holds parts until their partners come: its suspect queue lets in one part per
    source, more while parts wait, and the crash loop still ends."""
    plan = join_plan(tmp_path, name=unique, max_delay_ms=0)
    marker = float(np.maximum(3 * (2 * MARKER + 1) + 1, 0))  # the killer's "l" at the join
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    upstream = await serve(plan, await broker.connect(), ["fork", "left", "right"], "cpu")
    supervisor = Supervisor(broker, plan, monkeypatch, ["join"], marker)
    task = asyncio.create_task(supervisor.run())
    try:
        xs = [rand(1 + i % 3) for i in range(20)]
        ids = [await client.send({"x": x}) for x in xs[:10]]
        killer = await client.send({"x": np.full((1, 4), MARKER, np.float32)})
        ids += [await client.send({"x": x}) for x in xs[10:]]
        await client.wait_for([*ids, killer], within=60, dead=2)  # both parts of the killer
    finally:
        await supervisor.stop(task)
        await upstream.stop(grace=1.0)
    result = client.one(killer)
    assert isinstance(result, CrashLoopError) and "delivered 3 times" in str(result), result
    assert supervisor.runs_with_marker == 3
    for rid, x in zip(ids, xs, strict=True):
        for got in client.replies[rid]:
            assert not isinstance(got, Exception), f"neighbour {rid}: {got!r}"
            np.testing.assert_allclose(got["y"], join_expected(x), rtol=1e-5)
    assert {m.message_id for m in client.dead} == {killer}


async def test_every_work_queue_has_a_suspect_queue_declared_and_deleted_with_the_plan(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = limited(tmp_path, unique, k=2)
    topo = Topology.of(plan)
    work = [topo.input_queue(0), topo.stage_queue("s1")]
    suspects = [topo.suspect_queue(q) for q in work]
    assert suspects == [f"{topo.base}.suspect.input.0", f"{topo.base}.suspect.stage.s1"]
    transport = await broker.connect()
    try:
        await declare_plan_topology(transport, plan)
        for queue in suspects:
            assert (await transport.queue_stats(queue)).depth == 0
        await delete_plan_topology(transport, plan)  # conveyor clean leaves none behind
        for queue in suspects:
            with pytest.raises(TransportError):
                await transport.queue_stats(queue)
    finally:
        with contextlib.suppress(TransportError):
            await delete_plan_topology(transport, plan)
        await transport.close()


async def test_requests_over_the_size_limits_are_refused_typed(
    broker: BrokerHandle, harness_of: list[Harness], tmp_path: Path, unique: str
) -> None:
    plan = limited(tmp_path, unique, max_request_rows=8, max_request_bytes=4 * 4 * 6)
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    worker = await serve(plan, await broker.connect(), None, "cpu")
    try:
        ok = await client.send({"x": rand(6)})
        rows = await client.send({"x": rand(9)})
        size = await client.send({"x": rand(7)})  # 7 rows: within rows, over bytes
        await client.wait_for([ok, rows, size], dead=2)
        assert not isinstance(client.one(ok), Exception)
        for rid, what in ((rows, "max_request_rows"), (size, "max_request_bytes")):
            error = client.one(rid)
            assert isinstance(error, RequestTooLarge) and what in str(error), error
        # The SDK refuses before sending.
        async with Client(plan, await broker.connect()) as sdk:
            with pytest.raises(RequestTooLarge, match="max_request_rows"):
                await sdk.infer({"x": rand(9)}, timeout=5)
            assert sdk.stats().messages_sent == 0
            out = await sdk.infer({"x": rand(2)}, timeout=10)
            np.testing.assert_allclose(out["y"], chain_expected(rand(2), 2), rtol=1e-5)
    finally:
        await worker.stop(grace=1.0)


async def test_workers_reply_only_to_the_plans_reply_queues(
    broker: BrokerHandle, harness_of: list[Harness], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=1, name=unique, max_delay_ms=0).directory)
    victim = broker.name("foreign")
    # A queue of someone else, named by a client as its reply queue.
    client = Harness(await broker.connect(), plan, reply_queue=victim)  # publishes only
    await client.transport.declare_queue(QueueSpec(victim))
    good = await Harness(await broker.connect(), plan).open()
    harness_of.append(good)
    worker = await serve(plan, await broker.connect(), None, "cpu")
    try:
        bad = await client.send({"x": rand()})
        fine = await good.send({"x": rand()})
        await good.wait_for([fine], dead=1)
        assert [m.message_id for m in good.dead] == [bad]
        assert bad not in client.replies
        assert (await client.transport.queue_stats(victim)).depth == 0
    finally:
        await worker.stop(grace=1.0)


async def test_a_full_input_queue_answers_the_caller_with_backpressure_at_once(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = limited(tmp_path, unique, k=1, max_queued_requests=8, pack_requests=4)
    transport = await broker.connect()
    async with Client(plan, transport) as sdk:
        assert sdk.stats().messages_sent == 0
        # No worker: 8 requests in packs of 4 fill the queue (2 messages).
        waiting = [asyncio.create_task(sdk.infer({"x": rand()}, timeout=30)) for _ in range(8)]
        await asyncio.sleep(0)
        queue = Topology.of(plan).input_queue(0)
        await depth_reaches(transport, queue, 2)
        started = time.monotonic()
        with pytest.raises(BackpressureError):
            await sdk.infer({"x": rand()}, timeout=30)
        assert time.monotonic() - started < 1.0
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_full_next_stage_backs_off_and_drains_when_its_consumer_returns(
    broker: BrokerHandle, harness_of: list[Harness], tmp_path: Path, unique: str
) -> None:
    plan = limited(tmp_path, unique, k=2, max_batch=1, max_queued_batches=2)
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    first = await serve(plan, await broker.connect(), ["s0"], "cpu")
    second: StageWorker | None = None
    try:
        xs = [rand() for _ in range(12)]
        ids = [await client.send({"x": x}) for x in xs]
        stage_queue = Topology.of(plan).stage_queue("s1")
        await depth_reaches(client.transport, stage_queue, 2)
        await asyncio.sleep(1.0)  # a spinning worker would try thousands of times here
        tries = first.outbox.backoffs
        assert 0 < tries < 150, tries  # about 6 per waiting batch
        second = await serve(plan, await broker.connect(), ["s1"], "cpu")
        await client.wait_for(ids, within=30)
        for rid, x in zip(ids, xs, strict=True):
            got = client.one(rid)
            assert not isinstance(got, Exception), got
            np.testing.assert_allclose(got["y"], chain_expected(x, 2), rtol=1e-5)
    finally:
        await first.stop(grace=1.0)
        if second is not None:
            await second.stop(grace=1.0)


def test_limits_at_their_defaults_keep_a_plans_hash(tmp_path: Path, unique: str) -> None:
    plan = chain_plan(tmp_path, k=1, name=unique)
    assert "limits" not in plan.to_dict()
    again = dataclasses.replace(plan, limits=PlanLimits(delivery_limit=5))
    assert again.to_dict()["limits"]["delivery_limit"] == 5
    assert Plan.from_dict(again.to_dict()).limits == PlanLimits(delivery_limit=5)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
async def test_a_worker_whose_queue_is_deleted_declares_it_again(
    broker: BrokerHandle, harness_of: list[Harness], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=2, name=unique, max_delay_ms=0).directory)
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    worker = await serve(plan, await broker.connect(), ["s1"], "cpu")
    first = await serve(plan, await broker.connect(), ["s0"], "cpu")
    try:
        queue = Topology.of(plan).stage_queue("s1")
        await client.transport.delete_queue(queue)
        give_up = time.monotonic() + 10
        while True:  # polling the broker: the queue is back with its consumer
            with contextlib.suppress(TransportError):
                if (await client.transport.queue_stats(queue)).consumers >= 1:
                    break
            assert time.monotonic() < give_up, "the worker did not declare its queue again"
            await asyncio.sleep(0.05)
        assert not worker.failed.is_set()
        x = rand()
        rid = await client.send({"x": x})
        await client.wait_for([rid])
        got = client.one(rid)
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got["y"], chain_expected(x, 2), rtol=1e-5)
    finally:
        await first.stop(grace=1.0)
        await worker.stop(grace=1.0)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
async def test_quorum_queues_with_bounds_serve_requests(
    broker: BrokerHandle, harness_of: list[Harness], tmp_path: Path, unique: str
) -> None:
    plan = limited(tmp_path, unique, max_queued_requests=64, max_queued_batches=16)
    plan = Plan.load(plan.with_settings(queues=QueueSettings("quorum")).save(tmp_path).directory)
    client = await Harness(await broker.connect(), plan).open()
    harness_of.append(client)
    worker = await serve(plan, await broker.connect(), None, "cpu")
    try:
        x = rand(2)
        rid = await client.send({"x": x})
        await client.wait_for([rid])
        got = client.one(rid)
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got["y"], chain_expected(x, 2), rtol=1e-5)
    finally:
        await worker.stop(grace=1.0)
