"""A function split whose model outputs come from different stages serves correct replies.

The converter gives such a plan one gather stage (a join of the stages that compute the
outputs); the workers treat it as any other join. Served with ``conveyor.connect(None,
plan=...)`` (brokerless) and with one worker process per stage on RabbitMQ, every reply
equals the whole model's outputs for its request.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.app.connect import connect
from conveyor.plan import Plan
from tests.support.cases import Case, Request, convert_case
from tests.support.pipeline import Pipeline


def split_by_function(model: Any, root: Path, name: str,
                      make_request: Callable[[np.random.Generator], Request]) -> Case:
    """What ``conveyor convert MODEL --by function`` does: the default number of stages."""
    return convert_case(model, root, name, by="function", make_request=make_request)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Two branches from one input, each with its own output head, no join in the model."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    x = keras.Input(shape=(16,), name="features")
    left = layers.Dense(24, activation="relu", name="left_dense")(x)
    left = layers.Dense(4, name="left_out")(left)
    right = layers.Dense(20, activation="tanh", name="right_dense")(x)
    right = layers.Dense(3, activation="softmax", name="right_out")(right)
    model = keras.Model(x, [right, left], name="two_heads")

    def request(rng: np.random.Generator) -> Request:
        return {"features": rng.standard_normal((1, 16)).astype(np.float32)}

    return split_by_function(model, tmp_path_factory.mktemp("two-heads"), "two_heads", request)


@pytest.fixture(scope="module")
def heads_after_join(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Two input branches, a join, a trunk, and two heads: fan-out, fan-in, then a gather."""
    from tests.converter.conftest import build_branches

    def request(rng: np.random.Generator) -> Request:
        return {"image_features": rng.standard_normal((1, 12)).astype(np.float32),
                "metadata": rng.standard_normal((1, 5)).astype(np.float32)}

    return split_by_function(build_branches(), tmp_path_factory.mktemp("heads"), "branches",
                             request)


def assert_gathered(plan: Plan) -> None:
    """One stage (the last, a join) answers with every model output."""
    sinks = [s for s in plan.stages if any(o.model_output for o in s.outputs)]
    assert [s.name for s in sinks] == [plan.stages[-1].name], [s.name for s in sinks]
    assert sinks[0].is_join and len(sinks[0].upstream) >= 2
    assert {o.tensor.name for o in sinks[0].outputs} == {t.name for t in plan.outputs}


async def test_outputs_of_two_branches_reach_the_caller_together(
    pipeline: Pipeline, two_heads: Case
) -> None:
    assert_gathered(two_heads.plan)
    requests = two_heads.requests(150, seed=1)
    async with pipeline.serve(two_heads) as served:
        results = [r async for r in served.client.infer_many(requests, concurrency=16)]
        assert served.client.stats().in_flight == 0
    assert len(results) == len(requests)
    for request, got in zip(requests, results, strict=True):
        two_heads.check(request, got)


async def test_default_function_split_with_join_and_two_heads_in_process(
    heads_after_join: Case,
) -> None:
    plan = heads_after_join.plan
    assert_gathered(plan)
    assert sum(s.is_join for s in plan.stages) >= 2, "the model's join and the gather"
    requests = heads_after_join.requests(120, seed=2)
    async with connect(None, plan=plan, timeout=60.0) as client:
        results = [r async for r in client.infer_many(requests, concurrency=16)]
    for request, got in zip(requests, results, strict=True):
        heads_after_join.check(request, got)
