"""The queues a stage worker consumes: one record each, and its suspect queue's.

A ``ConsumerRecord`` holds what the worker knows of one queue it consumes (or may consume:
a flexible worker's away stages): the stage and runner it feeds, the prefetch asked for and
in force, the consumer while there is one, the lots (deliveries) not settled yet, and the
record of its suspect queue (``workers.redelivery``: redelivered messages, one at a time).
``ConsumerRecords`` makes them on first use from the plan and the worker's settings and
finds them by stage or queue, with errors that name what the worker has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from conveyor.errors import ConfigError
from conveyor.plan import MODEL_INPUT, Plan, StageSpec
from conveyor.topology import Topology
from conveyor.topology_setup import stage_queues
from conveyor.transport import Consumer, Delivery
from workers.runner import stage_sources
from workers.settings import WorkerSettings
from workers.settlement import DeadLetter, Lot


@dataclass
class ConsumerRecord:
    queue: str
    #: The plan stage this queue feeds (``plan.stages[0]`` for input shards).
    stage: str
    #: The runner that takes its deliveries (``MODEL_INPUT`` = the ingress).
    runner: str
    prefetch: int
    #: The prefetch asked for (plan, settings or controller); ``prefetch`` may be raised
    #: above it for a while when a join's window fills with waiting parts.
    base_prefetch: int = 0
    consumer: Consumer | None = None
    consuming: bool = False
    lots: set[Lot] = field(default_factory=set)
    #: Called by each of its lots once settled (made once, not per delivery).
    on_settled: Callable[[Lot], None] | None = None
    #: Settles its failed deliveries as dead letters naming the cause (made once).
    dead_letter: DeadLetter | None = None
    parked: list[Delivery] = field(default_factory=list)
    #: Set while no delivery of this queue is unsettled.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: The record of this queue's suspect queue (``workers.redelivery``), consumed with
    #: it; None on a suspect queue's own record.
    suspects: ConsumerRecord | None = None
    #: True on a suspect queue's record.
    suspect: bool = False

    @property
    def suspect_queue(self) -> str:
        """Where this queue's redelivered messages go: its suspect queue (itself for one)."""
        return self.queue if self.suspects is None else self.suspects.queue

    def with_suspects(self) -> list[ConsumerRecord]:
        """This record and its suspect queue's."""
        return [self] if self.suspects is None else [self, self.suspects]


class ConsumerRecords:
    """A worker's consumer records by queue (iterating gives the main queues' records)."""

    def __init__(self, plan: Plan, topology: Topology, settings: WorkerSettings,
                 hosted: Sequence[str], worker_id: str) -> None:
        self._plan = plan
        self._topology = topology
        self._settings = settings
        self._hosted = tuple(hosted)
        self._worker_id = worker_id
        self._by_queue: dict[str, ConsumerRecord] = {}

    def __iter__(self) -> Iterator[ConsumerRecord]:
        return iter(list(self._by_queue.values()))

    @property
    def queues(self) -> list[str]:
        return list(self._by_queue)

    def with_suspects(self) -> list[ConsumerRecord]:
        """Every record, suspect queues' included."""
        return [r for rec in self._by_queue.values() for r in rec.with_suspects()]

    def get(self, queue: str) -> ConsumerRecord:
        try:
            return self._by_queue[queue]
        except KeyError:
            raise ConfigError(
                f"worker {self._worker_id} does not consume queue {queue!r}; it has "
                f"{self.queues}"
            ) from None

    def for_stage(self, stage: str, queue: str | None, *, create: bool) -> list[ConsumerRecord]:
        """The consumer records of ``stage`` (one ``queue`` of it, or the worker's default
        set: every shard, or ``settings.shard``), made on first use when ``create``."""
        if stage not in self._hosted:
            raise ConfigError(
                f"worker {self._worker_id} has not loaded stage {stage!r}; "
                f"it runs {list(self._hosted)}"
            )
        spec = self._plan.stage(stage)
        wanted = self._wanted(spec, queue)
        if create:
            for q in wanted:
                if q not in self._by_queue:
                    self._by_queue[q] = self._new(spec, q)
        return [self._by_queue[q] for q in wanted if q in self._by_queue]

    def _wanted(self, spec: StageSpec, queue: str | None) -> list[str]:
        allowed = stage_queues(self._plan, spec)
        if queue is not None:
            if queue not in allowed:
                raise ConfigError(
                    f"queue {queue!r} is not a queue of stage {spec.name!r}: {allowed}")
            return [queue]
        wanted = [q for q, r in self._by_queue.items() if r.stage == spec.name] or allowed
        shard = self._settings.shard
        sharded = spec.name == self._plan.stages[0].name or spec.is_join
        if shard is not None and wanted is allowed and sharded:
            if shard >= len(allowed):
                raise ConfigError(
                    f"--shard {shard}: stage {spec.name!r} has {len(allowed)} shards")
            wanted = [allowed[shard]]
        return wanted

    def _new(self, spec: StageSpec, queue: str) -> ConsumerRecord:
        s = self._settings
        sched = self._plan.scheduling.for_stage(spec.name)
        prefetch = max(s.prefetch or sched.prefetch, s.max_batch or sched.max_batch)
        if spec.is_join:
            # Parts stay unacked until the join runs: room for every part of a batch.
            prefetch *= len(stage_sources(spec))
        runner = MODEL_INPUT if spec.name == self._plan.stages[0].name else spec.name
        # Suspects one at a time (a join: one request's parts, workers.redelivery.JoinTurns).
        one = len(stage_sources(spec)) if spec.is_join else 1
        suspects = ConsumerRecord(
            self._topology.suspect_queue(queue), spec.name, runner, one, base_prefetch=one,
            suspect=True,
        )
        return ConsumerRecord(
            queue, spec.name, runner, prefetch, base_prefetch=prefetch, suspects=suspects
        )
