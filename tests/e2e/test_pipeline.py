"""Every reply equals the whole model's output for its request, on both transports.

Three real models: the MLP split in 3 by layer, MobileNetV2 split in 2, and a two-branch
functional model split by function (fan-out to parallel stages, join at the end).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.client import ClientStats
from tests.support.brokers import BrokerHandle
from tests.support.cases import Case
from tests.support.pipeline import Pipeline
from tests.support.polling import until_depth


async def serve_and_check(
    pipeline: Pipeline, case: Case, n: int, concurrency: int, *, pack: bool = True
) -> ClientStats:
    requests = case.requests(n)
    async with pipeline.serve(case, pack=pack) as served:
        results = [r async for r in served.client.infer_many(requests, concurrency=concurrency)]
        stats = served.client.stats()
        assert stats.in_flight == 0
    assert len(results) == n
    for request, got in zip(requests, results, strict=True):
        case.check(request, got)
    return stats


@pytest.mark.parametrize("pack", [True, False], ids=["packs", "one-per-message"])
async def test_mlp_split_in_three(pipeline: Pipeline, mlp: Case, pack: bool) -> None:
    assert [s.name for s in mlp.plan.stages] and len(mlp.plan.stages) == 3
    stats = await serve_and_check(pipeline, mlp, n=200, concurrency=16, pack=pack)
    assert stats.sent == stats.answered == 200
    if pack:  # requests left in packs and came back in reply packs
        assert stats.messages_sent < 200 and stats.reply_messages < 200
    else:
        assert stats.messages_sent == stats.reply_messages == 200


async def test_mobilenet_split_in_two(pipeline: Pipeline, mobilenet: Case) -> None:
    assert len(mobilenet.plan.stages) == 2
    await serve_and_check(pipeline, mobilenet, n=24, concurrency=8)


async def test_two_branches_split_by_function(pipeline: Pipeline, branches: Case) -> None:
    plan = branches.plan
    # The point of this model: a fan-out to parallel stages and a join stage.
    assert any(s.is_join for s in plan.stages), [s.upstream for s in plan.stages]
    # ... and a fan-out: the model input feeds two entry stages, or one output feeds two.
    assert len(plan.entry_stages) > 1 or any(
        len(o.consumers) > 1 for s in plan.stages for o in s.outputs
    )
    await serve_and_check(pipeline, branches, n=200, concurrency=16)


@pytest.mark.parametrize("case_name", ["mlp", "branches"])
async def test_micro_batching_with_mixed_arrival_times(
    pipeline: Pipeline, case_name: str, request: pytest.FixtureRequest
) -> None:
    """Bursts and gaps: batches of mixed sizes form, and each request gets its own rows."""
    case: Case = request.getfixturevalue(case_name)
    rng = np.random.default_rng(7)
    requests = case.requests(120, seed=3)
    # Gaps between arrivals: bursts (no gap) mixed with pauses longer than max_delay_ms.
    gaps = rng.choice([0.0, 0.0, 0.0, 0.001, 0.006], size=len(requests))
    async with pipeline.serve(case) as served:

        async def one(i: int) -> dict[str, np.ndarray]:
            await asyncio.sleep(float(gaps[: i + 1].sum()))  # arrival time, not a sync
            return await served.client.infer(requests[i])

        results = await asyncio.gather(*(one(i) for i in range(len(requests))))
        workers = served.client.workers
        if workers is not None:  # in-process workers report their batches
            stages = workers.stats().stages
            assert any(1 < s.mean_batch < s.max_batch for s in stages), stages
    for req, got in zip(requests, results, strict=True):
        case.check(req, got)


async def test_requests_published_before_a_branch_worker_starts_are_all_answered(
    pipeline: Pipeline, branches: Case
) -> None:
    """Clients may publish before workers are up (docs/wire.md): nothing waits forever.

    The left branch and the join run first and the right branch's worker starts only once
    the requests wait for it, so the join receives many left parts (more messages than its
    prefetch limit) before the first right part arrives.
    """
    import workers
    from conveyor.topology import Topology
    from tests.e2e.test_faults import side_transport

    plan = branches.plan
    late = [s.name for s in plan.entry_stages][-1]
    schedule = plan.scheduling.for_stage(late)
    # Between stages a message carries a batch (up to max_batch requests): make the left
    # branch send more messages to the join than the join's prefetch lets it hold.
    n = schedule.max_batch * (schedule.prefetch + 8)
    requests = branches.requests(n, seed=9)
    async with pipeline.serve(branches, start_workers=False, timeout=90.0) as served:
        in_process = []
        broker = served.client.broker
        for stage in served.plan.stage_names:
            if stage == late:
                continue
            if served.workers is not None:
                served.workers.start(stage)
            else:
                assert broker is not None
                in_process.append(await workers.serve(plan, broker.connect(), [stage],
                                                      device="cpu"))
        calls = [asyncio.create_task(served.client.infer(r)) for r in requests]
        async with side_transport(pipeline, served) as watcher:
            await until_depth(watcher, Topology.of(served.plan).stage_queue(late),
                              -(-n // schedule.max_batch), 60.0)
        if served.workers is not None:
            served.workers.start(late)
        else:
            assert broker is not None
            in_process.append(await workers.serve(plan, broker.connect(), [late], device="cpu"))
        results = await asyncio.gather(*calls)
        for worker in in_process:
            await worker.stop()
    for request, got in zip(requests, results, strict=True):
        branches.check(request, got)


@pytest.mark.rabbitmq
async def test_conveyor_infer_command_over_rabbitmq(
    rabbitmq_url: str, tmp_path: Path, mlp: Case
) -> None:
    """``conveyor infer PLAN x.npy --broker URL --out y.npz`` against worker processes."""
    request = mlp.requests(1, seed=21)[0]
    np.save(tmp_path / "x.npy", next(iter(request.values())))
    async with Pipeline(BrokerHandle("rabbitmq", rabbitmq_url), tmp_path).serve(mlp) as served:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor", "infer", str(served.plan.directory),
            str(tmp_path / "x.npy"), "--broker", rabbitmq_url, "--out", str(tmp_path / "y.npz"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    output = mlp.plan.outputs[0]
    assert f"{output.name}: shape [1, 10] float32" in out.decode()
    with np.load(tmp_path / "y.npz") as saved:
        mlp.check(request, {name: saved[name] for name in saved.files})


@pytest.mark.rabbitmq
async def test_durable_deployment_needs_a_durable_client(
    rabbitmq_url: str, tmp_path: Path, mlp: Case
) -> None:
    """Workers started with ``--durable`` (the default): a durable client (the default) is
    served, a non-durable one refused."""
    from conveyor.app.connect import connect
    from conveyor.errors import TransportError
    from tests.support.pipeline import WorkerProcesses, delete_topology, wait_until_consumed
    from tests.support.plans import isolated_copy

    plan = isolated_copy(mlp.plan, tmp_path / "plan")
    procs = WorkerProcesses(plan, rabbitmq_url, tmp_path, "--durable")
    try:
        procs.start_all()
        await wait_until_consumed(rabbitmq_url, plan, procs)
        with pytest.raises(TransportError):
            async with connect(rabbitmq_url, plan=plan, durable=False):
                pass
        request = mlp.requests(1)[0]
        async with connect(rabbitmq_url, plan=plan) as client:
            mlp.check(request, await client.infer(request))
    finally:
        await asyncio.to_thread(procs.stop_all)
        await delete_topology(rabbitmq_url, plan)
