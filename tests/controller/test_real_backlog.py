"""Real stage workers (onnxruntime) follow a backlog: a burst that stage 2 of 3 cannot keep
up with makes the controller move a flexible worker (sessions of stages 1 and 2 loaded,
consuming only stage 1) to stage 2 within 5 s; the backlog clears, the worker goes back,
and every request is answered with what the whole model computes (both transports)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from tests.controller.real_rig import RealPool, assert_answered_once
from tests.support.brokers import BrokerHandle
from tests.support.plans import WholeModel, chain_expected, weighted_chain_plan
from tests.support.polling import until
from workers.control.policies import MoveWorker

#: Stage s1 lifts each row to 1024 columns and multiplies it 400 times by an identity:
#: a few milliseconds per row, two orders of magnitude more than s0 and s2.
HEAVY = {1: (1024, 400)}


async def send_all(pool: RealPool, xs: np.ndarray) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one(x: np.ndarray) -> str:
        async with sem:
            return await pool.send(x[None, :])

    return list(await asyncio.gather(*(one(x) for x in xs)))


def check_answers(pool: RealPool, ids: list[str], xs: np.ndarray, whole: WholeModel) -> None:
    assert pool.client is not None
    expected = whole(xs)
    np.testing.assert_array_equal(expected, chain_expected(xs))  # the reference itself
    assert_answered_once(pool, ids, expected)


async def test_real_flexible_worker_follows_the_backlog(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    plan = weighted_chain_plan(tmp_path, 3, HEAVY, name=f"rb{broker.prefix.replace('.', '')}")
    pool = await RealPool(broker, plan).open()
    assert pool.client is not None
    whole = WholeModel(plan)
    rng = np.random.default_rng(5)
    try:
        await pool.add_worker("w0", ["s0"])
        await pool.add_worker("w1", ["s1"])
        await pool.add_worker("w2", ["s2"])
        await pool.add_worker("flex", ["s0", "s1"], home=["s0"])
        c = await pool.start_controller("dynamic", period=0.25, confirm_periods=2,
                                        move_dwell_s=1.0, backlog_high_s=1.0,
                                        backlog_low_s=0.2)
        # every worker measured once, and the controller knows them all
        warm_x = rng.standard_normal((40, 4)).astype(np.float32)
        warm = await send_all(pool, warm_x)
        await pool.client.wait_for(warm, within=30)
        check_answers(pool, warm, warm_x, whole)

        def measured() -> bool:
            return len(c.workers) == 4 and pool.stages_of("flex") == {"s0"} and all(
                (st := hb.stats.stage(s)) is not None and st.service_s_per_request > 0
                for w, s in (("w0", "s0"), ("w1", "s1"), ("w2", "s2"))
                if (hb := c.workers.get(w)) is not None
            )

        await until(measured, 15, lambda: f"four measured workers (have {sorted(c.workers)})")
        s1_queue = pool.topology.stage_queue("s1")
        assert not any(s.worker == "flex" and s.queue == s1_queue for s in pool.seen)

        burst_at = time.perf_counter()
        xs = rng.standard_normal((400, 4)).astype(np.float32)
        sending = asyncio.create_task(send_all(pool, xs))
        took = await until(lambda: pool.stages_of("flex") == {"s1"}, 10,
                           lambda: f"flex to move to s1 (metrics {c.metrics_line()})")
        ids = await sending
        moves = [d.decision for d in c.decisions if isinstance(d.decision, MoveWorker)]
        assert moves and moves[0].worker_id == "flex" and moves[0].to_stages == ("s1",)
        assert moves[0].from_stages == ("s0",) and not moves[0].returning
        assert "drain" in moves[0].reason

        await pool.client.wait_for(ids, within=60)
        cleared = time.perf_counter() - burst_at
        await until(lambda: pool.stages_of("flex") == {"s0"}, 15,
                    lambda: f"flex to go back to s0 (metrics {c.metrics_line()})")
        check_answers(pool, ids, xs, whole)
        from_s1 = {s.request_id for s in pool.seen if s.worker == "flex" and s.queue == s1_queue}
        served_by_flex = len(from_s1 & set(ids))
        print(f"\n[{broker.kind}] real workers: flex moved after {took:.2f} s, backlog cleared "
              f"after {cleared:.2f} s, flex took {served_by_flex}/{len(ids)} from the s1 queue; "
              f"{c.metrics_line()}")
        assert took <= 5.0  # from the first request of the burst to the move seen working
        assert served_by_flex > 0  # it really worked on s1's queue
        assert c.metrics["worker_moves"] == 1 and c.metrics["worker_returns"] == 1
        assert c.metrics["commands_failed"] == 0

        # the pipeline still flows, flex on its home stage again
        after_x = rng.standard_normal((20, 4)).astype(np.float32)
        after = await send_all(pool, after_x)
        await pool.client.wait_for(after, within=30)
        check_answers(pool, after, after_x, whole)
        assert pool.client.dead == []
    finally:
        await pool.close()

