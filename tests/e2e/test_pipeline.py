"""Every reply equals the whole model's output for its request, on both transports.

Three real models: the MLP split in 3 by layer, MobileNetV2 split in 2, and a two-branch
functional model split by function (fan-out to parallel stages, join at the end).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.e2e.conftest import Case, Pipeline


async def serve_and_check(pipeline: Pipeline, case: Case, n: int, concurrency: int) -> None:
    requests = case.requests(n)
    async with pipeline.serve(case) as served:
        results = [r async for r in served.client.infer_many(requests, concurrency=concurrency)]
        assert served.client.stats().in_flight == 0
    assert len(results) == n
    for request, got in zip(requests, results, strict=True):
        case.check(request, got)


async def test_mlp_split_in_three(pipeline: Pipeline, mlp: Case) -> None:
    assert [s.name for s in mlp.plan.stages] and len(mlp.plan.stages) == 3
    await serve_and_check(pipeline, mlp, n=200, concurrency=16)


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
    """Bursts and gaps: batches of every size form, and each request gets its own rows."""
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
    for req, got in zip(requests, results, strict=True):
        case.check(req, got)
