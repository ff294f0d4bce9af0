"""Hand-built graphs: control flow captures, shared weights, external data, local functions,
several inputs and outputs, omitted optional inputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from converter import convert
from converter.export import prepare
from converter.graph import analyze
from converter.split_layer import allowed_cuts
from conveyor.errors import SplitError
from conveyor.plan import MODEL_INPUT, Plan
from tests.converter import graphs
from tests.converter.conftest import assert_batched_cuts, assert_reproduces

CASES = {
    "control_flow": graphs.control_flow,
    "multi_io": graphs.multi_io,
    "local_functions": graphs.local_functions,
    "wide": graphs.wide,
}
#: Cases whose layers form one chain: a function split has nothing to run in parallel.
CHAINS = {"local_functions", "wide"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_layer_split_and_the_function_split_reproduce_the_model(
    case: str, tmp_path: Path
) -> None:
    model = CASES[case]()
    cuts = len(allowed_cuts(analyze(prepare(model))))
    assert cuts >= 4, f"{case}: the graph should allow several cuts, has {cuts}"
    for k in range(2, min(8, cuts + 1) + 1):
        plan = convert(model, tmp_path / f"layer{k}", by="layer", stages=k)
        assert len(plan.stages) == k
        assert_batched_cuts(plan)
        assert_reproduces(tmp_path / f"layer{k}", prepare(model))
    if case in CHAINS:  # issue 11: no parallel structure is an error, not one stage
        with pytest.raises(SplitError, match="no parallel structure"):
            convert(model, tmp_path / "function", by="function")
        return
    convert(model, tmp_path / "function", by="function")
    assert_reproduces(tmp_path / "function", prepare(model))


def test_outer_values_read_by_if_and_loop_bodies_cross_the_cut(tmp_path: Path) -> None:
    model = graphs.control_flow()
    analysis = analyze(prepare(model))
    loop = next(k for k, n in enumerate(analysis.nodes) if n.op_type == "Loop")
    # the body reads "a" (made by a Relu long before) and the weight "half"
    assert {"a", "half"} <= set(analysis.node_inputs[loop])
    assert "a" in analysis.live_at(loop)
    cuts = allowed_cuts(analysis)
    plan = convert(model, tmp_path / "p", by="layer", stages=len(cuts) + 1)
    loop_stage = next(s for s in plan.stages if s.cost.nodes == 1 and
                      any(n.op_type == "Loop" for n in
                          onnx.load(str(tmp_path / "p" / s.file)).graph.node))
    assert "a" in [i.tensor.name for i in loop_stage.inputs]
    stage_model = onnx.load(str(tmp_path / "p" / loop_stage.file))
    assert "half" in {t.name for t in stage_model.graph.initializer}
    assert_reproduces(tmp_path / "p", prepare(model))


def test_a_weight_shared_by_two_stages_is_copied_into_both(tmp_path: Path) -> None:
    model = graphs.control_flow()
    plan = convert(model, tmp_path / "p", by="layer", stages=8)
    holders = [s.name for s in plan.stages if "W" in
               {t.name for t in onnx.load(str(tmp_path / "p" / s.file)).graph.initializer}]
    assert len(holders) == 2, holders
    assert_reproduces(tmp_path / "p", prepare(model))


def test_several_inputs_and_outputs_and_an_empty_optional_input(tmp_path: Path) -> None:
    model = graphs.multi_io()
    plan = convert(model, tmp_path / "p", by="layer", stages=6)
    assert [t.name for t in plan.inputs] == ["x1", "x2"]
    assert [t.name for t in plan.outputs] == ["early", "late_sum"]
    # a chain answers from its last stage only: the early output is carried along
    last = plan.stages[-1]
    assert {o.tensor.name for o in last.outputs if o.model_output} == {"early", "late_sum"}
    assert all(not o.model_output for s in plan.stages[:-1] for o in s.outputs)
    clip = [n for s in plan.stages for n in onnx.load(str(tmp_path / "p" / s.file)).graph.node
            if n.op_type == "Clip"]
    assert [list(n.input) for n in clip] == [["h1", "", "cap"]]
    # Shape(x2) has no batch dimension: no cut may carry it
    assert all(i.tensor.name != "x2_shape" for s in plan.stages for i in s.inputs)
    assert_reproduces(tmp_path / "p", prepare(model), batch=3)


def test_local_functions_travel_with_the_stages_that_call_them(tmp_path: Path) -> None:
    model = graphs.local_functions()
    plan = convert(model, tmp_path / "p", by="layer", stages=3)
    for s in plan.stages:
        stage = onnx.load(str(tmp_path / "p" / s.file))
        if any(n.domain == "custom" for n in stage.graph.node):
            assert [f.name for f in stage.functions] == ["ScaledRelu"]
            assert any(o.domain == "custom" for o in stage.opset_import)
    assert_reproduces(tmp_path / "p", prepare(model))


def test_external_data_in_and_out(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(graphs.wide(size=64), str(src_dir / "wide.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="wide.data", size_threshold=1024)
    assert (src_dir / "wide.data").stat().st_size >= 4 * 64 * 64 * 4
    plan = convert(src_dir / "wide.onnx", tmp_path / "p", by="layer", stages=3,
                   external_threshold=1024)
    for s in plan.stages:
        data = tmp_path / "p" / (s.file + ".data")
        assert data.exists(), f"{s.name}: no external data file"
        assert (tmp_path / "p" / s.file).stat().st_size < data.stat().st_size
    assert_reproduces(tmp_path / "p", onnx.load(str(src_dir / "wide.onnx")))


def test_function_split_of_multi_io_is_a_dag_reading_inputs_where_needed(tmp_path: Path) -> None:
    plan = convert(graphs.multi_io(), tmp_path / "p", by="function")
    entry = {s.name for s in plan.entry_stages}
    assert len(entry) >= 2, "both inputs start their own branch"
    assert any(s.is_join for s in plan.stages)
    produced = {o.tensor.name for s in plan.stages for o in s.outputs if o.model_output}
    assert produced == {"early", "late_sum"}
    for s in plan.stages:
        for i in s.inputs:
            if i.source != MODEL_INPUT:
                src = plan.stage(i.source)
                assert s.name in next(o.consumers for o in src.outputs
                                      if o.tensor.name == i.tensor.name)
    assert isinstance(Plan.load(tmp_path / "p"), Plan)


def test_a_time_major_stretch_is_cut_with_its_tensors_sent_batch_first(tmp_path: Path) -> None:
    # Before issue 11 no cut could fall inside (its tensors are [seq, batch, ...]); now the
    # probe sees the batch on axis 1 and such a tensor crosses a cut transposed.
    model = graphs.time_major()
    analysis = analyze(prepare(model))
    ops = [n.op_type for n in analysis.nodes]
    inside = range(ops.index("Transpose") + 1, len(ops) - 1)  # after the first Transpose
    cuts = allowed_cuts(analysis)
    assert set(inside) <= set(cuts), (ops, cuts)
    plan = convert(model, tmp_path / "p", by="layer", stages=len(cuts) + 1)
    assert_batched_cuts(plan)
    crossing = {i.tensor.name for s in plan.stages for i in s.inputs}
    assert {"tm1__batch_first", "tm2__batch_first"} <= crossing, crossing
    for batch in (1, 3):
        assert_reproduces(tmp_path / "p", prepare(model), batch=batch)


def test_the_plan_hash_covers_external_weights(tmp_path: Path) -> None:
    from conveyor.errors import PlanError

    plan = convert(graphs.wide(), tmp_path / "p", by="layer", stages=2, external_threshold=1024)
    data = tmp_path / "p" / (plan.stages[0].file + ".data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PlanError, match="corrupt"):
        Plan.load(tmp_path / "p")
