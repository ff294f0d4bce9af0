"""``conveyor bench``'s per-stage split: the arithmetic on known samples, and the split a
real run reads from its workers' metrics (in-process, and from ``/metrics`` endpoints)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest

from conveyor.app.bench_split import split, sums
from conveyor.app.cmd_bench import Progress, _levels
from conveyor.app.observe import ObserveServer
from conveyor.client import Client
from conveyor.plan import Plan
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_plan
from workers.stage_worker import StageWorker


def samples(stage: str, **figures: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    labels = (("stage", stage), ("worker", "w1"))
    out = {(name, labels): value for name, value in figures.items()}
    out[("conveyor_requests_total", (*labels, ("outcome", "ok")))] = figures.get("ok", 0.0)
    out[("conveyor_requests_total", (*labels, ("outcome", "codec_error")))] = 5.0  # not ok
    return {k: v for k, v in out.items() if k[0] != "ok"}


def test_the_split_is_what_the_level_added(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, 1, name="split")
    (stage,) = plan.stage_names
    before = sums(plan, [samples(stage, ok=10, conveyor_queue_wait_seconds_sum=1.0,
                                 conveyor_queue_wait_seconds_count=10,
                                 conveyor_compute_seconds_sum=0.5,
                                 conveyor_compute_seconds_count=5,
                                 conveyor_batch_size_sum=10, conveyor_batch_size_count=5)])
    # 40 more requests in 10 batches of 4: 0.2 s of queue wait, 0.08 s of compute.
    after = sums(plan, [samples(stage, ok=50, conveyor_queue_wait_seconds_sum=1.2,
                                conveyor_queue_wait_seconds_count=50,
                                conveyor_compute_seconds_sum=0.58,
                                conveyor_compute_seconds_count=15,
                                conveyor_batch_size_sum=50, conveyor_batch_size_count=15),
                        {("conveyor_requests_total", (("outcome", "ok"), ("stage", "other"))):
                         99.0}])  # another plan's stage: not counted
    (row,) = split(before, after)
    assert row.stage == stage and row.requests == 40
    assert row.queue_wait_ms == pytest.approx(5.0)  # 0.2 s over 40 requests
    assert row.compute_ms_per_batch == pytest.approx(8.0)
    assert row.compute_ms_per_request == pytest.approx(2.0)
    assert row.mean_batch == pytest.approx(4.0)
    assert row.batch_wait_ms is None  # nothing observed: unknown, not zero


def args(metrics: list[str]) -> argparse.Namespace:
    return argparse.Namespace(metrics=metrics, rate=None, seconds=0.5, warmup=0.1)


async def test_a_run_reads_its_split_from_the_workers_metrics_endpoint(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    """Workers elsewhere (here: two, one stage each, behind one /metrics port): the split
    comes from their endpoint, per level, and agrees with what the bench counted."""
    plan = Plan.load(chain_plan(tmp_path, 2, name=unique, max_batch=4).directory)
    workers = [StageWorker(plan, await broker.connect(), [s]) for s in plan.stage_names]
    server = ObserveServer(0, host="127.0.0.1")
    for w in workers:
        server.add_registry(w.metrics.registry)
    await server.start()
    try:
        for w in workers:
            await w.start()
        async with Client(plan, await broker.connect()) as client:
            x = {"x": np.ones((1, 4), np.float32)}

            async def infer(inputs: object) -> object:
                return await client.infer(x)

            url = f"http://127.0.0.1:{server.bound_port}/metrics"
            quiet = Progress(0.5, io.StringIO(), enabled=False)
            points = await _levels(plan, args([url]), [x], [1, 4], quiet, infer, [])
    finally:
        for w in workers:
            await w.stop()
        await server.stop()
    assert [p.level for p in points] == [1, 4]
    for point in points:
        assert [row["stage"] for row in point.stages] == plan.stage_names
        for row in point.stages:
            # The level's answers, plus its warm-up's (also between the two samples).
            assert row["requests"] >= point.requests - point.errors > 0
            assert 1 <= row["mean_batch"] <= 4
            assert row["compute_ms_per_request"] == pytest.approx(
                row["compute_ms_per_batch"] / row["mean_batch"], rel=1e-2, abs=2e-4)  # rounded
            assert row["batch_wait_ms"] >= 0 and row["queue_wait_ms"] >= 0
