"""A test rig: a plan's real topology, synthetic workers with control agents, controllers,
a request publisher and a results collector, on either transport."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from conveyor.errors import ConveyorError, UnroutableError
from conveyor.plan import Plan
from conveyor.topology import Topology, partition_routing_key
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from tests.support.brokers import BrokerHandle
from tests.support.polling import until
from tests.support.synthetic import Route, SyntheticWorker
from workers.control.agent import ControlAgent, command_queue
from workers.control.controller import Controller, heartbeat_queue, state_queue
from workers.control.policies import PolicyConfig, PolicyKind


@dataclass(frozen=True)
class Done:
    msg_id: str
    seq: int
    key: str
    #: "stage@worker," per hop.
    path: str
    sent_at: float
    at: float

    @property
    def workers(self) -> list[str]:
        return [hop.split("@")[1] for hop in self.path.split(",") if hop]


@dataclass
class Rig:
    handle: BrokerHandle
    plan: Plan
    done: dict[str, Done] = field(default_factory=dict)
    duplicates: int = 0
    unroutable_retries: int = 0
    published: dict[str, tuple[int, str]] = field(default_factory=dict)
    workers: dict[str, SyntheticWorker] = field(default_factory=dict)
    agents: dict[str, ControlAgent] = field(default_factory=dict)
    controllers: list[Controller] = field(default_factory=list)
    _admin: Transport | None = None
    _seq: int = 0

    def __post_init__(self) -> None:
        self.topology = Topology.of(self.plan)
        self.results = f"{self.topology.base}.results"

    @property
    def admin(self) -> Transport:
        assert self._admin is not None, "call open() first"
        return self._admin

    async def open(self) -> Rig:
        self._admin = await self.handle.connect()
        await declare_plan_topology(self.admin, self.plan)
        await self.admin.declare_queue(QueueSpec(self.results))
        await self.admin.consume(self.results, self._on_result, prefetch=1000)
        return self

    async def _on_result(self, delivery: Delivery) -> None:
        m = delivery.message
        h = m.headers
        rid = m.message_id or "?"
        if rid in self.done:
            self.duplicates += 1
        else:
            self.done[rid] = Done(rid, int(h.get("x-seq") or 0), str(h.get("x-key") or ""),
                                  str(h.get("x-path") or ""), float(h.get("x-sent") or 0.0),
                                  time.perf_counter())
        await delivery.ack()

    # -- parts ------------------------------------------------------------------------------
    async def add_worker(
        self,
        worker_id: str,
        service_s: Mapping[str, float],
        home: tuple[str, ...],
        *,
        prefetch: int = 50,
        queues: tuple[str, ...] | None = None,
        period: float = 0.2,
    ) -> SyntheticWorker:
        transport = await self.handle.connect()
        worker = SyntheticWorker(
            transport, self.plan, worker_id, service_s, home, prefetch=prefetch,
            result_route=Route("", self.results), only_queues=queues,
        )
        await worker.start()
        agent = ControlAgent(transport, self.topology, worker, worker_id, period)
        await agent.start()
        self.workers[worker_id] = worker
        self.agents[worker_id] = agent
        return worker

    async def controller(self, kind: PolicyKind, *, period: float = 0.25,
                         **overrides: object) -> Controller:
        transport = await self.handle.connect()
        cfg = PolicyConfig.from_plan(self.plan, kind, **overrides)
        c = Controller(transport, self.plan, cfg, period=period, report_every=0)
        await c.start()
        self.controllers.append(c)
        return c

    # -- traffic ----------------------------------------------------------------------------
    async def publish(self, n: int, *, key: str | None = None, stage: str | None = None,
                      concurrency: int = 32) -> list[str]:
        """Publish ``n`` requests to the input exchange (or straight to ``stage``)."""
        ids = []
        for _ in range(n):
            self._seq += 1
            ids.append((uuid.uuid4().hex, self._seq))
        sem = asyncio.Semaphore(concurrency)

        async def one(rid: str, seq: int) -> None:
            async with sem:
                await self.publish_one(rid, seq, key, stage)

        await asyncio.gather(*(one(rid, seq) for rid, seq in ids))
        return [rid for rid, _ in ids]

    async def publish_one(self, rid: str, seq: int, key: str | None, stage: str | None) -> None:
        if stage is None:
            exchange = self.topology.input_exchange
            rk = partition_routing_key(self.plan.partitioning, key)
        else:
            exchange, rk = self.topology.stage_exchange(stage), stage
        msg = Message(body=b"x" * 64, message_id=rid,
                      headers={"x-seq": seq, "x-key": key or "", "x-sent": time.perf_counter()})
        self.published[rid] = (seq, key or "")
        for _ in range(200):
            try:
                await self.admin.publish(exchange, msg, rk)
                return
            except UnroutableError:  # a partition move's unbind-then-bind gap
                self.unroutable_retries += 1
                await asyncio.sleep(0.005)
        raise AssertionError(f"request {rid} stayed unroutable")

    async def wait_for(self, cond: Callable[[], bool], limit: float, what: str) -> float:
        """Poll ``cond`` until true; returns the seconds it took (AssertionError on timeout)."""
        return await until(cond, limit, what)

    async def all_done(self, ids: list[str], limit: float) -> float:
        return await self.wait_for(lambda: all(i in self.done for i in ids), limit,
                                   f"{len(ids)} results ({sum(i in self.done for i in ids)} in)")

    # -- teardown ---------------------------------------------------------------------------
    async def kill_controller(self, c: Controller) -> None:
        """Like a killed process: no orderly stop, its connection just drops."""
        if c._task is not None:
            c._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await c._task
        await c.transport.close(grace=0)
        self.controllers.remove(c)

    async def close(self) -> None:
        for c in self.controllers:
            await c.stop()
        for agent in self.agents.values():
            with contextlib.suppress(ConveyorError):
                await agent.stop()
        for w in self.workers.values():
            await w.stop()
        if self._admin is None:
            return
        with contextlib.suppress(ConveyorError):
            await delete_plan_topology(self.admin, self.plan)
            for q in [self.results, heartbeat_queue(self.topology), state_queue(self.topology),
                      *(command_queue(self.topology, w) for w in self.workers)]:
                await self.admin.delete_queue(q)
