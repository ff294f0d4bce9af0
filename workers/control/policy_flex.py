"""The flexible-workers lever: a worker that can run several stages is lent to a backlogged
stage (start consuming it, stop its current one) and sent home when the backlog clears.

A stage counts as backlogged when its backlog would take more than ``backlog_high_s`` to
drain for ``confirm_periods`` periods in a row (or has grown for ``confirm_periods + 1``
periods and passed ``backlog_grow_s``). A lent worker goes back when that backlog is under
``backlog_low_s`` for ``confirm_periods`` periods, it has stayed ``move_dwell_s``, and the
stage's other consumers can carry its load within ``return_headroom`` of their capacity.
At most ``max_moves`` workers are away from home at once.

One period runs three phases: count each stage's streaks (``count_streaks``), send home the
workers whose borrowed stage has cleared (``return_moves``; first, since a return frees a
move slot), then lend idle flexible workers to the stages still backlogged
(``lend_moves``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from conveyor.control import Heartbeat
from workers.control.policy_common import (
    Decision,
    KeyCounts,
    MoveWorker,
    Observation,
    PolicyConfig,
    PolicyState,
    StageLoad,
    stage_loads,
    worker_capacity,
)


@dataclass(frozen=True)
class Streaks:
    """Stage -> consecutive periods with a high / low / growing backlog (this period's)."""

    high: dict[str, int]
    low: dict[str, int]
    grow: dict[str, int]


def flex_moves(
    cfg: PolicyConfig, obs: Observation, state: PolicyState
) -> tuple[list[Decision], PolicyState]:
    """Move flexible workers to backlogged stages and back when the backlog clears."""
    loads = stage_loads(obs)
    streaks = count_streaks(cfg, loads, state)
    served, stage_counts, stage_served = stage_rates(obs, state)
    moved_at, away = away_workers(obs, state)
    returns = return_moves(cfg, obs, loads, streaks, served, moved_at, away)
    for d in returns:
        del moved_at[d.worker_id]
    taken = {d.worker_id for d in returns}
    lent = lend_moves(cfg, obs, loads, streaks, moved_at, taken)
    decisions: list[Decision] = [*returns, *lent]
    return decisions, replace(
        state, high_streak=streaks.high, low_streak=streaks.low, grow_streak=streaks.grow,
        last_depth={stage: load.depth for stage, load in loads.items()}, moved_at=moved_at,
        stage_counts=stage_counts, stage_served=stage_served,
    )


def count_streaks(
    cfg: PolicyConfig, loads: Mapping[str, StageLoad], state: PolicyState
) -> Streaks:
    """Phase 1: extend or reset each stage's high, low and growing streaks."""
    high = dict(state.high_streak)
    low = dict(state.low_streak)
    grow = dict(state.grow_streak)
    for stage, load in loads.items():
        drain = load.drain_s
        high[stage] = high.get(stage, 0) + 1 if drain > cfg.backlog_high_s else 0
        low[stage] = low.get(stage, 0) + 1 if drain < cfg.backlog_low_s else 0
        growing = load.depth > state.last_depth.get(stage, 0)
        grow[stage] = grow.get(stage, 0) + 1 if growing else 0
    return Streaks(high, low, grow)


def away_workers(obs: Observation, state: PolicyState) -> tuple[dict[str, float], set[str]]:
    """The workers away from home now, and when each left (first seen away after a restart;
    a busy worker keeps its time: its return may not be acknowledged yet)."""
    moved_at = dict(state.moved_at)
    away = {wid for wid, hb in obs.workers.items() if _is_away(hb)}
    for wid in away:
        moved_at.setdefault(wid, obs.now)
    for wid in list(moved_at):
        if wid not in away and wid not in obs.busy_workers:
            del moved_at[wid]
    return moved_at, away


def return_moves(
    cfg: PolicyConfig,
    obs: Observation,
    loads: Mapping[str, StageLoad],
    streaks: Streaks,
    served: Mapping[str, float],
    moved_at: Mapping[str, float],
    away: set[str],
) -> list[MoveWorker]:
    """Phase 2: send home every away worker whose borrowed stages can do without it."""
    out = []
    for wid in sorted(away):
        if wid in obs.busy_workers:
            continue
        move = _return_home(cfg, obs, loads, streaks, served, wid, moved_at[wid])
        if move is not None:
            out.append(move)
    return out


def _return_home(
    cfg: PolicyConfig,
    obs: Observation,
    loads: Mapping[str, StageLoad],
    streaks: Streaks,
    served: Mapping[str, float],
    wid: str,
    moved_at: float,
) -> MoveWorker | None:
    hb = obs.workers[wid]
    low = streaks.low
    current = {c.stage for c in hb.stats.consuming}
    foreign = tuple(sorted(current - set(hb.stats.home_stages)))
    if not all(low.get(s, 0) >= cfg.confirm_periods for s in foreign):
        return None
    if obs.now - moved_at < cfg.move_dwell_s:
        return None
    if not all(len(loads[s].consumers) > 1 for s in foreign if s in loads):
        return None  # the stage would be left without a consumer
    others = {s: loads[s].capacity - worker_capacity(hb, s) for s in foreign if s in loads}
    if not all(s in served and served[s] <= cfg.return_headroom * others[s] for s in others):
        return None  # the others could not carry the stage's load without it
    figures = ", ".join(
        f"{s}: depth {loads[s].depth}, drain {loads[s].drain_s:.2f} s for "
        f"{low.get(s, 0)} periods, {served[s]:.1f} req/s served, the others' capacity "
        f"{others[s]:.1f}" for s in others
    )
    home = tuple(s for s in hb.stats.home_stages if s not in current)
    return MoveWorker(
        wid, foreign, home, True,
        f"backlog cleared ({figures}; < {cfg.backlog_low_s:g} s), away "
        f"{obs.now - moved_at:.1f} s >= dwell {cfg.move_dwell_s:g} s",
    )


def lend_moves(
    cfg: PolicyConfig,
    obs: Observation,
    loads: Mapping[str, StageLoad],
    streaks: Streaks,
    moved_at: dict[str, float],
    taken: set[str],
) -> list[MoveWorker]:
    """Phase 3: lend an idle flexible worker to each backlogged stage, worst first, while
    move slots remain. Records the lent workers in ``moved_at`` and ``taken`` and resets
    the streaks of the stages helped."""
    high, grow = streaks.high, streaks.grow
    slots = cfg.max_moves - len(moved_at)
    out = []
    for stage in backlogged_stages(cfg, loads, streaks):
        if slots <= 0:
            break
        pick = _idle_lender(cfg, obs, loads, stage, taken | set(moved_at))
        if pick is None:
            continue
        wid, donor_stages = pick
        load = loads[stage]
        out.append(MoveWorker(
            wid, donor_stages, (stage,), False,
            f"stage {stage!r} backlog {load.depth} requests ({load.messages} msgs) at "
            f"{load.capacity:.1f} req/s "
            f"= drain {load.drain_s:.2f} s (> {cfg.backlog_high_s:g} s for {high[stage]} "
            f"periods, growing for {grow[stage]}); {wid} idle on {list(donor_stages)}",
        ))
        taken.add(wid)
        moved_at[wid] = obs.now
        slots -= 1
        high[stage] = grow[stage] = 0
    return out


def backlogged_stages(
    cfg: PolicyConfig, loads: Mapping[str, StageLoad], streaks: Streaks
) -> list[str]:
    """The stages backlogged for long enough (or growing for long enough), worst first."""

    def backlogged_now(s: str) -> bool:
        if streaks.high.get(s, 0) >= cfg.confirm_periods:
            return True
        return (streaks.grow.get(s, 0) > cfg.confirm_periods
                and loads[s].drain_s > cfg.backlog_grow_s)

    return sorted((s for s in loads if backlogged_now(s)), key=lambda s: -loads[s].drain_s)


def _idle_lender(
    cfg: PolicyConfig,
    obs: Observation,
    loads: Mapping[str, StageLoad],
    stage: str,
    excluded: set[str],
) -> tuple[str, tuple[str, ...]] | None:
    """The worker that can run ``stage`` and whose current stages miss it least (all of
    them drained and with another consumer), with those stages; None if there is none."""
    best: tuple[float, str, tuple[str, ...]] | None = None
    for wid, hb in sorted(obs.workers.items()):
        if wid in excluded or wid in obs.busy_workers:
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
    return None if best is None else (best[1], best[2])


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
