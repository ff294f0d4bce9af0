"""A burst on stage 2 of 3: the controller moves a flexible worker there within 5 s, the
backlog clears, and the worker goes back to its home stage afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable

from conveyor.plan import Plan
from tests.controller.rig import Rig
from tests.support.synthetic import synthetic_plan
from workers.control.policies import MoveWorker


def stages_of(rig: Rig, wid: str) -> set[str]:
    """The stages a worker consumes, as its last heartbeat told the controller."""
    c = rig.controllers[0]
    hb = c.workers.get(wid)
    return {q.stage for q in hb.stats.consuming} if hb else set()


async def test_flexible_worker_follows_the_backlog(rigs: Callable[[Plan], Rig]) -> None:
    rig = await rigs(synthetic_plan(["s1", "s2", "s3"])).open()
    await rig.add_worker("w1", {"s1": 0.005}, ("s1",))
    await rig.add_worker("w2", {"s2": 0.02}, ("s2",))
    await rig.add_worker("w3", {"s3": 0.005}, ("s3",))
    await rig.add_worker("flex", {"s1": 0.005, "s2": 0.02, "s3": 0.005}, ("s1",))
    c = await rig.controller("dynamic", period=0.25, confirm_periods=2, move_dwell_s=1.0,
                             backlog_high_s=1.0, backlog_low_s=0.2)
    # every worker measured once, and the controller knows them all
    warm = await rig.publish(20)
    await rig.all_done(warm, limit=10)
    await rig.wait_for(lambda: len(c.workers) == 4 and stages_of(rig, "flex") == {"s1"},
                       limit=10, what="the controller to see the four workers")

    burst_at = time.perf_counter()
    ids = await rig.publish(300, stage="s2")  # 300 x 20 ms = 6 s of work for w2 alone
    await rig.wait_for(lambda: stages_of(rig, "flex") == {"s2"}, limit=5,
                       what="the flexible worker to move to s2")
    took = time.perf_counter() - burst_at  # publishing the burst included
    moves = [d.decision for d in c.decisions if isinstance(d.decision, MoveWorker)]
    assert moves and moves[0].worker_id == "flex" and moves[0].to_stages == ("s2",)
    assert not moves[0].returning and "drain" in moves[0].reason
    assert took <= 5.0

    await rig.all_done(ids, limit=20)
    cleared = time.perf_counter() - burst_at
    await rig.wait_for(lambda: stages_of(rig, "flex") == {"s1"}, limit=10,
                       what="the flexible worker to go back to s1")
    served_by_flex = sum(1 for i in ids if "s2@flex" in rig.done[i].path)
    print(f"\n[{rig.handle.kind}] moved after {took:.2f} s, backlog cleared after "
          f"{cleared:.2f} s, flex served {served_by_flex}/300 of s2; metrics {c.metrics_line()}")
    assert served_by_flex > 0  # it really worked on s2
    assert c.metrics["worker_moves"] == 1 and c.metrics["worker_returns"] == 1
    # the pipeline still flows through s1 with flex back home
    after = await rig.publish(20)
    await rig.all_done(after, limit=10)
    assert rig.duplicates == 0
