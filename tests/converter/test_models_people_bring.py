"""Issue 11: the models people bring split by layer at every K their work allows, exactly.

Each model is built here (tests/converter/builders.py); every split is chained with
onnxruntime against the whole model on random inputs at batch 1 and at batch 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from converter import convert
from converter.api import analyze_model
from converter.export import prepare
from converter.graph import analyze
from converter.report import read_report
from converter.split_layer import allowed_cuts
from converter.verify import max_relative_error, run_model, run_plan_sequentially
from conveyor.errors import UnsupportedModelError
from conveyor.plan import Plan
from tests.converter import builders
from tests.converter.conftest import TOLERANCE, Exports, assert_batched_cuts, assert_reproduces


def merged_slivers(plan_dir: Path) -> int:
    """Stages the split merged away for doing next to nothing (said in split.json)."""
    report = read_report(plan_dir)
    assert report is not None
    return sum("merged into its neighbour" in n for n in report["notes"])


def every_layer_split(src: Any, ref: Any, tmp: Path, *, least: int = 4,
                      **options: Any) -> int:
    """Split ``src`` by layer for K = 2..min(8, cuts + 1), check each against ``ref``;
    returns the largest K."""
    analysis, _ = analyze_model(src, batch_axes=options.get("batch_axes"))
    top = min(8, len(allowed_cuts(analysis)) + 1)
    assert top >= least, f"only {top - 1} cut positions"
    for k in range(2, top + 1):
        plan = convert(src, tmp / f"k{k}", by="layer", stages=k, **options)
        assert len(plan.stages) == k - merged_slivers(tmp / f"k{k}")
        assert_batched_cuts(plan)
        for batch in (1, 3):
            assert_reproduces(tmp / f"k{k}", ref, batch=batch, seed=k)
    return top


@pytest.mark.parametrize("name", ["se_cnn", "transformer", "gray_cnn"])
def test_batch_is_followed_through_computed_reshapes_and_broadcasts(
    name: str, exports: Exports, tmp_path: Path
) -> None:
    src = exports.get(name)
    model = onnx.load(str(src))
    static = len(allowed_cuts(analyze(model, probe=False)))
    probed = allowed_cuts(analyze(model))
    # shape inference alone loses the batch at the first computed Reshape / broadcast
    assert len(probed) > static
    assert len(probed) >= 10
    assert every_layer_split(src, src, tmp_path, least=8) == 8


def test_int64_tokens_stay_int64(exports: Exports, tmp_path: Path) -> None:
    plan = convert(exports.get("transformer"), tmp_path / "p", by="layer", stages=4)
    assert [(t.name, t.dtype, t.shape) for t in plan.inputs] == [("tokens", "int64",
                                                                 ("batch", 16))]
    shares = [s.cost.share for s in plan.stages]
    assert max(shares) < 0.6, shares  # the work is spread, not all in one stage


def test_a_batch_one_export_becomes_batch_symbolic(tmp_path: Path) -> None:
    model = builders.batch_one()
    plan = convert(model, tmp_path / "p", by="layer", stages=2)
    assert plan.inputs[0].shape == ("batch", 4, 8)
    assert plan.outputs[0].shape == ("batch", 32)
    every_layer_split(model, prepare(model), tmp_path / "all", least=8)


def test_a_batch_hard_coded_inside_is_refused_naming_the_reshape(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"Reshape 'flatten' to \[1, 32\]"):
        convert(builders.batch_one(hard_coded=True), tmp_path / "p", stages=2)
    assert not (tmp_path / "p").exists()


def test_minus_one_dimensions_are_symbolic(tmp_path: Path) -> None:
    model = builders.minus_one_dims()
    plan = convert(model, tmp_path / "p", by="layer", stages=2)
    assert plan.inputs[0].shape == ("batch", 16)
    every_layer_split(model, prepare(model), tmp_path / "all", least=8)


def _time_major_reference(model: onnx.ModelProto, plan: Plan,
                          inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original model on the plan's batch-first inputs, its outputs made batch-first."""
    want = run_model(model, {"x": inputs["x"].transpose(1, 0, 2),
                             "state": inputs["state"].transpose(1, 0, 2)})
    return {"y": want["y"], "yh1": want["yh1"].transpose(1, 0, 2)}


@pytest.mark.parametrize("axes", [{}, {"x": 1, "state": 1, "yh1": 1}])
def test_time_major_lstm_with_state_batched_on_axis_1(axes: dict[str, int],
                                                       tmp_path: Path) -> None:
    """Found from the dimension named ``batch``, or given as --batch-axis NAME=AXIS."""
    from converter.verify import random_inputs

    model = builders.time_major_lstm()
    top = every_layer_split(model, prepare(model, batch_axes=axes), tmp_path, least=8,
                            batch_axes=axes)
    plan = Plan.load(tmp_path / f"k{top}")
    carried = {i.tensor.name for k in range(2, top + 1)
               for s in Plan.load(tmp_path / f"k{k}").stages for i in s.inputs}
    # cuts inside the time-major LSTM stack: those tensors cross batch-first
    assert {"y1__batch_first", "seq1__batch_first"} & carried, carried
    shapes = {t.name: t.shape for t in (*plan.inputs, *plan.outputs)}
    assert shapes == {"x": ("batch", "time", 6), "state": ("batch", 1, 8), "y": ("batch", 8),
                      "yh1": ("batch", 1, 8)}
    for batch in (1, 3):
        inputs = random_inputs(plan, batch=batch, seed=batch)
        inputs["x"] = np.random.default_rng(batch).standard_normal((batch, 5, 6), np.float32)
        err = max_relative_error(run_plan_sequentially(plan, inputs),
                                 _time_major_reference(model, plan, inputs))
        assert err <= TOLERANCE


def test_a_scalar_input_is_one_value_per_request(tmp_path: Path) -> None:
    model = builders.per_request_scalar()
    every_layer_split(model, prepare(model), tmp_path / "all", least=8)
    plan = convert(model, tmp_path / "p", by="layer", stages=3)
    assert {t.name: t.shape for t in plan.inputs}["gain"] == ("batch",)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    gain = np.array([0.5, -2.0, 3.0], np.float32)
    got = run_plan_sequentially(plan, {"x": x, "gain": gain})["y"]
    for i in range(3):  # each request against the original model run on its own
        want = run_model(model, {"x": x[i:i + 1], "gain": np.array(gain[i])})["y"]
        assert max_relative_error({"y": got[i:i + 1]}, {"y": want}) <= TOLERANCE


def test_a_scalar_used_as_a_shape_is_refused_naming_the_node(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "n"], ["y"], name="reshape_by_n")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="scalar read by Reshape 'reshape_by_n'"):
        convert(model, tmp_path / "p", stages=2)


def test_long_lived_shape_tensors_are_folded_and_cuts_open(tmp_path: Path) -> None:
    model = builders.yolo_head()
    prepared = prepare(model)
    static = allowed_cuts(analyze(prepared, probe=False))
    analysis = analyze(prepared)
    # the grid size lived from the first node to the last: no cut between the convs
    assert len(allowed_cuts(analysis)) > len(static) + 5
    assert "cells" in analysis.initializers  # folded: every stage gets its own copy
    every_layer_split(model, prepared, tmp_path, least=8)


def test_a_top_level_if_decided_at_plan_time_is_split_inside(tmp_path: Path) -> None:
    model = builders.top_level_if()
    assert len(model.graph.node) == 4
    analysis = analyze(prepare(model))
    assert not any(n.op_type == "If" for n in analysis.nodes)
    every_layer_split(model, prepare(model), tmp_path, least=8)


def test_a_top_level_if_decided_by_the_data_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    from conveyor.errors import SplitError

    model = builders.top_level_if(by_data=True)
    holds = r"If 'main_if' holds \d+% of the model's nodes in one node"
    with pytest.raises(SplitError, match=holds) as refused:
        convert(model, tmp_path / "p", by="layer", stages=2)
    assert "--constant cond=1" in str(refused.value)  # the way out (test_plan_time_choices)
    plan = convert(model, tmp_path / "one", by="layer", stages=1)  # unsplit still serves
    for batch in (1, 3):
        assert_reproduces(tmp_path / "one", prepare(model), batch=batch)
    assert len(plan.stages) == 1


@pytest.mark.parametrize("name", ["se_cnn", "transformer"])
def test_function_split_of_branching_models(name: str, exports: Exports,
                                            tmp_path: Path) -> None:
    src = exports.get(name)
    plan = convert(src, tmp_path / "p", by="function", stages=4)
    assert 2 <= len(plan.stages) <= 4
    for batch in (1, 3):
        assert_reproduces(tmp_path / "p", src, batch=batch)


def test_two_towers_run_side_by_side_despite_the_shared_transpose(exports: Exports,
                                                                   tmp_path: Path) -> None:
    src = exports.get("two_towers")
    plan = convert(src, tmp_path / "p", by="function",
                   groups=["towerA=towerA", "towerB=towerB"])
    a, b = (next(s for s in plan.stages if s.group == g) for g in ("towerA", "towerB"))
    # neither tower waits for the other: each reads only what is upstream of both
    assert b.name not in a.upstream and a.name not in b.upstream
    assert set(a.upstream) == set(b.upstream)
    for batch in (1, 3):
        assert_reproduces(tmp_path / "p", src, batch=batch)


def test_symbolic_sizes_are_costed_at_the_given_dims(tmp_path: Path) -> None:
    model = builders.dynamic_image()
    small = convert(model, tmp_path / "small", by="layer", stages=2)
    big = convert(model, tmp_path / "big", by="layer", stages=2,
                  dims={"height": 64, "width": 48})
    cut_small = small.stages[1].cost.in_bytes_per_sample
    cut_big = big.stages[1].cost.in_bytes_per_sample
    assert cut_big == cut_small * 64 * 48  # one 8-channel map, 1x1 before, 64x48 now
    assert big.stages[0].cost.flops == pytest.approx(small.stages[0].cost.flops * 64 * 48,
                                                     rel=0.01)
    report = read_report(tmp_path / "big")
    assert report is not None and report["dims"] == {"height": 64, "width": 48}
    assert big.inputs[0].shape == ("batch", 3, "height", "width")  # the plan stays dynamic
    for batch in (1, 3):
        assert_reproduces(tmp_path / "big", prepare(model), batch=batch)
