"""Scheduling policies as pure functions: an observation and the previous state in, decisions
(each with its reason and figures) and the next state out. No broker, no clock, no I/O:
``workers.control.controller`` gathers the observation and applies the decisions.

Three levers (docs/scheduling.md):

* prefetch: each consumer of a queue holds about ``horizon_s`` seconds of its own work, so
  its prefetch is proportional to its measured rate (``1 / service time per request``),
  at least its mean batch size, clamped to ``[prefetch_min, prefetch_max]``;
* flexible workers: a worker that can run several stages is moved (start consuming the
  backlogged stage, stop its current one) when a stage's backlog would take more than
  ``backlog_high_s`` to drain for ``confirm_periods`` periods in a row (or has grown for
  ``confirm_periods + 1`` periods and passed ``backlog_grow_s``), and goes back when
  that backlog is under ``backlog_low_s`` again and it has stayed ``move_dwell_s``;
* partitions: a hash/range routing key is moved from an input shard whose load exceeds its
  capacity to the shard where the move lowers the worst utilisation most, provided the
  receiving shard stays within its capacity (else the move would only move the hot spot).

Hysteresis: a prefetch changes only by at least ``prefetch_deadband`` (relative) and at
most every ``prefetch_dwell_s``; moves need ``confirm_periods`` of evidence and a dwell.
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


# ---------------------------------------------------------------------------------------
# the policies


def decide(
    cfg: PolicyConfig, obs: Observation, state: PolicyState
) -> tuple[list[Decision], PolicyState]:
    """One period of the configured policy."""
    if cfg.kind == "static":
        return static_prefetch(cfg, obs, state)
    decisions: list[Decision] = []
    if cfg.kind == "hybrid":
        baseline, state = static_prefetch(cfg, obs, state)
        decisions += baseline
    done = {(d.worker_id, d.queue) for d in decisions if isinstance(d, SetPrefetch)}
    out, state = proportional_prefetch(cfg, obs, state, skip=done)
    decisions += out
    moves, state = flex_moves(cfg, obs, state)
    decisions += moves
    parts, state = partition_moves(cfg, obs, state)
    decisions += parts
    return decisions, state


def static_prefetch(
    cfg: PolicyConfig, obs: Observation, state: PolicyState
) -> tuple[list[Decision], PolicyState]:
    """Apply each stage's planned prefetch once per worker incarnation and queue."""
    decisions: list[Decision] = []
    applied = set(state.static_applied)
    for wid, hb in sorted(obs.workers.items()):
        if wid in obs.busy_workers:
            continue
        for c in hb.stats.consuming:
            key = (wid, hb.incarnation, c.queue)
            if key in applied:
                continue
            applied.add(key)
            b = cfg.bounds.get(c.stage)
            if b is None:
                continue
            target = b.baseline
            if cfg.kind == "hybrid":  # the baseline inside the plan's bounds
                target = max(b.floor, min(b.hi, max(b.lo, target)))
            if target == c.prefetch:
                continue
            decisions.append(
                SetPrefetch(
                    wid, c.queue, c.stage, target, c.prefetch,
                    f"{cfg.kind} baseline: plan prefetch for stage {c.stage!r} is "
                    f"{b.baseline} (applied {target}), worker has {c.prefetch}",
                )
            )
    return decisions, replace(state, static_applied=frozenset(applied))


def proportional_prefetch(
    cfg: PolicyConfig,
    obs: Observation,
    state: PolicyState,
    skip: set[tuple[str, str]] | None = None,
) -> tuple[list[Decision], PolicyState]:
    """Prefetch = ceil(rate * horizon) per consumer, in bounds, with deadband and dwell."""
    decisions: list[Decision] = []
    changed = dict(state.prefetch_changed)
    for wid, hb in sorted(obs.workers.items()):
        if wid in obs.busy_workers:
            continue
        for c in hb.stats.consuming:
            if skip and (wid, c.queue) in skip:
                continue
            rate = worker_capacity(hb, c.stage)
            if rate <= 0:
                continue  # not measured yet: keep what it has
            lo, hi = cfg.prefetch_bounds(c.stage)
            st = hb.stats.stage(c.stage)
            # prefetch counts messages; a stage queue's message carries a whole batch (a
            # join queue's request comes in one message per source: less than 1)
            rows = obs.rows_per_message.get(c.queue, 1.0) or 1.0
            batch = math.ceil(st.mean_batch / rows) if st is not None else 1
            # never below the batches it makes: a smaller prefetch would shrink them; and
            # never below what the stage needs to work at all (a join's parts)
            target = min(hi, max(lo, batch, math.ceil(rate * cfg.horizon_s / rows)))
            target = max(target, cfg.prefetch_floor(c.stage))
            delta = abs(target - c.prefetch)
            in_bounds = lo <= c.prefetch <= hi and c.prefetch >= cfg.prefetch_floor(c.stage)
            if delta == 0 or (in_bounds and delta < max(2, cfg.prefetch_deadband * c.prefetch)):
                continue
            last = changed.get((wid, c.queue))
            if last is not None and obs.now - last < cfg.prefetch_dwell_s:
                continue
            changed[(wid, c.queue)] = obs.now
            decisions.append(
                SetPrefetch(
                    wid, c.queue, c.stage, target, c.prefetch,
                    f"rate {rate:.1f} req/s x horizon {cfg.horizon_s:g} s"
                    + (f" / {rows:.1f} requests per message" if rows != 1.0 else "")
                    + f" -> {target} (bounds [{lo}, {hi}], was {c.prefetch})",
                )
            )
    return decisions, replace(state, prefetch_changed=changed)


def flex_moves(
    cfg: PolicyConfig, obs: Observation, state: PolicyState
) -> tuple[list[Decision], PolicyState]:
    """Move flexible workers to backlogged stages and back when the backlog clears."""
    loads = stage_loads(obs)
    high = dict(state.high_streak)
    low = dict(state.low_streak)
    grow = dict(state.grow_streak)
    for stage, load in loads.items():
        drain = load.drain_s
        high[stage] = high.get(stage, 0) + 1 if drain > cfg.backlog_high_s else 0
        low[stage] = low.get(stage, 0) + 1 if drain < cfg.backlog_low_s else 0
        growing = load.depth > state.last_depth.get(stage, 0)
        grow[stage] = grow.get(stage, 0) + 1 if growing else 0
    last_depth = {stage: load.depth for stage, load in loads.items()}
    served, stage_counts, stage_served = stage_rates(obs, state)
    moved_at = dict(state.moved_at)
    away = {wid for wid, hb in obs.workers.items() if _is_away(hb)}
    for wid in away:
        moved_at.setdefault(wid, obs.now)
    for wid in list(moved_at):
        if wid not in away and wid not in obs.busy_workers:
            del moved_at[wid]

    decisions: list[Decision] = []
    taken: set[str] = set()
    # returns first: they free a move slot
    for wid in sorted(away):
        hb = obs.workers[wid]
        if wid in obs.busy_workers:
            continue
        current = {c.stage for c in hb.stats.consuming}
        foreign = tuple(sorted(current - set(hb.stats.home_stages)))
        if not all(low.get(s, 0) >= cfg.confirm_periods for s in foreign):
            continue
        if obs.now - moved_at[wid] < cfg.move_dwell_s:
            continue
        if not all(len(loads[s].consumers) > 1 for s in foreign if s in loads):
            continue  # the stage would be left without a consumer
        others = {s: loads[s].capacity - worker_capacity(hb, s) for s in foreign if s in loads}
        if not all(s in served and served[s] <= cfg.return_headroom * others[s]
                   for s in others):
            continue  # the others could not carry the stage's load without it
        figures = ", ".join(
            f"{s}: depth {loads[s].depth}, drain {loads[s].drain_s:.2f} s for "
            f"{low.get(s, 0)} periods, {served[s]:.1f} req/s served, the others' capacity "
            f"{others[s]:.1f}" for s in others
        )
        home = tuple(s for s in hb.stats.home_stages if s not in current)
        decisions.append(
            MoveWorker(
                wid, foreign, home, True,
                f"backlog cleared ({figures}; < {cfg.backlog_low_s:g} s), away "
                f"{obs.now - moved_at[wid]:.1f} s >= dwell {cfg.move_dwell_s:g} s",
            )
        )
        taken.add(wid)
        del moved_at[wid]

    slots = cfg.max_moves - len(moved_at)
    def backlogged_now(s: str) -> bool:
        if high.get(s, 0) >= cfg.confirm_periods:
            return True
        return grow.get(s, 0) > cfg.confirm_periods and loads[s].drain_s > cfg.backlog_grow_s

    backlogged = sorted((s for s in loads if backlogged_now(s)), key=lambda s: -loads[s].drain_s)
    for stage in backlogged:
        if slots <= 0:
            break
        load = loads[stage]
        best: tuple[float, str, tuple[str, ...]] | None = None
        for wid, hb in sorted(obs.workers.items()):
            if wid in taken or wid in obs.busy_workers or wid in moved_at:
                continue
            if stage not in hb.stats.stages_available:
                continue
            now_on = tuple(sorted({c.stage for c in hb.stats.consuming}))
            if stage in now_on:
                continue
            donors = [loads[s] for s in now_on if s in loads]
            if any(d.drain_s >= cfg.backlog_low_s or len(d.consumers) < 2 for d in donors):
                continue
            pressure = max((d.drain_s for d in donors), default=0.0)
            if best is None or pressure < best[0]:
                best = (pressure, wid, now_on)
        if best is None:
            continue
        _, wid, donor_stages = best
        decisions.append(
            MoveWorker(
                wid, donor_stages, (stage,), False,
                f"stage {stage!r} backlog {load.depth} requests ({load.messages} msgs) at "
                f"{load.capacity:.1f} req/s "
                f"= drain {load.drain_s:.2f} s (> {cfg.backlog_high_s:g} s for {high[stage]} "
                f"periods, growing for {grow[stage]}); {wid} idle on {list(donor_stages)}",
            )
        )
        taken.add(wid)
        moved_at[wid] = obs.now
        slots -= 1
        high[stage] = grow[stage] = 0
    return decisions, replace(state, high_streak=high, low_streak=low, grow_streak=grow,
                              last_depth=last_depth, moved_at=moved_at,
                              stage_counts=stage_counts, stage_served=stage_served)


def _is_away(hb: Heartbeat) -> bool:
    """True when a worker consumes a stage that is not one of its home stages."""
    home = set(hb.stats.home_stages)
    return any(c.stage not in home for c in hb.stats.consuming)


def stage_rates(
    obs: Observation, state: PolicyState
) -> tuple[dict[str, float], dict[str, KeyCounts], dict[str, Mapping[str, float]]]:
    """Requests per second served on each stage, from the deltas of the workers' request
    counters between heartbeats (a worker without a newer heartbeat keeps its last rates).
    Returns the stage totals, the new baselines and the rates per worker."""
    counts: dict[str, KeyCounts] = {}
    per_worker: dict[str, Mapping[str, float]] = {}
    for wid, hb in obs.workers.items():
        now = KeyCounts(hb.incarnation, hb.sent_at, {s.stage: s.requests for s in hb.stats.stages})
        before = state.stage_counts.get(wid)
        counts[wid] = now
        if before is None or before.incarnation != now.incarnation:
            continue  # a baseline only
        if now.at <= before.at:
            counts[wid] = before
            if wid in state.stage_served:
                per_worker[wid] = state.stage_served[wid]
            continue
        dt = now.at - before.at
        per_worker[wid] = {
            st: max(0, n - before.counts.get(st, 0)) / dt for st, n in now.counts.items()
        }
    totals: dict[str, float] = {}
    for rates in per_worker.values():
        for st, r in rates.items():
            totals[st] = totals.get(st, 0.0) + r
    return totals, counts, per_worker


def key_rates(
    obs: Observation, state: PolicyState
) -> tuple[dict[str, float], dict[str, KeyCounts]]:
    """Deliveries per second of each input routing key since the previous heartbeats."""
    rates: dict[str, float] = {}
    counts: dict[str, KeyCounts] = {}
    for wid, hb in obs.workers.items():
        now = KeyCounts(hb.incarnation, hb.sent_at, dict(hb.stats.routing_keys))
        counts[wid] = now
        before = state.key_counts.get(wid)
        if before is None or before.incarnation != now.incarnation:
            continue  # first sight of this incarnation: a baseline only
        if now.at <= before.at:
            counts[wid] = before  # no newer heartbeat: keep the older baseline
            continue
        dt = now.at - before.at
        for key, n in now.counts.items():
            d = n - before.counts.get(key, 0)
            if d > 0:
                rates[key] = rates.get(key, 0.0) + d / dt
    return rates, counts


def partition_moves(
    cfg: PolicyConfig, obs: Observation, state: PolicyState
) -> tuple[list[Decision], PolicyState]:
    """Move one hot routing key per period off an overloaded input shard."""
    rates, counts = key_rates(obs, state)
    state = replace(state, key_counts=counts)
    if len(obs.input_queues) < 2 or not obs.partitions or not rates:
        return [], state
    stage = obs.queue_stage.get(obs.input_queues[0], "")
    capacity: dict[str, float] = {q: 0.0 for q in obs.input_queues}
    for hb in obs.workers.values():
        mine = [c.queue for c in hb.stats.consuming if c.queue in capacity]
        for q in mine:
            capacity[q] += worker_capacity(hb, stage) / len(mine)
    # arrival rate per shard: deliveries of its keys, plus backlog growth is not needed: a
    # shard that cannot keep up shows it in its drain time, which we add as excess load.
    arrival = {q: 0.0 for q in obs.input_queues}
    for key, r in rates.items():
        home = obs.partitions.get(key)
        if home in arrival:
            arrival[home] += r
    util: dict[str, float] = {}
    for q in obs.input_queues:
        depth = obs.queues[q].depth if q in obs.queues else 0
        cap = capacity[q]
        util[q] = (arrival[q] + depth / max(cfg.backlog_high_s, 1e-9)) / cap if cap > 0 else (
            math.inf if depth or arrival[q] else 0.0)
    streak = {q: state.shard_streak.get(q, 0) + 1 if util[q] > cfg.shard_high else 0
              for q in obs.input_queues}
    state = replace(state, shard_streak=streak)
    hot = max(obs.input_queues, key=lambda q: util[q])
    if streak[hot] < cfg.confirm_periods or capacity[hot] <= 0:
        return [], state
    worst = util[hot]
    best: tuple[float, str, str] | None = None
    for key, q in sorted(obs.partitions.items()):
        if q != hot or rates.get(key, 0.0) <= 0:
            continue
        last = state.key_moved_at.get(key)
        if last is not None and obs.now - last < cfg.partition_dwell_s:
            continue
        a = rates[key]
        for target in obs.input_queues:
            if target == hot or capacity[target] <= 0:
                continue
            lands = util[target] + a / capacity[target]
            if lands > cfg.shard_high:
                continue  # it would only move the hot spot
            after = max(util[hot] - a / capacity[hot], lands)
            if best is None or after < best[0]:
                best = (after, key, target)
    if best is None or best[0] > worst * (1 - cfg.partition_min_gain):
        return [], state
    after, key, target = best
    moved = dict(state.key_moved_at)
    moved[key] = obs.now
    decision = MovePartition(
        key, hot, target,
        f"shard {hot} at {worst:.0%} of capacity ({arrival[hot]:.1f} req/s, depth "
        f"{obs.queues[hot].depth if hot in obs.queues else 0}, capacity {capacity[hot]:.1f}) "
        f"for {streak[hot]} periods; {key} carries {rates[key]:.1f} req/s; {target} at "
        f"{util[target]:.0%}; worst after the move {after:.0%}",
    )
    streak = dict(streak)
    streak[hot] = 0
    return [decision], replace(state, key_moved_at=moved, shard_streak=streak)
