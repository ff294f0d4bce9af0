"""One stage produces every model output, whatever the split (workers reply from one place).

A function split whose outputs are computed by several stages ends with a gather stage;
a layer split's last stage carries them all; ``Plan.load`` refuses a hand-made plan with
model outputs in two stages.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from converter import convert
from converter.export import prepare
from conveyor.errors import PlanError
from conveyor.plan import MODEL_INPUT, Plan, StageSpec
from tests.converter import graphs
from tests.converter.conftest import Exports, assert_reproduces


def sinks(plan: Plan) -> list[StageSpec]:
    return [s for s in plan.stages if any(o.model_output for o in s.outputs)]


def assert_one_sink_last(plan: Plan) -> StageSpec:
    """Exactly one stage has model outputs, it is the last, and it gives all of them."""
    (sink,) = sinks(plan)
    assert sink.name == plan.stages[-1].name
    assert [o.tensor.name for o in sink.outputs if o.model_output] == [
        t.name for t in plan.outputs
    ]
    return sink


def test_function_split_with_outputs_on_two_branches_gathers_them(tmp_path: Path) -> None:
    model = graphs.two_heads()
    plan = convert(model, tmp_path / "p", by="function")
    branches = [s for s in plan.stages if s.group in ("left", "right")]
    assert len(branches) == 2, [(s.name, s.group) for s in plan.stages]
    assert all({i.source for i in s.inputs} == {MODEL_INPUT} for s in branches)
    gather = assert_one_sink_last(plan)
    assert gather.group == "gather" and gather.name.endswith("_gather")
    assert gather.is_join
    assert set(gather.upstream) == {s.name for s in branches}
    # the branches send what they computed to the gather stage, not to the caller
    for s in branches:
        for o in s.outputs:
            assert not o.model_output and gather.name in o.consumers
    assert gather.cost.nodes == 0 and gather.cost.flops == 0
    assert plan.split.k == len(plan.stages) == 3
    assert_reproduces(tmp_path / "p", prepare(model), batch=3)


def test_the_gather_stage_counts_towards_stages(tmp_path: Path) -> None:
    model = graphs.two_heads()
    plan = convert(model, tmp_path / "p", by="function", stages=2)
    assert len(plan.stages) <= 2
    assert_one_sink_last(plan)
    assert_reproduces(tmp_path / "p", prepare(model))


def test_a_gather_reads_an_output_that_a_later_stage_also_reads(tmp_path: Path) -> None:
    """``mid`` is a model output and the input of the second group: both receive it."""
    model = graphs.early_output()
    plan = convert(model, tmp_path / "p", by="function", groups=["one=first", "two=second"])
    assert [s.group for s in plan.stages] == ["one", "two", "gather"]
    gather = assert_one_sink_last(plan)
    first, second = plan.stages[:2]
    (mid,) = (o for o in first.outputs if o.tensor.name == "mid")
    assert not mid.model_output and set(mid.consumers) == {second.name, gather.name}
    assert_reproduces(tmp_path / "p", prepare(model))


def test_two_branch_keras_model_by_default_has_one_sink(exports: Exports,
                                                        tmp_path: Path) -> None:
    plan = convert(exports.get("branches"), tmp_path / "p", by="function")
    assert_one_sink_last(plan)
    assert len(plan.stages) <= 8
    assert_reproduces(tmp_path / "p", exports.get("branches"), seed=4)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_layer_split_keeps_every_output_in_its_last_stage(k: int, tmp_path: Path) -> None:
    plan = convert(graphs.two_heads(), tmp_path / "p", by="layer", stages=k)
    assert len(plan.stages) == k
    assert_one_sink_last(plan)


def test_plan_with_model_outputs_in_two_stages_fails_to_load(tmp_path: Path) -> None:
    good = convert(graphs.two_heads(), tmp_path / "p", by="function")
    # Hand-made: drop the gather stage, let each branch answer the caller itself.
    branches = tuple(
        dataclasses.replace(s, outputs=tuple(
            dataclasses.replace(o, consumers=(), model_output=True) for o in s.outputs
        ))
        for s in good.stages[:-1]
    )
    bad = dataclasses.replace(good, stages=branches, hash="")
    with pytest.raises(PlanError, match="model outputs come from 2 stages") as err:
        bad.validate()
    for s in branches:
        assert s.name in str(err.value)
    target = tmp_path / "bad"
    target.mkdir()
    for s in branches:
        shutil.copy2(tmp_path / "p" / s.file, target / s.file)
    bad.save(target)  # saving does not check; loading does
    with pytest.raises(PlanError, match="model outputs come from 2 stages"):
        Plan.load(target)
