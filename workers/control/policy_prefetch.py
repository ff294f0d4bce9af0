"""The prefetch lever: how many unacknowledged messages each consumer of a queue may hold.

* static (and the hybrid's start): each stage's planned prefetch, applied once per worker
  incarnation and queue (inside the plan's bounds for hybrid);
* proportional (dynamic, hybrid): each consumer holds about ``horizon_s`` seconds of its own
  work, so its prefetch is proportional to its measured rate (``1 / service time per
  request``), at least its mean batch size, clamped to ``[prefetch_min, prefetch_max]``
  (the plan's bounds for hybrid). A prefetch changes only by at least
  ``prefetch_deadband`` (relative) and at most every ``prefetch_dwell_s``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from workers.control.policy_common import (
    Decision,
    Observation,
    PolicyConfig,
    PolicyState,
    SetPrefetch,
    worker_capacity,
)


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
