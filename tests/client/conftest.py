"""The client tests' plan: one stage computing y = 3 * x + 1."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.plan import MODEL_INPUT, Plan, StageInput, StageOutput, StageSpec, TensorSpec


@pytest.fixture(scope="module")
def scale_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """A one-stage plan computing y = 3 * x + 1 (a hand-built ONNX graph)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("scale")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["x3"], name="mul"),
         helper.make_node("Add", ["x3", "one"], ["y"], name="add")],
        "scale", [x], [y],
        initializer=[numpy_helper.from_array(np.array(3, np.float32), "three"),
                     numpy_helper.from_array(np.array(1, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "scale.onnx"))
    xs = TensorSpec("x", "float32", ("batch", 3))
    ys = TensorSpec("y", "float32", ("batch", 3))
    stage = StageSpec("scale", "scale.onnx", (StageInput(xs, MODEL_INPUT),),
                      (StageOutput(ys, (), model_output=True),))
    return Plan(name="scale", opset=17, inputs=(xs,), outputs=(ys,), stages=(stage,)).save(root)
