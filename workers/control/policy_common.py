"""What the scheduling policies share: their configuration, the observation they read, the
decisions they return, the state they carry between periods, and the figures derived from
an observation (stage loads, capacities, requests per message). Pure data and arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from conveyor.control import Heartbeat
from conveyor.plan import Plan
from conveyor.transport import QueueStats

PolicyKind = Literal["static", "dynamic", "hybrid"]
POLICIES: tuple[PolicyKind, ...] = ("static", "dynamic", "hybrid")


@dataclass(frozen=True)
class Bounds:
    """Prefetch bounds and baseline of one stage."""

    baseline: int
    lo: int
    hi: int
    #: The least prefetch the stage works with, whatever the bounds: a join stage holds
    #: the parts of a batch unacked until all arrive (``max_batch x sources``).
    floor: int = 1


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy runs and its knobs (docs/scheduling.md describes each)."""

    kind: PolicyKind = "dynamic"
    #: Per stage: prefetch baseline (static, hybrid start) and bounds (hybrid).
    bounds: Mapping[str, Bounds] = field(default_factory=dict)
    #: Bounds of the dynamic policy (all stages).
    prefetch_min: int = 1
    prefetch_max: int = 64
    horizon_s: float = 0.2
    prefetch_deadband: float = 0.25
    prefetch_dwell_s: float = 2.0
    backlog_high_s: float = 1.0
    backlog_low_s: float = 0.2
    #: A backlog that grew for ``confirm_periods + 1`` periods in a row counts once its
    #: drain time passes this (a growing backlog is caught before it is large).
    backlog_grow_s: float = 0.3
    confirm_periods: int = 2
    move_dwell_s: float = 3.0
    #: A moved worker goes back only if the others can carry the stage's current
    #: throughput at no more than this fraction of their capacity (no flapping).
    return_headroom: float = 0.8
    #: Flexible workers away from home at once.
    max_moves: int = 1
    #: A shard is overloaded above this utilisation (arrival rate / capacity) ...
    shard_high: float = 1.0
    #: ... and a partition move must lower the worst utilisation by this fraction.
    partition_min_gain: float = 0.1
    partition_dwell_s: float = 5.0

    @classmethod
    def from_plan(cls, plan: Plan, kind: PolicyKind, **overrides: object) -> PolicyConfig:
        sched = plan.scheduling
        bounds = {}
        for s in plan.stages:
            st = sched.for_stage(s.name)
            # as the worker sets it up: at least a batch, times the parts a join waits for
            parts = len({i.source for i in s.inputs}) if s.is_join else 1
            bounds[s.name] = Bounds(
                baseline=max(st.prefetch, st.max_batch) * parts,
                lo=st.prefetch_min,
                hi=st.prefetch_max,
                floor=st.max_batch * parts if parts > 1 else 1,
            )
        cfg = cls(kind=kind, bounds=bounds)
        if kind == "hybrid":
            cfg = replace(cfg, max_moves=sched.max_moves)
        return replace(cfg, **overrides)  # type: ignore[arg-type]

    def prefetch_bounds(self, stage: str) -> tuple[int, int]:
        b = self.bounds.get(stage)
        if self.kind == "hybrid" and b is not None:
            return b.lo, b.hi
        return self.prefetch_min, self.prefetch_max

    def prefetch_floor(self, stage: str) -> int:
        b = self.bounds.get(stage)
        return b.floor if b is not None else 1


# ---------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class Observation:
    """What the controller sees at one instant."""

    now: float
    #: Latest heartbeat of every live worker.
    workers: Mapping[str, Heartbeat]
    queues: Mapping[str, QueueStats]
    #: queue -> stage it feeds.
    queue_stage: Mapping[str, str]
    #: Input shard queues in shard order (empty: no input shards to balance).
    input_queues: tuple[str, ...] = ()
    #: routing key -> shard queue now (the partition map in force); empty for random.
    partitions: Mapping[str, str] = field(default_factory=dict)
    #: Workers with commands sent but not yet acknowledged: left alone this period.
    busy_workers: frozenset[str] = frozenset()
    #: queue -> requests one of its messages carries (a stage publishes a whole batch in
    #: one message to the next stage; ``message_rows``); 1 for a queue not listed.
    rows_per_message: Mapping[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# outputs


@dataclass(frozen=True)
class SetPrefetch:
    worker_id: str
    queue: str
    stage: str
    prefetch: int
    previous: int
    reason: str


@dataclass(frozen=True)
class MoveWorker:
    worker_id: str
    #: Stages to stop consuming.
    from_stages: tuple[str, ...]
    #: Stages to start consuming.
    to_stages: tuple[str, ...]
    returning: bool
    reason: str


@dataclass(frozen=True)
class MovePartition:
    routing_key: str
    from_queue: str
    to_queue: str
    reason: str


Decision = SetPrefetch | MoveWorker | MovePartition


@dataclass(frozen=True)
class KeyCounts:
    """Routing-key delivery counters of one worker incarnation at one time."""

    incarnation: str
    at: float
    counts: Mapping[str, int]


@dataclass(frozen=True)
class PolicyState:
    """Everything a policy remembers between periods; rebuilt from scratch after a restart."""

    #: (worker, queue) -> time of the last prefetch change.
    prefetch_changed: Mapping[tuple[str, str], float] = field(default_factory=dict)
    #: (worker, incarnation, queue) the static baseline was applied to.
    static_applied: frozenset[tuple[str, str, str]] = frozenset()
    #: stage -> consecutive periods with a high / low / growing backlog.
    high_streak: Mapping[str, int] = field(default_factory=dict)
    low_streak: Mapping[str, int] = field(default_factory=dict)
    grow_streak: Mapping[str, int] = field(default_factory=dict)
    #: stage -> its queue depth at the previous period.
    last_depth: Mapping[str, int] = field(default_factory=dict)
    #: worker -> time it was moved (first seen away from home after a restart).
    moved_at: Mapping[str, float] = field(default_factory=dict)
    #: routing key -> time it was last moved.
    key_moved_at: Mapping[str, float] = field(default_factory=dict)
    #: worker -> its last routing-key counters (for per-partition rates).
    key_counts: Mapping[str, KeyCounts] = field(default_factory=dict)
    #: worker -> its last per-stage request counters and the rates they gave.
    stage_counts: Mapping[str, KeyCounts] = field(default_factory=dict)
    stage_served: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: shard queue -> consecutive periods overloaded.
    shard_streak: Mapping[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# derived figures


@dataclass(frozen=True)
class StageLoad:
    stage: str
    #: Requests waiting in its queues (messages x the requests each carries).
    depth: int
    consumers: tuple[str, ...]
    #: Sum of the measured capacities (requests/s) of its consumers.
    capacity: float
    #: Messages waiting in its queues (what the broker counts).
    messages: int = 0

    @property
    def drain_s(self) -> float:
        """Seconds the backlog takes to drain at full capacity (inf: no capacity)."""
        if self.depth == 0:
            return 0.0
        return self.depth / self.capacity if self.capacity > 0 else math.inf


def worker_capacity(hb: Heartbeat, stage: str) -> float:
    st = hb.stats.stage(stage)
    return st.capacity_rps if st is not None else 0.0


def consumers_of(obs: Observation, queue: str) -> list[tuple[str, int]]:
    """(worker, prefetch) of every live worker consuming ``queue``."""
    out = []
    for wid, hb in sorted(obs.workers.items()):
        for c in hb.stats.consuming:
            if c.queue == queue:
                out.append((wid, c.prefetch))
    return out


def stage_loads(obs: Observation) -> dict[str, StageLoad]:
    stages: dict[str, list[str]] = {}
    for q, s in obs.queue_stage.items():
        stages.setdefault(s, []).append(q)
    loads = {}
    for stage, queues in stages.items():
        messages = sum(obs.queues[q].depth for q in queues if q in obs.queues)
        depth = round(sum(obs.queues[q].depth * obs.rows_per_message.get(q, 1.0)
                          for q in queues if q in obs.queues))
        workers = sorted(
            {
                wid
                for wid, hb in obs.workers.items()
                if any(c.stage == stage for c in hb.stats.consuming)
            }
        )
        capacity = sum(worker_capacity(obs.workers[w], stage) for w in workers)
        loads[stage] = StageLoad(stage, depth, tuple(workers), capacity, messages)
    return loads


def message_rows(
    workers: Mapping[str, Heartbeat],
    queue_stage: Mapping[str, str],
    feeds: Mapping[str, tuple[str, ...]],
) -> dict[str, float]:
    """Requests per message of each queue, for queues whose messages carry batches.

    ``feeds`` maps a stage to the stages whose batches its queue messages carry (empty
    for a stage fed one request per message: the input shards). A producer's batch size
    is the mean over the workers running it (``rows / batches``); a join queue gets one
    message per batch from each of its producers, so it carries ``1 / sum(1 / b)``
    requests per message. A producer nobody reports on counts as 1 request a message.
    """
    batch: dict[str, float] = {}
    for stage in {p for ps in feeds.values() for p in ps}:
        rows = batches = 0.0
        for hb in workers.values():
            st = hb.stats.stage(stage)
            if st is not None and st.batches > 0 and st.mean_batch > 0:
                rows += st.mean_batch * st.batches
                batches += st.batches
        batch[stage] = max(1.0, rows / batches) if batches else 1.0
    out = {}
    for q, stage in queue_stage.items():
        producers = feeds.get(stage, ())
        if producers:
            out[q] = 1.0 / sum(1.0 / batch[p] for p in producers)
    return out
