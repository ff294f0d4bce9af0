"""Synthetic stage workers: a ``Controllable`` worker whose "inference" is an injected
service time. The controller's tests and ``bench/bench_scheduling.py`` use them to build
pipelines with known, controllable rates on the real topology of a plan (any transport).

A worker has one execution slot (like one GPU or one onnxruntime session pool): it runs one
message at a time, whichever stage it belongs to, so a flexible worker moved to another
stage stops serving its old one. Each message is forwarded to the next stage (``forward``)
with the header ``x-path`` extended by ``stage@worker``, then acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from conveyor.control import QueueConsumption, StageStats, WorkerStats
from conveyor.errors import ConfigError, TransportError
from conveyor.plan import (
    MODEL_INPUT,
    Partitioning,
    Plan,
    Scheduling,
    StageInput,
    StageOutput,
    StageSpec,
    TensorSpec,
)
from conveyor.topology import Topology
from conveyor.topology_setup import stage_queues
from conveyor.transport import Consumer, Delivery, Message, Transport

#: Weight of the newest sample in the service-time moving average.
ALPHA = 0.2



def synthetic_plan(
    stages: Sequence[str],
    *,
    partitioning: Partitioning | None = None,
    scheduling: Scheduling | None = None,
    name: str = "synthetic",
    hash: str | None = None,
) -> Plan:
    """A chain of stages with one float32 tensor between them (no ONNX files needed)."""
    import uuid

    specs = []
    for i, s in enumerate(stages):
        t_in = TensorSpec(f"t{i}", "float32", ("batch", 4))
        t_out = TensorSpec(f"t{i + 1}", "float32", ("batch", 4))
        source = MODEL_INPUT if i == 0 else stages[i - 1]
        consumers = (stages[i + 1],) if i + 1 < len(stages) else ()
        specs.append(StageSpec(
            name=s, file=f"{s}.onnx", inputs=(StageInput(t_in, source),),
            outputs=(StageOutput(t_out, consumers, model_output=not consumers),),
        ))
    return Plan(
        name=name, opset=17,
        inputs=(specs[0].inputs[0].tensor,), outputs=(specs[-1].outputs[0].tensor,),
        stages=tuple(specs),
        partitioning=partitioning or Partitioning(),
        scheduling=scheduling or Scheduling(),
        hash=hash or uuid.uuid4().hex,
    )


@dataclass
class _StageCounters:
    requests: int = 0
    in_flight: int = 0
    service_s: float = 0.0


@dataclass(frozen=True)
class Route:
    """Where a stage's output goes: an exchange and routing key (``""`` + a queue name to
    send to one queue through the default exchange)."""

    exchange: str
    routing_key: str


@dataclass
class SyntheticWorker:
    transport: Transport
    plan: Plan
    worker_id: str
    #: Injected service time per message, per stage it can run.
    service_s: Mapping[str, float]
    home: tuple[str, ...]
    prefetch: int = 32
    #: Where the last stage's outputs go (the other stages forward to the next stage).
    result_route: Route | None = None
    #: Multiplies every service time (a worker slowing down).
    slowdown: float = 1.0
    #: Consume only these of a stage's queues (e.g. one input shard); None: all of them.
    only_queues: tuple[str, ...] | None = None
    consumers: dict[str, tuple[str, Consumer]] = field(default_factory=dict)
    counters: dict[str, _StageCounters] = field(default_factory=dict)
    routing_keys: dict[str, int] = field(default_factory=dict)
    _slot: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.topology = Topology.of(self.plan)
        for s in self.service_s:
            self.plan.stage(s)  # PlanError for an unknown stage
            self.counters[s] = _StageCounters()
        for s in self.home:
            if s not in self.service_s:
                raise ConfigError(f"worker {self.worker_id}: home stage {s!r} not runnable")

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        for s in self.home:
            await self.start_consuming(s)

    async def stop(self) -> None:
        for queue in list(self.consumers):
            _, consumer = self.consumers.pop(queue)
            with contextlib.suppress(TransportError):
                await consumer.cancel()

    # -- Controllable -----------------------------------------------------------------------
    def snapshot(self) -> WorkerStats:
        return WorkerStats(
            stages_available=tuple(self.service_s),
            home_stages=self.home,
            consuming=tuple(
                QueueConsumption(q, s, c.prefetch) for q, (s, c) in sorted(self.consumers.items())
            ),
            stages=tuple(
                StageStats(
                    stage=s, requests=c.requests, batches=c.requests, in_flight=c.in_flight,
                    service_s_per_request=c.service_s, service_s_per_batch=c.service_s,
                    mean_batch=1.0, max_batch=1,
                )
                for s, c in self.counters.items()
            ),
            routing_keys=dict(self.routing_keys),
            provider="synthetic",
        )

    async def set_prefetch(self, queue: str, prefetch: int) -> None:
        if queue not in self.consumers:
            raise ConfigError(f"worker {self.worker_id} does not consume {queue}")
        await self.consumers[queue][1].set_prefetch(prefetch)

    async def start_consuming(self, stage: str, queue: str | None = None) -> None:
        for q in self._queues(stage, queue):
            if q not in self.consumers:
                consumer = await self.transport.consume(
                    q, self._handler(stage), prefetch=self.prefetch
                )
                self.consumers[q] = (stage, consumer)

    async def stop_consuming(self, stage: str, queue: str | None = None) -> None:
        for q in self._queues(stage, queue):
            entry = self.consumers.pop(q, None)
            if entry is not None:
                await entry[1].cancel()

    def _queues(self, stage: str, queue: str | None) -> list[str]:
        if stage not in self.service_s:
            raise ConfigError(f"worker {self.worker_id} cannot run stage {stage!r}")
        queues = stage_queues(self.plan, self.plan.stage(stage))
        if self.only_queues is not None:
            queues = [q for q in queues if q in self.only_queues] or queues
        if queue is not None:
            if queue not in queues:
                raise ConfigError(f"queue {queue} does not feed stage {stage!r}")
            return [queue]
        return queues

    # -- work -------------------------------------------------------------------------------
    def _route(self, stage: str) -> Route | None:
        spec = self.plan.stage(stage)
        nxt = [c for o in spec.outputs for c in o.consumers]
        if nxt:
            return Route(self.topology.stage_exchange(nxt[0]), nxt[0])
        return self.result_route

    def _handler(self, stage: str) -> Callable[[Delivery], Awaitable[None]]:
        counters = self.counters[stage]
        route = self._route(stage)
        first = stage == self.plan.stages[0].name

        async def handle(delivery: Delivery) -> None:
            counters.in_flight += 1
            try:
                if first:
                    key = delivery.routing_key
                    self.routing_keys[key] = self.routing_keys.get(key, 0) + 1
                async with self._slot:
                    t0 = time.perf_counter()
                    await asyncio.sleep(self.service_s[stage] * self.slowdown)
                    dt = time.perf_counter() - t0
                counters.service_s = dt if counters.requests == 0 else (
                    (1 - ALPHA) * counters.service_s + ALPHA * dt)
                counters.requests += 1
                if route is not None:
                    m = delivery.message
                    before = m.headers.get("x-path")
                    path = f"{before if isinstance(before, str) else ''}{stage}@{self.worker_id},"
                    await self.transport.publish(
                        route.exchange,
                        Message(body=m.body, headers={**m.headers, "x-path": path},
                                message_id=m.message_id, timestamp=m.timestamp),
                        route.routing_key,
                    )
                await delivery.ack()
            finally:
                counters.in_flight -= 1

        return handle
