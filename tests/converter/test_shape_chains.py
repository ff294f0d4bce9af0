"""Issue 11, class 2: shape values that depend on the batch float (``converter.recompute``).

The model (tests/converter/builders.py ``computed_batch_attention``) is what tf2onnx writes
for a hand-written attention with a dynamic batch: ``b = tf.shape(x)[0]`` taken once at
the input, read by every block's Reshape and the mask's Expand. Before, the batch size
lived from the first node to the last and no cut in between was allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converter import convert
from converter.export import prepare
from converter.graph import analyze
from converter.split_layer import allowed_cuts
from converter.verify import max_relative_error, run_model, run_plan_sequentially
from tests.converter import builders
from tests.converter.conftest import TOLERANCE, assert_batched_cuts, assert_reproduces


def test_a_computed_batch_no_longer_blocks_the_cuts_between(tmp_path: Path) -> None:
    model = builders.computed_batch_attention()
    prepared = prepare(model)
    before = allowed_cuts(analyze(prepared, recompute=False))
    analysis = analyze(prepared)
    after = allowed_cuts(analysis)
    # before: one position at the start and the 4 behind the last block's Reshape (87 nodes:
    # the batch size lived across everything in between); after: every position
    assert len(before) == 5 and before[1] > 80
    assert after == list(range(1, analysis.n))
    assert {analysis.nodes[k].op_type for k in analysis.floating} == {"Shape", "Cast",
                                                                      "Slice", "Concat"}
    for k in range(2, 9):
        plan = convert(model, tmp_path / f"k{k}", by="layer", stages=k)
        assert len(plan.stages) == k
        assert_batched_cuts(plan)
        carried = {i.tensor.name for s in plan.stages for i in s.inputs}
        assert not carried & {"b", "split_shape", "merge_shape", "mask_shape"}
        for batch in (1, 3):
            assert_reproduces(tmp_path / f"k{k}", prepared, batch=batch, seed=k)


def test_each_stage_takes_the_batch_from_what_it_receives(tmp_path: Path) -> None:
    """Workers batch afresh at every stage: a later stage run on another batch size than
    stage 0 saw still reshapes right (the batch size was never sent)."""
    model = builders.computed_batch_attention()
    plan = convert(model, tmp_path / "p", by="layer", stages=3)
    x = np.random.default_rng(1).standard_normal((5, 8, 16)).astype(np.float32)
    want = run_model(prepare(model), {"x": x})["y"]
    import onnxruntime as ort

    def run(i: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = ort.InferenceSession(str(plan.stage_path(plan.stages[i].name)),
                                    providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in sess.get_outputs()],
                        sess.run(None, feeds), strict=True))

    mid = run(0, {"x": x})
    # stage 1 and 2 run the 5 requests as a batch of 2 and a batch of 3
    parts = [run(2, run(1, {k: v[a:b] for k, v in mid.items()}))["y"]
             for a, b in ((0, 2), (2, 5))]
    assert max_relative_error({"y": np.concatenate(parts)}, {"y": want}) <= TOLERANCE


def test_a_root_with_a_symbolic_length_is_carried_instead(tmp_path: Path) -> None:
    """``Shape(x)[0:2]`` with a symbolic sequence: no stage can rebuild it from another
    tensor, so ``x`` (batched) travels to the readers and each stage takes it from there."""
    model = builders.computed_batch_attention(dynamic_seq=True)
    prepared = prepare(model)
    assert len(allowed_cuts(analyze(prepared))) > 8 * len(
        allowed_cuts(analyze(prepared, recompute=False)))
    for k in range(2, 9):
        plan = convert(model, tmp_path / f"k{k}", by="layer", stages=k, dims={"seq": 6})
        assert all("x" in {i.tensor.name for i in s.inputs} for s in plan.stages)
        for batch in (1, 3):
            x = np.random.default_rng(k).standard_normal((batch, 6, 16)).astype(np.float32)
            err = max_relative_error(run_plan_sequentially(plan, {"x": x}),
                                     run_model(prepared, {"x": x}))
            assert err <= TOLERANCE


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_a_rebuilt_shape_matches_the_original(op: str, tmp_path: Path) -> None:
    """Shape with an end, and Size, of a root the later stages lack: the target shape is
    read by an early and by the last Reshape, ``x`` by the first nodes only."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    if op == "Shape":  # target = [*Shape(x)[:-1], 4] = [N, 3, 4]
        chain = [n("Shape", ["x"], ["s"], end=-1), n("Concat", ["s", "four"], ["target"], axis=0)]
        out = ["N", 3, 4]
    else:  # target = [Size(x) / 12, 12] = [N, 12]
        chain = [n("Size", ["x"], ["s"]), n("Div", ["s", "twelve"], ["rows"]),
                 n("Unsqueeze", ["rows", "zero"], ["rows1"]),
                 n("Concat", ["rows1", "twelve1"], ["target"], axis=0)]
        out = ["N", 12]
    nodes = [*chain, n("Relu", ["x"], ["h0"]), n("Reshape", ["h0", "target"], ["h1"]),
             n("Tanh", ["h1"], ["h2"]), n("Neg", ["h2"], ["h3"]), n("Sigmoid", ["h3"], ["h4"]),
             n("Reshape", ["h4", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for v, name in
             ((12, "twelve"), ([12], "twelve1"), ([0], "zero"), ([4], "four"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    for k in (3, 4):
        plan = convert(model, tmp_path / f"k{k}", by="layer", stages=k)
        last = onnx.load(str(plan.stage_path(plan.stages[-1].name)))
        assert "x" not in {i.name for i in last.graph.input}
        assert any(node.name.startswith("s__rebuilt") for node in last.graph.node)
        for batch in (1, 3):
            assert_reproduces(tmp_path / f"k{k}", prepare(model), batch=batch)
