"""The pipeline harness: a plan served on one broker, and the clients that talk to it.

``Pipeline`` serves a plan two ways on the ``broker`` it is given: ``start`` runs
in-process ``StageWorker``s (one connection each) and hands out a ``Harness``, a test
client speaking the wire protocol directly (publish requests, collect replies and dead
letters); ``serve`` hands out the SDK ``Client`` (``conveyor.connect``) with the workers
in this process on brokerless, or one ``python -m conveyor worker`` subprocess per stage
on RabbitMQ, each test on its own copy of the plan (queues of its own, deleted at the
end). The ``pipeline`` fixture gives a test one on each broker and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from conveyor import wire
from conveyor.app.connect import connect
from conveyor.client import Client
from conveyor.envelope import RequestMeta, read_reply
from conveyor.errors import ConveyorError
from conveyor.packs import REPLY_PACK_TYPE, pack_requests, unpack_replies
from conveyor.plan import Plan
from conveyor.topology import Topology, partition_routing_key
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology, stage_queues
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from tests.support.brokers import BrokerHandle
from tests.support.plans import isolated_copy
from tests.support.polling import consumers, until
from workers import serve as serve_stages
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from tests.support.cases import Case
    from workers.stage_worker import StageWorker

REPO = Path(__file__).resolve().parents[2]

Result = Mapping[str, np.ndarray] | ConveyorError


@dataclass
class Harness:
    transport: Transport
    plan: Plan
    replies: dict[str, list[Result]] = field(default_factory=dict)
    dead: list[Message] = field(default_factory=list)
    #: The AMQP ``type`` of each reply message received (``conveyor.replies``: a pack).
    reply_types: list[str | None] = field(default_factory=list)
    reply_queue: str = field(default_factory=lambda: f"test.replies.{uuid.uuid4().hex[:8]}")

    @property
    def topology(self) -> Topology:
        return Topology.of(self.plan)

    async def open(self) -> Harness:
        await declare_plan_topology(self.transport, self.plan)
        await self.transport.declare_queue(QueueSpec(self.reply_queue, auto_delete=True))
        await self.transport.consume(self.reply_queue, self._on_reply, prefetch=1000)
        await self.transport.consume(self.topology.dead_letter_queue, self._on_dead, prefetch=1000)
        return self

    async def close(self) -> None:
        with contextlib.suppress(ConveyorError):
            await delete_plan_topology(self.transport, self.plan)
            await self.transport.delete_queue(self.reply_queue)

    async def _on_reply(self, delivery: Delivery) -> None:
        self.reply_types.append(delivery.message.type)
        if delivery.message.type == REPLY_PACK_TYPE:
            for request_id, tensors in unpack_replies(delivery.message):
                self.replies.setdefault(request_id, []).append(
                    {k: v.copy() for k, v in tensors.items()}
                )
            await delivery.ack()
            return
        rid = delivery.message.correlation_id or "?"
        result: Result
        try:
            result = {k: v.copy() for k, v in read_reply(delivery.message).tensors.items()}
        except ConveyorError as exc:
            result = exc
        self.replies.setdefault(rid, []).append(result)
        await delivery.ack()

    async def _on_dead(self, delivery: Delivery) -> None:
        self.dead.append(delivery.message)
        await delivery.ack()

    async def send(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        request_id: str | None = None,
        key: str | None = None,
        deadline: float | None = None,
        plan_hash: str | None = "",
        body: bytes | None = None,
    ) -> str:
        rid = request_id or uuid.uuid4().hex
        meta = RequestMeta(
            rid,
            reply_to=self.reply_queue,
            deadline=deadline,
            plan_hash=self.plan.hash if plan_hash == "" else plan_hash,
            key=key,
        )
        message = meta.to_message(wire.encode(tensors) if body is None else body)
        await self.publish(message, key)
        return rid

    async def send_pack(
        self,
        requests: list[Mapping[str, np.ndarray]],
        *,
        deadlines: list[float | None] | None = None,
        packed_replies: bool = True,
    ) -> list[str]:
        """Publish ``requests`` as one request pack (conveyor.packs); their ids."""
        metas = [
            RequestMeta(
                uuid.uuid4().hex,
                reply_to=self.reply_queue,
                deadline=None if deadlines is None else deadlines[i],
                plan_hash=self.plan.hash,
                packed_replies=packed_replies,
            )
            for i in range(len(requests))
        ]
        message = pack_requests(self.plan.hash, list(zip(metas, requests, strict=True)))
        await self.publish(message)
        return [m.request_id for m in metas]

    async def publish(self, message: Message, key: str | None = None) -> None:
        routing_key = partition_routing_key(self.plan.partitioning, key)
        await self.transport.publish(self.topology.input_exchange, message, routing_key)

    async def wait_for(self, ids: list[str], within: float = 20.0, dead: int = 0) -> None:
        """Until every id has a reply and ``dead`` messages were dead-lettered."""

        def missing() -> list[str]:
            return [i for i in ids if i not in self.replies]

        await until(
            lambda: not missing() and len(self.dead) >= dead,
            within,
            lambda: f"{len(ids)} replies and {dead} dead letters: "
            f"{len(missing())} of {len(ids)} replies missing, {len(self.dead)}/{dead} dead",
        )

    def one(self, rid: str) -> Result:
        """The reply for ``rid`` (duplicates must agree)."""
        results = self.replies[rid]
        return results[0]


# -- worker processes (RabbitMQ) ----------------------------------------------------------


class WorkerProcesses:
    """``python -m conveyor worker`` subprocesses on RabbitMQ, one or more per stage."""

    def __init__(self, plan: Plan, url: str, log_dir: Path, *extra_args: str) -> None:
        self.plan = plan
        self.url = url
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}

    def start(self, stage: str) -> subprocess.Popen[bytes]:
        index = len(self.procs.get(stage, []))
        log = (self.log_dir / f"worker-{stage}-{index}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", str(self.plan.directory),
             "--stage", stage, "--broker", self.url, "--device", "cpu", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        log.close()
        self.procs.setdefault(stage, []).append(proc)
        return proc

    def start_all(self) -> None:
        for stage in self.plan.stage_names:
            self.start(stage)

    def exited(self) -> dict[str, int | None]:
        """Stage -> exit status of each of its processes that is no longer running."""
        return {s: p.returncode for s, ps in self.procs.items() for p in ps
                if p.poll() is not None}

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def stop_all(self, timeout: float = 20.0) -> None:
        live = [p for ps in self.procs.values() for p in ps if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def wait_until_consumed(url: str, plan: Plan, procs: WorkerProcesses,
                              timeout: float = 180.0) -> None:  # noqa: ASYNC109
    """Return once every queue of the plan has a consumer (workers up), or fail (at once if
    a worker process exits).

    Requests published earlier would wait in the queues anyway; waiting keeps worker
    start-up (seconds on a loaded 2-core machine) out of the requests' deadlines.
    """
    from workers.amqp import AmqpTransport

    queues = [q for s in plan.stages for q in stage_queues(plan, s)]
    admin = await AmqpTransport.connect(url)
    idle = queues

    async def all_consumed() -> bool:
        nonlocal idle
        idle = [q for q in queues if await consumers(admin, q) == 0]
        if idle and procs.exited():
            raise AssertionError(
                f"workers not consuming {idle} (exited: {procs.exited()})\n{procs.logs()}"
            )
        return not idle

    try:
        await until(all_consumed, timeout,
                    lambda: f"workers consuming {idle} (exited: {procs.exited()})\n{procs.logs()}",
                    every=0.1)
    finally:
        await admin.close(grace=0.5)


async def delete_topology(url: str, plan: Plan) -> None:
    from workers.amqp import AmqpTransport

    topo = Topology.of(plan)
    queues = {q for s in plan.stages for q in stage_queues(plan, s)} | {topo.dead_letter_queue}
    exchanges = {topo.input_exchange, topo.control_exchange, topo.dead_letter_exchange}
    exchanges |= {topo.stage_exchange(s) for s in plan.stage_names}
    admin = await AmqpTransport.connect(url)
    try:
        for q in queues:
            await admin.delete_queue(q)
        for x in exchanges:
            await admin.delete_exchange(x)
    finally:
        await admin.close(grace=0.5)


# -- the pipeline ---------------------------------------------------------------------------


@dataclass
class Served:
    client: Client
    plan: Plan
    workers: WorkerProcesses | None


class Pipeline:
    """A plan served on ``broker``: ``await pipeline.start(plan, layout)`` (in-process stage
    workers, a ``Harness`` client) or ``async with pipeline.serve(case) as served`` (the SDK
    client; worker processes on RabbitMQ)."""

    def __init__(self, broker: BrokerHandle, tmp: Path) -> None:
        self.broker = broker
        self.tmp = tmp
        self.workers: list[StageWorker] = []
        self.client: Harness | None = None

    @property
    def kind(self) -> str:
        return self.broker.kind

    @property
    def url(self) -> str | None:
        return self.broker.url

    async def start(
        self,
        plan: Plan,
        layout: Sequence[Sequence[str] | None],
        settings: WorkerSettings | None = None,
        transport: Transport | None = None,
    ) -> Harness:
        """A ``Harness`` for ``plan`` and one worker per entry of ``layout`` (its stages;
        ``None``: all), each on a connection of its own unless ``transport`` is given."""
        self.client = await Harness(await self.broker.connect(), plan).open()
        for stages in layout:
            await self.add_worker(plan, stages, settings, transport)
        return self.client

    async def add_worker(
        self,
        plan: Plan,
        stages: Sequence[str] | None,
        settings: WorkerSettings | None = None,
        transport: Transport | None = None,
    ) -> StageWorker:
        t = transport or await self.broker.connect()
        worker = await serve_stages(plan, t, stages, "cpu", settings)
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop(grace=2.0)
        if self.client is not None:
            await self.client.close()

    @contextlib.asynccontextmanager
    async def serve(
        self,
        case: Case,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        start_workers: bool = True,
        pack: bool = True,
    ) -> AsyncIterator[Served]:
        if self.kind == "brokerless":
            async with connect(None, plan=case.plan, timeout=timeout,
                               local_workers=start_workers, pack=pack) as client:
                yield Served(client, case.plan, None)
            return
        assert self.url is not None
        plan = isolated_copy(case.plan, self.tmp / f"plan-{uuid.uuid4().hex[:8]}")
        procs = WorkerProcesses(plan, self.url, self.tmp)
        try:
            async with connect(self.url, plan=plan, timeout=timeout, pack=pack) as client:
                if start_workers:
                    procs.start_all()
                    await wait_until_consumed(self.url, plan, procs)
                yield Served(client, plan, procs)
        except BaseException:
            print(procs.logs(), file=sys.stderr)
            raise
        finally:
            await asyncio.to_thread(procs.stop_all)
            await delete_topology(self.url, plan)


@pytest.fixture
async def pipeline(broker: BrokerHandle, tmp_path: Path) -> AsyncIterator[Pipeline]:
    """A ``Pipeline`` on each broker (the ``broker`` fixture's), stopped after the test."""
    made = Pipeline(broker, tmp_path)
    try:
        yield made
    finally:
        await made.stop()
