"""Scheduling policies as pure functions: an observation and the previous state in, decisions
(each with its reason and figures) and the next state out. No broker, no clock, no I/O:
``workers.control.controller`` gathers the observation and applies the decisions.

Three levers (docs/scheduling.md), a module each:

* prefetch (``policy_prefetch``): each consumer of a queue holds about ``horizon_s``
  seconds of its own work, so its prefetch is proportional to its measured rate
  (``1 / service time per request``), at least its mean batch size, clamped to
  ``[prefetch_min, prefetch_max]``;
* flexible workers (``policy_flex``): a worker that can run several stages is moved (start
  consuming the backlogged stage, stop its current one) when a stage's backlog would take
  more than ``backlog_high_s`` to drain for ``confirm_periods`` periods in a row (or has
  grown for ``confirm_periods + 1`` periods and passed ``backlog_grow_s``), and goes back
  when that backlog is under ``backlog_low_s`` again and it has stayed ``move_dwell_s``;
* partitions (``policy_partitions``): a hash/range routing key is moved from an input shard
  whose load exceeds its capacity to the shard where the move lowers the worst utilisation
  most, provided the receiving shard stays within its capacity (else the move would only
  move the hot spot).

Hysteresis: a prefetch changes only by at least ``prefetch_deadband`` (relative) and at
most every ``prefetch_dwell_s``; moves need ``confirm_periods`` of evidence and a dwell.
What the levers share (configuration, observation, decisions, state) is in
``policy_common``; this module runs them in order (``decide``) and is the one import the
rest of the code needs.
"""

from __future__ import annotations

from workers.control.policy_common import (
    POLICIES,
    Bounds,
    Decision,
    KeyCounts,
    MovePartition,
    MoveWorker,
    Observation,
    PolicyConfig,
    PolicyKind,
    PolicyState,
    SetPrefetch,
    StageLoad,
    consumers_of,
    message_rows,
    stage_loads,
    worker_capacity,
)
from workers.control.policy_flex import flex_moves, stage_rates
from workers.control.policy_partitions import key_rates, partition_moves
from workers.control.policy_prefetch import proportional_prefetch, static_prefetch

__all__ = [
    "POLICIES",
    "Bounds",
    "Decision",
    "KeyCounts",
    "MovePartition",
    "MoveWorker",
    "Observation",
    "PolicyConfig",
    "PolicyKind",
    "PolicyState",
    "SetPrefetch",
    "StageLoad",
    "consumers_of",
    "decide",
    "flex_moves",
    "key_rates",
    "message_rows",
    "partition_moves",
    "proportional_prefetch",
    "stage_loads",
    "stage_rates",
    "static_prefetch",
    "worker_capacity",
]


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
