"""The partitions lever: a hash/range routing key is moved from an input shard whose load
exceeds its capacity to the shard where the move lowers the worst utilisation most,
provided the receiving shard stays within its capacity (else the move would only move the
hot spot). One key per period; a shard must be overloaded (utilisation over
``shard_high``) for ``confirm_periods`` periods, the move must lower the worst utilisation
by ``partition_min_gain``, and a key moves at most every ``partition_dwell_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from workers.control.policy_common import (
    Decision,
    KeyCounts,
    MovePartition,
    Observation,
    PolicyConfig,
    PolicyState,
    worker_capacity,
)


@dataclass(frozen=True)
class ShardLoads:
    """Per input shard queue: its consumers' capacity (requests/s), the arrival rate of its
    routing keys, and its utilisation (arrivals plus backlog over capacity)."""

    capacity: dict[str, float]
    arrival: dict[str, float]
    util: dict[str, float]


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
    shards = shard_loads(cfg, obs, rates)
    streak = {q: state.shard_streak.get(q, 0) + 1 if shards.util[q] > cfg.shard_high else 0
              for q in obs.input_queues}
    state = replace(state, shard_streak=streak)
    hot = max(obs.input_queues, key=lambda q: shards.util[q])
    if streak[hot] < cfg.confirm_periods or shards.capacity[hot] <= 0:
        return [], state
    worst = shards.util[hot]
    best = best_key_move(cfg, obs, state, rates, shards, hot)
    if best is None or best[0] > worst * (1 - cfg.partition_min_gain):
        return [], state
    after, key, target = best
    moved = dict(state.key_moved_at)
    moved[key] = obs.now
    decision = MovePartition(
        key, hot, target,
        f"shard {hot} at {worst:.0%} of capacity ({shards.arrival[hot]:.1f} req/s, depth "
        f"{obs.queues[hot].depth if hot in obs.queues else 0}, capacity "
        f"{shards.capacity[hot]:.1f}) for {streak[hot]} periods; {key} carries "
        f"{rates[key]:.1f} req/s; {target} at {shards.util[target]:.0%}; worst after the "
        f"move {after:.0%}",
    )
    streak = dict(streak)
    streak[hot] = 0
    return [decision], replace(state, key_moved_at=moved, shard_streak=streak)


def shard_loads(cfg: PolicyConfig, obs: Observation, rates: Mapping[str, float]) -> ShardLoads:
    """Capacity, arrival rate and utilisation of every input shard queue."""
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
    return ShardLoads(capacity, arrival, util)


def best_key_move(
    cfg: PolicyConfig,
    obs: Observation,
    state: PolicyState,
    rates: Mapping[str, float],
    shards: ShardLoads,
    hot: str,
) -> tuple[float, str, str] | None:
    """(worst utilisation after the move, routing key, target shard) of the move off
    ``hot`` that lowers the worst utilisation most without overloading its target."""
    capacity, util = shards.capacity, shards.util
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
    return best
