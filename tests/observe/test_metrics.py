"""/metrics and the health paths of workers, on both brokers (docs/operations.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from conveyor.app.observe import ObserveServer, broker_check
from conveyor.client import Client
from conveyor.errors import CodecError, PlanHashMismatch
from tests.observe.scrape import get, label_values, scrape, total
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_plan
from workers.stage_worker import StageWorker

GOOD = 40
RNG = np.random.default_rng(7)


def row() -> dict[str, np.ndarray]:
    return {"x": RNG.random((1, 4), dtype=np.float32)}


async def test_counters_add_up_and_histograms_match(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 3, name=unique, max_batch=4)
    stages = plan.stage_names
    workers = [StageWorker(plan, await broker.connect(), [s]) for s in stages]
    server = ObserveServer(0, host="127.0.0.1")
    for w in workers:
        server.add_registry(w.metrics.registry)
    await server.start()
    harness = await Harness(await broker.connect(), plan).open()
    try:
        for w in workers:
            await w.start()
        async with Client(plan, await broker.connect()) as client:
            # Refused at the ingress: a wrong plan hash twice, a tensor of the wrong width.
            bad = [await harness.send(row(), plan_hash="ab" * 8) for _ in range(2)]
            bad.append(await harness.send({"x": np.zeros((1, 5), np.float32)}))
            first = [client.infer(row()) for _ in range(GOOD // 2)]
            await asyncio.gather(*first)
            during = await scrape(server.bound_port)
            rest = [client.infer(row()) for _ in range(GOOD - GOOD // 2)]
            await asyncio.gather(*rest)
            await harness.wait_for(bad, dead=3)
        after = await scrape(server.bound_port)
    finally:
        for w in workers:
            await w.stop()
        await server.stop()
        await harness.close()

    s0, s1, s2 = stages
    requests = "conveyor_requests_total"
    assert total(during, requests, stage=s0) <= total(after, requests, stage=s0)
    assert total(during, requests, stage=s2, outcome="ok") >= GOOD // 2
    # Every request that reached the first stage ended there one way or the other.
    assert total(after, requests, stage=s0) == GOOD + 3
    assert total(after, requests, stage=s0, outcome=PlanHashMismatch.code) == 2
    assert total(after, requests, stage=s0, outcome=CodecError.code) == 1
    for stage in stages:
        assert total(after, requests, stage=stage, outcome="ok") == GOOD
        batches = total(after, "conveyor_batches_total", stage=stage)
        assert total(after, "conveyor_compute_seconds_count", stage=stage) == batches
        assert total(after, "conveyor_batch_size_count", stage=stage) == batches
        assert total(after, "conveyor_batch_size_sum", stage=stage) == GOOD
        assert total(after, "conveyor_batch_wait_seconds_count", stage=stage) == GOOD
        # Sent by the SDK (packs) or by a worker: each says when it was published.
        assert total(after, "conveyor_queue_wait_seconds_count", stage=stage) == GOOD
        assert total(after, "conveyor_in_flight", stage=stage) == 0
    # Stage messages to the next stage, replies from the last: each publish timed.
    assert total(after, "conveyor_publish_seconds_count", stage=s0) >= 1
    assert total(after, "conveyor_request_duration_seconds_count", stage=s2) == GOOD
    assert total(after, "conveyor_request_duration_seconds_count", stage=s1) == 0
    assert total(after, "conveyor_dead_lettered_total", stage=s0) == 3
    assert total(after, "conveyor_dead_lettered_total", stage=s1) == 0
    buckets = [
        (dict(labels)["le"], v) for (name, labels), v in after.items()
        if name == "conveyor_batch_size_bucket" and dict(labels)["stage"] == s1
    ]
    assert ("+Inf", total(after, "conveyor_batches_total", stage=s1)) in buckets
    assert label_values(after, "conveyor_worker_info", "worker") == {w.worker_id for w in workers}
    assert label_values(after, "conveyor_worker_info", "plan") == {plan.hash}
    assert total(after, "conveyor_prefetch", stage=s1) > 0


async def test_readiness_follows_the_worker_and_its_broker(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    transport = await broker.connect()
    worker = StageWorker(plan, transport)
    server = ObserveServer(0, host="127.0.0.1")
    server.add_registry(worker.metrics.registry)
    server.add_check("worker", lambda: None if worker.ready else worker.state.value)
    server.add_check("broker", broker_check(transport))
    await server.start()
    try:
        assert (await get(server.bound_port, "/v2/health/live"))[0] == 200
        status, body = await get(server.bound_port, "/v2/health/ready")
        assert status == 503 and "worker: new" in json.loads(body)["failing"]
        await worker.start()
        assert (await get(server.bound_port, "/v2/health/ready"))[0] == 200
        await transport.close(grace=0.5)  # the broker connection is gone
        status, body = await get(server.bound_port, "/v2/health/ready")
        assert status == 503
        assert "broker: broker connection down" in json.loads(body)["failing"]
        assert (await get(server.bound_port, "/v2/health/live"))[0] == 200
    finally:
        await worker.stop(grace=0.5)
        await server.stop()
