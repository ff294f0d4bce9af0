"""The scheduling policies as pure functions: no broker, no clock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from conveyor.control import Heartbeat, QueueConsumption, StageStats, WorkerStats
from conveyor.plan import MODEL_INPUT, Scheduling, StageInput, StageSchedule, TensorSpec
from conveyor.transport import QueueStats
from tests.support.synthetic import synthetic_plan
from workers.control.policies import (
    Bounds,
    MovePartition,
    MoveWorker,
    Observation,
    PolicyConfig,
    PolicyState,
    SetPrefetch,
    decide,
    flex_moves,
    key_rates,
    message_rows,
    partition_moves,
    proportional_prefetch,
    stage_loads,
    static_prefetch,
)


def hb(
    wid: str,
    consuming: dict[str, tuple[str, int]],
    service: dict[str, float],
    *,
    home: tuple[str, ...] | None = None,
    can: tuple[str, ...] | None = None,
    keys: dict[str, int] | None = None,
    at: float = 0.0,
    incarnation: str = "i1",
    requests: int = 100,
) -> Heartbeat:
    """A heartbeat: consuming = {queue: (stage, prefetch)}, service = {stage: s/request}."""
    stages_on = tuple(dict.fromkeys(s for s, _ in consuming.values()))
    return Heartbeat(
        worker_id=wid, incarnation=incarnation, seq=1, sent_at=at, period_s=1.0,
        stats=WorkerStats(
            stages_available=can or tuple(service),
            home_stages=home if home is not None else stages_on,
            consuming=tuple(QueueConsumption(q, s, p) for q, (s, p) in consuming.items()),
            stages=tuple(StageStats(s, requests, requests, service_s_per_request=t)
                         for s, t in service.items()),
            routing_keys=keys or {},
        ),
    )


def obs(workers: list[Heartbeat], depths: dict[str, int], now: float = 100.0,
        **kw: object) -> Observation:
    queue_stage = kw.pop("queue_stage", None) or {q: q.removeprefix("q.") for q in depths}
    return Observation(
        now=now, workers={h.worker_id: h for h in workers},
        queues={q: QueueStats(q, d, 0) for q, d in depths.items()},
        queue_stage=queue_stage,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# -- prefetch ---------------------------------------------------------------------------


def three_workers(prefetch: int = 50) -> list[Heartbeat]:
    return [
        hb("fast1", {"q.s": ("s", prefetch)}, {"s": 0.01}),
        hb("fast2", {"q.s": ("s", prefetch)}, {"s": 0.01}),
        hb("slow", {"q.s": ("s", prefetch)}, {"s": 0.04}),
    ]


def test_prefetch_is_proportional_to_rate() -> None:
    cfg = PolicyConfig(horizon_s=0.2)
    decisions, _ = proportional_prefetch(cfg, obs(three_workers(), {"q.s": 0}), PolicyState())
    got = {d.worker_id: d.prefetch for d in decisions}
    assert got == {"fast1": 20, "fast2": 20, "slow": 5}
    slow_share = got["slow"] / sum(got.values())
    assert slow_share == pytest.approx(25 / 225, abs=0.02)
    assert all("req/s" in d.reason for d in decisions)


def test_prefetch_within_bounds() -> None:
    cfg = PolicyConfig(horizon_s=10.0, prefetch_max=64)
    decisions, _ = proportional_prefetch(cfg, obs(three_workers(), {"q.s": 0}), PolicyState())
    assert {d.prefetch for d in decisions} == {64}  # 1000 and 250 requests, capped
    cfg = PolicyConfig(horizon_s=0.001, prefetch_min=3)
    decisions, _ = proportional_prefetch(cfg, obs(three_workers(), {"q.s": 0}), PolicyState())
    assert {d.prefetch for d in decisions} == {3}


def test_prefetch_never_below_the_batches_a_worker_makes() -> None:
    w = hb("batcher", {"q.s": ("s", 50)}, {"s": 0.05})  # 20 req/s -> 4 ...
    w = replace(w, stats=replace(w.stats, stages=(
        StageStats("s", 100, 10, service_s_per_request=0.05, mean_batch=9.3),)))
    decisions, _ = proportional_prefetch(PolicyConfig(horizon_s=0.2), obs([w], {"q.s": 0}),
                                         PolicyState())
    assert [d.prefetch for d in decisions] == [10]  # ... but it batches 9.3 on average


def test_a_join_stage_keeps_room_for_every_part_of_a_batch() -> None:
    """A join holds a batch's parts unacked until all arrive: its prefetch never drops
    below max_batch x sources, even for a slow worker and under tight hybrid bounds."""
    base = synthetic_plan(["a", "b"])
    join = replace(base.stages[1], inputs=(
        *base.stages[1].inputs,
        StageInput(TensorSpec("x2", "float32", ("batch", 4)), MODEL_INPUT),
    ))
    plan = replace(base, stages=(base.stages[0], join), scheduling=Scheduling(
        default=StageSchedule(prefetch=8, max_batch=4, prefetch_min=1, prefetch_max=6)))
    cfg = PolicyConfig.from_plan(plan, "hybrid", horizon_s=0.2)
    assert cfg.bounds["b"].floor == 8 and cfg.bounds["b"].baseline == 16
    assert cfg.bounds["a"].floor == 1 and cfg.bounds["a"].baseline == 8
    slow = [hb("w", {"q.b": ("b", 16)}, {"b": 0.5})]  # 2 req/s -> 1
    decisions, _ = proportional_prefetch(cfg, obs(slow, {"q.b": 0}), PolicyState())
    assert [d.prefetch for d in decisions] == [8]


def test_hybrid_uses_the_plan_bounds() -> None:
    plan = synthetic_plan(["s"], scheduling=Scheduling(
        default=StageSchedule(prefetch=50, prefetch_min=8, prefetch_max=16)))
    cfg = PolicyConfig.from_plan(plan, "hybrid", horizon_s=0.2)
    decisions, _ = proportional_prefetch(cfg, obs(three_workers(), {"q.s": 0}), PolicyState())
    assert {d.worker_id: d.prefetch for d in decisions} == {"fast1": 16, "fast2": 16, "slow": 8}


def test_prefetch_deadband_and_dwell() -> None:
    cfg = PolicyConfig(horizon_s=0.2, prefetch_dwell_s=2.0)
    o = obs(three_workers(), {"q.s": 0}, now=100.0)
    first, state = proportional_prefetch(cfg, o, PolicyState())
    assert len(first) == 3
    # the worker got slower (fast1: 50 req/s -> target 10) but the change came 1 s later
    slower = [hb("fast1", {"q.s": ("s", 20)}, {"s": 0.02})]
    again, state = proportional_prefetch(cfg, obs(slower, {"q.s": 0}, now=101.0), state)
    assert again == []
    later, _ = proportional_prefetch(cfg, obs(slower, {"q.s": 0}, now=102.5), state)
    assert [d.prefetch for d in later] == [10]
    # within the deadband: 20 -> 21 is not worth a command
    near = [hb("fast1", {"q.s": ("s", 20)}, {"s": 1 / 105})]
    assert proportional_prefetch(cfg, obs(near, {"q.s": 0}), PolicyState())[0] == []


def test_unmeasured_and_busy_workers_are_left_alone() -> None:
    ws = [hb("new", {"q.s": ("s", 50)}, {"s": 0.0}), hb("busy", {"q.s": ("s", 50)}, {"s": 0.01})]
    o = obs(ws, {"q.s": 0}, busy_workers=frozenset({"busy"}))
    assert proportional_prefetch(PolicyConfig(), o, PolicyState())[0] == []


def test_static_applies_the_baseline_once_per_incarnation() -> None:
    cfg = PolicyConfig(kind="static", bounds={"s": Bounds(baseline=50, lo=1, hi=64)})
    ws = [hb("a", {"q.s": ("s", 8)}, {"s": 0.01}), hb("b", {"q.s": ("s", 50)}, {"s": 0.01})]
    d1, state = decide(cfg, obs(ws, {"q.s": 0}), PolicyState())
    assert [(d.worker_id, d.prefetch) for d in d1 if isinstance(d, SetPrefetch)] == [("a", 50)]
    d2, state = decide(cfg, obs(ws, {"q.s": 0}), state)
    assert d2 == []  # static: then only reports, even though "a" still shows 8
    restarted = [hb("a", {"q.s": ("s", 8)}, {"s": 0.01}, incarnation="i2")]
    d3, _ = static_prefetch(cfg, obs(restarted, {"q.s": 0}), state)
    assert [d.worker_id for d in d3] == ["a"]


def test_static_never_moves_anything() -> None:
    cfg = PolicyConfig(kind="static", confirm_periods=1)
    o, _ = backlog_scene(depth_s2=1000)
    state = PolicyState()
    for i in range(5):
        ds, state = decide(cfg, replace(o, now=100.0 + i), state)
        assert not [d for d in ds if not isinstance(d, SetPrefetch)]


# -- flexible workers -------------------------------------------------------------------


def backlog_scene(depth_s2: int, flex_on: str = "s1", home: tuple[str, ...] = ("s1",),
                  now: float = 100.0, served: float = 10.0) -> tuple[Observation, list[Heartbeat]]:
    """Three single-stage workers and a flexible one; every worker serves ``served``
    requests/s on each of its stages (counters grow with ``now``)."""
    n = int(now * served)
    ws = [
        hb("w1", {"q.s1": ("s1", 10)}, {"s1": 0.01}, at=now, requests=n),
        hb("w2", {"q.s2": ("s2", 10)}, {"s2": 0.02}, at=now, requests=n),
        hb("w3", {"q.s3": ("s3", 10)}, {"s3": 0.01}, at=now, requests=n),
        hb("flex", {f"q.{flex_on}": (flex_on, 10)}, {"s1": 0.01, "s2": 0.02, "s3": 0.01},
           home=home, at=now, requests=n),
    ]
    return obs(ws, {"q.s1": 0, "q.s2": depth_s2, "q.s3": 0}, now=now), ws


def run_flex(cfg: PolicyConfig, scenes: list[Observation],
             state: PolicyState | None = None) -> tuple[list[list[MoveWorker]], PolicyState]:
    state = state or PolicyState()
    out = []
    for o in scenes:
        ds, state = flex_moves(cfg, o, state)
        out.append([d for d in ds if isinstance(d, MoveWorker)])
    return out, state


def test_backlog_moves_a_flexible_worker_after_confirmation() -> None:
    cfg = PolicyConfig(confirm_periods=2, backlog_high_s=1.0)
    # s2: 200 messages at 50 req/s = 4 s to drain
    scenes = [backlog_scene(200, now=100.0 + i)[0] for i in range(3)]
    moves, _ = run_flex(cfg, scenes)
    assert moves[0] == []
    assert [(m.worker_id, m.from_stages, m.to_stages) for m in moves[1]] == [
        ("flex", ("s1",), ("s2",))]
    assert "drain 4.00 s" in moves[1][0].reason
    assert moves[2] == []  # already moved (the slot is taken)


def test_no_move_when_the_donor_would_be_left_alone_or_busy() -> None:
    cfg = PolicyConfig(confirm_periods=1)
    o, ws = backlog_scene(200)
    alone = replace(o, workers={w.worker_id: w for w in ws if w.worker_id != "w1"})
    assert run_flex(cfg, [alone])[0] == [[]]
    busy_donor = replace(o, queues={**o.queues, "q.s1": QueueStats("q.s1", 500, 2)})
    assert run_flex(cfg, [busy_donor])[0] == [[]]
    small = backlog_scene(20)[0]  # 20 messages at 50 req/s: 0.4 s, not a backlog
    assert run_flex(cfg, [small])[0] == [[]]


def test_max_moves_is_honoured() -> None:
    cfg = PolicyConfig(confirm_periods=1, max_moves=0)
    assert run_flex(cfg, [backlog_scene(500)[0]])[0] == [[]]


def test_worker_goes_back_after_the_backlog_clears_and_the_dwell() -> None:
    cfg = PolicyConfig(confirm_periods=2, move_dwell_s=3.0)
    moved, state = run_flex(cfg, [backlog_scene(200, now=100.0 + i)[0] for i in range(2)])
    assert moved[1]
    # the flexible worker now consumes s2; s2 drained
    away = [backlog_scene(0, flex_on="s2", now=t)[0] for t in (102.0, 102.5, 103.0, 104.5)]
    back, _ = run_flex(cfg, away, state)
    assert back[:3] == [[], [], []]  # cleared, but the dwell (3 s since 101) is not over
    assert [(m.worker_id, m.from_stages, m.to_stages, m.returning) for m in back[3]] == [
        ("flex", ("s2",), ("s1",), True)]


def test_no_return_while_the_others_could_not_carry_the_load() -> None:
    """s2 drained, but it is served at 2 x 45 req/s and w2 alone has 50: going back would
    only rebuild the backlog (flapping)."""
    cfg = PolicyConfig(confirm_periods=1, move_dwell_s=0.0)
    busy = [backlog_scene(0, flex_on="s2", now=t, served=45.0)[0] for t in (300.0, 301.0, 302.0)]
    assert run_flex(cfg, busy)[0] == [[], [], []]
    quiet = [backlog_scene(0, flex_on="s2", now=t, served=15.0)[0] for t in (300.0, 301.0, 302.0)]
    moves, _ = run_flex(cfg, quiet)
    assert moves[0] == [] and moves[1][0].returning and "30.0 req/s served" in moves[1][0].reason


def test_no_return_while_the_backlog_persists() -> None:
    cfg = PolicyConfig(confirm_periods=1, move_dwell_s=0.0)
    scenes = [backlog_scene(200, flex_on="s2", now=110.0 + i)[0] for i in range(3)]
    assert run_flex(cfg, scenes)[0] == [[], [], []]


def test_restarted_policy_recognises_a_moved_worker() -> None:
    """After a restart the state is empty: a worker away from home is seen in its heartbeat
    and gets a fresh dwell (no immediate return)."""
    cfg = PolicyConfig(confirm_periods=1, move_dwell_s=2.0)
    scenes = [backlog_scene(0, flex_on="s2", now=t)[0] for t in (200.0, 201.0, 202.5)]
    moves, _ = run_flex(cfg, scenes)
    assert moves[0] == [] and moves[1] == [] and moves[2][0].returning


def test_stage_loads_figures() -> None:
    o, _ = backlog_scene(100)
    s2 = stage_loads(o)["s2"]
    assert s2.consumers == ("w2",) and s2.capacity == pytest.approx(50.0)
    assert s2.drain_s == pytest.approx(2.0)
    empty = replace(o, workers={})
    assert math.isinf(stage_loads(empty)["s2"].drain_s)


def batched(h: Heartbeat, stage: str, mean_batch: float) -> Heartbeat:
    """``h`` with its figures on ``stage`` made of batches of ``mean_batch`` rows."""
    stages = tuple(replace(st, mean_batch=mean_batch) if st.stage == stage else st
                   for st in h.stats.stages)
    return replace(h, stats=replace(h.stats, stages=stages))


def test_a_stage_queue_message_carries_a_batch_of_requests() -> None:
    """Real workers publish one message per batch to the next stage: 30 messages of 8
    requests are 240 requests (4.8 s at 50 req/s), a backlog; counted as 30 requests
    (0.6 s) it was not."""
    o, ws = backlog_scene(30)
    ws = [batched(w, "s1", 8.0) if w.worker_id in ("w1", "flex") else w for w in ws]
    feeds = {"s2": ("s1",), "s3": ("s2",)}
    rows = message_rows({w.worker_id: w for w in ws}, o.queue_stage, feeds)
    assert rows["q.s2"] == pytest.approx(8.0) and rows["q.s3"] == pytest.approx(1.0)
    assert "q.s1" not in rows  # the first stage reads one request per message
    o = replace(o, workers={w.worker_id: w for w in ws}, rows_per_message=rows)
    s2 = stage_loads(o)["s2"]
    assert (s2.depth, s2.messages) == (240, 30) and s2.drain_s == pytest.approx(4.8)
    cfg = PolicyConfig(confirm_periods=1)
    moves = run_flex(cfg, [o])[0][0]
    assert [(m.worker_id, m.to_stages) for m in moves] == [("flex", ("s2",))]
    assert "240 requests (30 msgs)" in moves[0].reason
    assert run_flex(cfg, [replace(o, rows_per_message={})])[0] == [[]]


def test_a_join_queue_carries_one_message_per_producer_batch() -> None:
    ws = {"a": batched(hb("a", {"q.a": ("a", 10)}, {"a": 0.01}), "a", 8.0),
          "b": batched(hb("b", {"q.b": ("b", 10)}, {"b": 0.01}), "b", 2.0)}
    rows = message_rows(ws, {"q.j": "j"}, {"j": ("a", "b")})
    assert rows == {"q.j": pytest.approx(1 / (1 / 8 + 1 / 2))}
    assert message_rows({}, {"q.j": "j"}, {"j": ("a", "b")}) == {"q.j": pytest.approx(0.5)}


def test_prefetch_counts_messages_of_batches() -> None:
    """A consumer of 100 req/s holds 0.2 s of work: 20 requests, 3 messages of 8."""
    w = batched(hb("w", {"q.s": ("s", 40)}, {"s": 0.01}), "s", 8.0)
    o = obs([w], {"q.s": 0}, rows_per_message={"q.s": 8.0})
    ds, _ = proportional_prefetch(PolicyConfig(horizon_s=0.2), o, PolicyState())
    assert [(d.prefetch, d.previous) for d in ds if isinstance(d, SetPrefetch)] == [(3, 40)]
    assert "8.0 requests per message" in ds[0].reason


# -- partitions -------------------------------------------------------------------------

Q0, Q1 = "in.0", "in.1"


def shard_scene(now: float, counts0: dict[str, int], counts1: dict[str, int], depth0: int,
                partitions: dict[str, str] | None = None) -> Observation:
    ws = [
        hb("a", {Q0: ("s", 10)}, {"s": 0.01}, keys=counts0, at=now),
        hb("b", {Q1: ("s", 10)}, {"s": 0.01}, keys=counts1, at=now),
    ]
    return obs(ws, {Q0: depth0, Q1: 0}, now=now, queue_stage={Q0: "s", Q1: "s"},
               input_queues=(Q0, Q1),
               partitions=partitions or {"p.0": Q0, "p.2": Q0, "p.4": Q0, "p.1": Q1, "p.3": Q1})


def test_key_rates_from_counter_deltas() -> None:
    o1 = shard_scene(10.0, {"p.0": 100}, {"p.1": 10}, 0)
    rates, counts = key_rates(o1, PolicyState())
    assert rates == {}  # a baseline only
    o2 = shard_scene(11.0, {"p.0": 160}, {"p.1": 30}, 0)
    rates, _ = key_rates(o2, PolicyState(key_counts=counts))
    assert rates == {"p.0": pytest.approx(60.0), "p.1": pytest.approx(20.0)}


def test_hot_partition_moves_to_the_lighter_shard() -> None:
    cfg = PolicyConfig(confirm_periods=2)
    state = PolicyState()
    decisions = []
    # shard 0: p.0 and p.2 at 50 req/s each (capacity 100) and a growing backlog
    for i in range(4):
        o = shard_scene(10.0 + i, {"p.0": 50 * i, "p.2": 50 * i, "p.4": i},
                        {"p.1": 20 * i}, depth0=40 * i)
        ds, state = partition_moves(cfg, o, state)
        decisions.append(ds)
    moved = [d for ds in decisions for d in ds]
    assert len(moved) == 1
    (m,) = moved
    assert isinstance(m, MovePartition)
    assert m.routing_key in {"p.0", "p.2"} and (m.from_queue, m.to_queue) == (Q0, Q1)
    assert "capacity" in m.reason


def test_no_partition_move_without_a_gain() -> None:
    """A single key carrying the whole overload: moving it only moves the hot spot."""
    cfg = PolicyConfig(confirm_periods=1)
    state = PolicyState()
    out = []
    for i in range(4):
        o = shard_scene(10.0 + i, {"p.0": 100 * i}, {"p.1": 95 * i}, depth0=50 * i)
        ds, state = partition_moves(cfg, o, state)
        out += ds
    assert out == []


def test_moved_key_dwells() -> None:
    cfg = PolicyConfig(confirm_periods=1, partition_dwell_s=100.0)
    state = PolicyState(key_moved_at={"p.0": 9.0, "p.2": 9.0})
    out = []
    for i in range(3):
        o = shard_scene(10.0 + i, {"p.0": 50 * i, "p.2": 50 * i}, {"p.1": 10 * i}, depth0=40 * i)
        ds, state = partition_moves(cfg, o, state)
        out += ds
    assert out == []


def test_random_partitioning_has_nothing_to_move() -> None:
    o = replace(shard_scene(11.0, {"p.0": 100}, {}, 100), partitions={})
    assert partition_moves(PolicyConfig(confirm_periods=1), o, PolicyState())[0] == []


def test_decide_dynamic_combines_the_levers() -> None:
    cfg = PolicyConfig(confirm_periods=1)
    o, _ = backlog_scene(500)
    ds, _ = decide(cfg, o, PolicyState())
    kinds = {type(d) for d in ds}
    assert SetPrefetch in kinds and MoveWorker in kinds


def test_a_growing_backlog_is_caught_before_it_is_large() -> None:
    cfg = PolicyConfig(confirm_periods=2, backlog_high_s=10.0, backlog_grow_s=0.3)
    # s2 at 50 req/s: 10, 20, 30 messages = 0.2 .. 0.6 s, far under the 10 s threshold;
    # the third growing period (from 0) with a drain over 0.3 s triggers the move
    scenes = [backlog_scene(d, now=100.0 + i)[0] for i, d in enumerate((10, 20, 30))]
    moves, _ = run_flex(cfg, scenes)
    assert moves[:2] == [[], []]
    assert moves[2] and "growing for 3" in moves[2][0].reason
    flat = [backlog_scene(40, now=100.0 + i)[0] for i in range(5)]  # large-ish but steady
    assert run_flex(cfg, flat)[0] == [[]] * 5


def test_hybrid_baseline_is_applied_inside_the_bounds() -> None:
    cfg = PolicyConfig(kind="hybrid", bounds={"s": Bounds(baseline=50, lo=2, hi=32)},
                       horizon_s=0.2)
    fresh = [hb("new", {"q.s": ("s", 50)}, {"s": 0.0})]  # not measured yet
    decisions, _ = decide(cfg, obs(fresh, {"q.s": 0}), PolicyState())
    assert [(d.prefetch, d.previous) for d in decisions if isinstance(d, SetPrefetch)] == [
        (32, 50)]
