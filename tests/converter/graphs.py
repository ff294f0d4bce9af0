"""Hand-built ONNX graphs for the cases exported models rarely show clearly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR = 8
F = TensorProto.FLOAT


def _model(graph: onnx.GraphProto, opset: int = 17,
           extra: list[onnx.OperatorSetIdProto] | None = None,
           functions: list[onnx.FunctionProto] | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *(extra or [])],
                              functions=functions or [])
    model.ir_version = IR
    onnx.checker.check_model(model)
    return model


def _weights(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def control_flow() -> onnx.ModelProto:
    """If and Loop bodies that read outer values; one weight shared by distant nodes."""
    n = helper.make_node
    then_g = helper.make_graph([n("Add", ["c", "a"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", F, None)])
    else_g = helper.make_graph([n("Sub", ["c", "b"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", F, None)])
    body = helper.make_graph(
        [n("Add", ["v_in", "a"], ["v_sum"]), n("Mul", ["v_sum", "half"], ["v_out"]),
         n("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", F, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", F, None)],
    )
    nodes = [
        n("MatMul", ["x", "W"], ["a0"], name="mm_first"),
        n("Relu", ["a0"], ["a"]),
        n("Mul", ["x", "scale"], ["b"]),
        n("Add", ["a", "b"], ["c"]),
        n("ReduceSum", ["c"], ["total"], keepdims=0),
        n("Greater", ["total", "zero"], ["cond"]),
        n("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        n("Tanh", ["branch"], ["t1"]),
        n("Loop", ["trips", "true"], ["looped"], body=body),
        n("MatMul", ["looped", "W"], ["y0"], name="mm_shared"),
        n("Sigmoid", ["y0"], ["y1"]),
        n("Add", ["y1", "t1"], ["y"]),
    ]
    inits = [
        _weights("W", (8, 8), 0), _weights("scale", (8,), 1),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
    ]
    # the Loop carries "branch" in: give it as the loop's initial value
    nodes[8].input.append("branch")
    graph = helper.make_graph(nodes, "control_flow",
                              [helper.make_tensor_value_info("x", F, ["N", 8])],
                              [helper.make_tensor_value_info("y", F, ["N", 8])], inits)
    return _model(graph)


def multi_io() -> onnx.ModelProto:
    """Two inputs, two outputs (one ready early), an omitted optional input, a shape path."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["x1", "W1"], ["h1"]),
        n("Clip", ["h1", "", "cap"], ["h1c"]),  # min omitted: an empty optional input
        n("Softmax", ["h1c"], ["early"]),  # a model output produced early
        n("Shape", ["x2"], ["x2_shape"]),
        n("Reshape", ["x2", "flat_shape"], ["x2_flat"]),
        n("MatMul", ["x2_flat", "W2"], ["h2"]),
        n("Concat", ["h1c", "h2"], ["h"], axis=1),
        n("MatMul", ["h", "W3"], ["h3"]),
        n("Relu", ["h3"], ["h3r"]),
        n("Reshape", ["h3r", "x2_shape"], ["late"]),  # back to x2's shape: reads Shape(x2)
        n("Add", ["late", "x2"], ["late_sum"]),
    ]
    inits = [
        _weights("W1", (6, 4), 2), _weights("W2", (8, 4), 3), _weights("W3", (8, 8), 4),
        numpy_helper.from_array(np.array(0.7, np.float32), "cap"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("x1", F, ["B", 6]),
         helper.make_tensor_value_info("x2", F, ["B", 2, 4])],
        [helper.make_tensor_value_info("early", F, ["B", 4]),
         helper.make_tensor_value_info("late_sum", F, ["B", 2, 4])],
        inits,
    )
    return _model(graph)


def local_functions() -> onnx.ModelProto:
    """A model-local function called three times, with a weight passed to each call."""
    n = helper.make_node
    fn = helper.make_function(
        "custom", "ScaledRelu", ["X", "S"], ["Y"],
        [n("Mul", ["X", "S"], ["XS"]), n("Relu", ["XS"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        n("MatMul", ["x", "W"], ["h0"]),
        n("ScaledRelu", ["h0", "s"], ["h1"], domain="custom"),
        n("MatMul", ["h1", "W"], ["h2"]),
        n("ScaledRelu", ["h2", "s"], ["h3"], domain="custom"),
        n("MatMul", ["h3", "W"], ["h4"]),
        n("ScaledRelu", ["h4", "s"], ["y"], domain="custom"),
    ]
    graph = helper.make_graph(
        nodes, "local_functions", [helper.make_tensor_value_info("x", F, ["B", 5])],
        [helper.make_tensor_value_info("y", F, ["B", 5])],
        [_weights("W", (5, 5), 5), numpy_helper.from_array(np.full(5, 0.9, np.float32), "s")],
    )
    return _model(graph, extra=[helper.make_opsetid("custom", 1)], functions=[fn])


def wide(size: int = 64, layers: int = 4) -> onnx.ModelProto:
    """A chain of MatMuls with weights big enough to be stored as external data."""
    n = helper.make_node
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        nodes += [n("MatMul", [prev, f"W{i}"], [f"m{i}"]), n("Tanh", [f"m{i}"], [f"t{i}"])]
        inits.append(_weights(f"W{i}", (size, size), 10 + i))
        prev = f"t{i}"
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", F, ["B", size])],
                              [helper.make_tensor_value_info(prev, F, ["B", size])], inits)
    return _model(graph)


def no_batch() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "no_batch",
                              [helper.make_tensor_value_info("x", F, [3, 4])],
                              [helper.make_tensor_value_info("y", F, [3, 4])])
    return _model(graph)


def with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The same model claiming another default-domain opset (not checked: may be invalid)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.opset_import:
        if o.domain == "":
            o.version = opset
    return out


def time_major() -> onnx.ModelProto:
    """A stretch where tensors are [seq, batch, ...] (cut inside, they cross batch-first)."""
    n = helper.make_node
    nodes = [
        n("Relu", ["x"], ["r"]),
        n("Transpose", ["r"], ["tm"], perm=[1, 0, 2]),
        n("Tanh", ["tm"], ["tm1"]),
        n("Sigmoid", ["tm1"], ["tm2"]),
        n("Transpose", ["tm2"], ["bm"], perm=[1, 0, 2]),
        n("Neg", ["bm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "time_major",
                              [helper.make_tensor_value_info("x", F, ["B", "T", 4])],
                              [helper.make_tensor_value_info("y", F, ["B", "T", 4])])
    return _model(graph)


def two_heads() -> onnx.ModelProto:
    """Two branches from one input, each ending in its own model output, and no join.

    Node names are scoped like a Keras export (``net/left/...``), so a function split makes
    one stage per branch; the outputs are listed right first, against the node order.
    """
    def n(op: str, ins: list[str], outs: list[str], name: str) -> onnx.NodeProto:
        return helper.make_node(op, ins, outs, name=f"net/{name}")

    nodes = [
        n("MatMul", ["x", "WL"], ["l1"], "left/matmul"),
        n("Relu", ["l1"], ["left_out"], "left/relu"),
        n("MatMul", ["x", "WR1"], ["r1"], "right/matmul1"),
        n("Tanh", ["r1"], ["r2"], "right/tanh"),
        n("MatMul", ["r2", "WR2"], ["right_out"], "right/matmul2"),
    ]
    inits = [_weights("WL", (6, 4), 20), _weights("WR1", (6, 5), 21), _weights("WR2", (5, 3), 22)]
    graph = helper.make_graph(
        nodes, "two_heads", [helper.make_tensor_value_info("x", F, ["B", 6])],
        [helper.make_tensor_value_info("right_out", F, ["B", 3]),
         helper.make_tensor_value_info("left_out", F, ["B", 4])],
        inits,
    )
    return _model(graph)


def early_output() -> onnx.ModelProto:
    """A chain whose first half's result is a model output and also feeds the second half."""
    def n(op: str, ins: list[str], outs: list[str], name: str) -> onnx.NodeProto:
        return helper.make_node(op, ins, outs, name=f"net/{name}")

    nodes = [
        n("MatMul", ["x", "W1"], ["m1"], "first/matmul"),
        n("Relu", ["m1"], ["mid"], "first/relu"),
        n("MatMul", ["mid", "W2"], ["m2"], "second/matmul"),
        n("Tanh", ["m2"], ["final"], "second/tanh"),
    ]
    graph = helper.make_graph(
        nodes, "early_output", [helper.make_tensor_value_info("x", F, ["B", 6])],
        [helper.make_tensor_value_info("mid", F, ["B", 5]),
         helper.make_tensor_value_info("final", F, ["B", 3])],
        [_weights("W1", (6, 5), 30), _weights("W2", (5, 3), 31)],
    )
    return _model(graph)
