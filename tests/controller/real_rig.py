"""Real stage workers (onnxruntime) under the controller: a transport tap that records which
queue delivered each request to which worker, and a pool that starts workers with their
control agents, a controller and a wire-protocol client on one broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from conveyor.errors import ConveyorError, UnroutableError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.transport import (
    Consumer,
    Delivery,
    ExchangeSpec,
    Handler,
    Message,
    QueueSpec,
    QueueStats,
    Transport,
)
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from workers.control.agent import ControlAgent
from workers.control.controller import Controller
from workers.control.policies import PolicyConfig, PolicyKind
from workers.settings import WorkerSettings
from workers.stage_worker import StageWorker


@dataclass(frozen=True)
class Seen:
    """One delivery a worker took: from which queue, which request, when."""

    worker: str
    queue: str
    request_id: str
    redelivered: bool
    at: float


class Tap:
    """A ``Transport`` that records every delivery its consumers get, then hands it on."""

    def __init__(self, inner: Transport, worker: str, log: list[Seen]) -> None:
        self.inner = inner
        self.worker = worker
        self.log = log

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        await self.inner.declare_exchange(spec)

    async def declare_queue(self, spec: QueueSpec) -> None:
        await self.inner.declare_queue(spec)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        await self.inner.bind_queue(queue, exchange, routing_key)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        await self.inner.unbind_queue(queue, exchange, routing_key)

    async def delete_queue(self, name: str) -> None:
        await self.inner.delete_queue(name)

    async def delete_exchange(self, name: str) -> None:
        await self.inner.delete_exchange(name)

    async def publish(
        self,
        exchange: str,
        message: Message,
        routing_key: str = "",
        *,
        mandatory: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        await self.inner.publish(exchange, message, routing_key, mandatory=mandatory,
                                 timeout=timeout)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Consumer:
        async def tapped(delivery: Delivery) -> None:
            m = delivery.message
            self.log.append(Seen(self.worker, queue, m.message_id or m.correlation_id or "?",
                                 delivery.redelivered, time.perf_counter()))
            await handler(delivery)

        return await self.inner.consume(queue, tapped, prefetch=prefetch)

    async def queue_stats(self, queue: str) -> QueueStats:
        return await self.inner.queue_stats(queue)

    async def close(self, grace: float = 5.0) -> None:
        await self.inner.close(grace)


@dataclass
class RealPool:
    """Real workers, their agents, one controller and a client on one broker."""

    broker: BrokerHandle
    plan: Plan
    seen: list[Seen] = field(default_factory=list)
    workers: dict[str, StageWorker] = field(default_factory=dict)
    agents: dict[str, ControlAgent] = field(default_factory=dict)
    controller: Controller | None = None
    client: Harness | None = None
    unroutable_retries: int = 0
    #: Request id -> (key, order of its confirmed publish).
    sent: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return Topology.of(self.plan)

    async def open(self) -> RealPool:
        self.client = await Harness(await self.broker.connect(), self.plan).open()
        return self

    async def add_worker(
        self,
        worker_id: str,
        stages: Sequence[str],
        *,
        home: Sequence[str] | None = None,
        shard: int | None = None,
        period: float = 0.2,
    ) -> StageWorker:
        transport = Tap(await self.broker.connect(), worker_id, self.seen)
        settings = WorkerSettings(device="cpu", intra_op_threads=1, shard=shard, grace=5.0)
        worker = StageWorker(self.plan, transport, stages, settings, worker_id=worker_id,
                             home=home)
        await worker.start()
        agent = ControlAgent(transport, self.topology, worker, worker_id, period)
        await agent.start()
        self.workers[worker_id] = worker
        self.agents[worker_id] = agent
        return worker

    async def start_controller(self, kind: PolicyKind, *, period: float = 0.25,
                               **overrides: object) -> Controller:
        cfg = PolicyConfig.from_plan(self.plan, kind, **overrides)
        self.controller = Controller(await self.broker.connect(), self.plan, cfg,
                                     period=period, report_every=0)
        await self.controller.start()
        return self.controller

    async def send(self, x: np.ndarray, key: str | None = None) -> str:
        """Publish one request (retrying a partition move's unroutable gap); its id."""
        assert self.client is not None
        for _ in range(400):
            try:
                rid = await self.client.send({"x": x}, key=key)
            except UnroutableError:
                self.unroutable_retries += 1
                await asyncio.sleep(0.005)
                continue
            self.sent[rid] = (key or "", len(self.sent))
            return rid
        raise AssertionError(f"a request with key {key!r} stayed unroutable")

    def stages_of(self, worker_id: str) -> set[str]:
        """The stages a worker consumes, as its last heartbeat told the controller."""
        assert self.controller is not None
        hb = self.controller.workers.get(worker_id)
        return {c.stage for c in hb.stats.consuming} if hb else set()

    async def close(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        for agent in self.agents.values():
            with contextlib.suppress(ConveyorError):
                await agent.stop()
        for w in self.workers.values():
            await w.stop(grace=2.0)
        if self.client is not None:
            await self.client.close()


def assert_answered_once(pool: RealPool, ids: Sequence[str], expected: np.ndarray) -> None:
    """Each request got exactly one reply, an ok one equal to its row of ``expected``."""
    assert pool.client is not None
    for rid, want in zip(ids, expected, strict=True):
        replies = pool.client.replies[rid]
        assert len(replies) == 1, f"{rid}: {len(replies)} replies"
        got = replies[0]
        assert isinstance(got, dict), f"{rid}: error reply {got!r}"
        np.testing.assert_array_equal(got["y"], want[None, :])
