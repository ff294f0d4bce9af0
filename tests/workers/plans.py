"""Tiny hand-built plans for worker tests (onnx.helper; ir_version 10 for onnxruntime 1.31)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conveyor.plan import (
    MODEL_INPUT,
    Partitioning,
    Plan,
    Scheduling,
    StageInput,
    StageOutput,
    StageSchedule,
    StageSpec,
    TensorSpec,
)

WIDTH = 4
OPSET = 17


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, list[object]]],
    outputs: Sequence[tuple[str, int, list[object]]],
    inits: Sequence[onnx.TensorProto] = (),
) -> None:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _schedule(max_batch: int, max_delay_ms: float) -> Scheduling:
    return Scheduling(default=StageSchedule(max_batch=max_batch, max_delay_ms=max_delay_ms))


def _affine(path: Path, x: str, y: str, scale: float, shift: float, width: int = WIDTH) -> None:
    """y = relu(x * scale + shift) on [batch, width] float32."""
    s = numpy_helper.from_array(np.float32(scale).reshape(()), f"{path.stem}_s")
    b = numpy_helper.from_array(np.float32(shift).reshape(()), f"{path.stem}_b")
    nodes = [
        helper.make_node("Mul", [x, s.name], [f"{path.stem}_m"]),
        helper.make_node("Add", [f"{path.stem}_m", b.name], [f"{path.stem}_a"]),
        helper.make_node("Relu", [f"{path.stem}_a"], [y]),
    ]
    shape: list[object] = ["batch", width]
    _save(path, nodes, [(x, TensorProto.FLOAT, shape)], [(y, TensorProto.FLOAT, shape)], [s, b])


def spec(name: str, width: int = WIDTH) -> TensorSpec:
    return TensorSpec(name, "float32", ("batch", width))


def chain_plan(
    directory: Path,
    k: int = 3,
    *,
    max_batch: int = 8,
    max_delay_ms: float = 5.0,
    partitioning: Partitioning | None = None,
    width: int = WIDTH,
    name: str = "chain",
) -> Plan:
    """k stages in a row; stage i computes relu(x * (i + 2) + 1)."""
    stages = []
    for i in range(k):
        x = "x" if i == 0 else f"h{i}"
        y = "y" if i == k - 1 else f"h{i + 1}"
        _affine(directory / f"s{i}.onnx", x, y, i + 2.0, 1.0, width)
        stages.append(
            StageSpec(
                name=f"s{i}",
                file=f"s{i}.onnx",
                inputs=(StageInput(spec(x, width), MODEL_INPUT if i == 0 else f"s{i - 1}"),),
                outputs=(
                    StageOutput(spec(y, width), () if i == k - 1 else (f"s{i + 1}",), i == k - 1),
                ),
            )
        )
    plan = Plan(
        name=name,
        opset=OPSET,
        inputs=(spec("x", width),),
        outputs=(spec("y", width),),
        stages=tuple(stages),
        partitioning=partitioning or Partitioning(),
        scheduling=Scheduling(
            default=StageSchedule(max_batch=max_batch, max_delay_ms=max_delay_ms)
        ),
    )
    return plan.save(directory)


def chain_expected(x: np.ndarray, k: int = 3) -> np.ndarray:
    for i in range(k):
        x = np.maximum(x * np.float32(i + 2) + np.float32(1), 0)
    return x


def join_plan(
    directory: Path, *, max_batch: int = 8, max_delay_ms: float = 5.0, name: str = "join"
) -> Plan:
    """fork: h = relu(2x+1); left: l = relu(3h+1); right: r = relu(4h+1); join: y = l + r."""
    _affine(directory / "fork.onnx", "x", "h", 2.0, 1.0)
    _affine(directory / "left.onnx", "h", "l", 3.0, 1.0)
    _affine(directory / "right.onnx", "h", "r", 4.0, 1.0)
    shape: list[object] = ["batch", WIDTH]
    _save(
        directory / "join.onnx",
        [helper.make_node("Add", ["l", "r"], ["y"])],
        [("l", TensorProto.FLOAT, shape), ("r", TensorProto.FLOAT, shape)],
        [("y", TensorProto.FLOAT, shape)],
    )
    stages = (
        StageSpec(
            "fork",
            "fork.onnx",
            (StageInput(spec("x"), MODEL_INPUT),),
            (StageOutput(spec("h"), ("left", "right")),),
        ),
        StageSpec(
            "left",
            "left.onnx",
            (StageInput(spec("h"), "fork"),),
            (StageOutput(spec("l"), ("join",)),),
        ),
        StageSpec(
            "right",
            "right.onnx",
            (StageInput(spec("h"), "fork"),),
            (StageOutput(spec("r"), ("join",)),),
        ),
        StageSpec(
            "join",
            "join.onnx",
            (StageInput(spec("l"), "left"), StageInput(spec("r"), "right")),
            (StageOutput(spec("y"), (), True),),
        ),
    )
    plan = Plan(
        name="join",
        opset=OPSET,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        stages=stages,
        scheduling=Scheduling(
            default=StageSchedule(max_batch=max_batch, max_delay_ms=max_delay_ms)
        ),
    )
    return plan.save(directory)


def join_expected(x: np.ndarray) -> np.ndarray:
    h = np.maximum(2 * x + 1, 0)
    return np.maximum(3 * h + 1, 0) + np.maximum(4 * h + 1, 0)


def gather_plan(
    directory: Path, *, max_batch: int = 8, max_delay_ms: float = 5.0, name: str = "gather"
) -> Plan:
    """One stage: y = GatherElements(x, idx, axis=1); an index >= WIDTH makes onnxruntime fail."""
    _save(
        directory / "g.onnx",
        [helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
        [("x", TensorProto.FLOAT, ["batch", WIDTH]), ("idx", TensorProto.INT64, ["batch", 1])],
        [("y", TensorProto.FLOAT, ["batch", 1])],
    )
    idx = TensorSpec("idx", "int64", ("batch", 1))
    y = TensorSpec("y", "float32", ("batch", 1))
    plan = Plan(
        name="gather",
        opset=OPSET,
        inputs=(spec("x"), idx),
        outputs=(y,),
        stages=(
            StageSpec(
                "g",
                "g.onnx",
                (StageInput(spec("x"), MODEL_INPUT), StageInput(idx, MODEL_INPUT)),
                (StageOutput(y, (), True),),
            ),
        ),
        scheduling=Scheduling(
            default=StageSchedule(max_batch=max_batch, max_delay_ms=max_delay_ms)
        ),
    )
    return plan.save(directory)


def branches_plan(
    directory: Path, *, max_batch: int = 8, max_delay_ms: float = 5.0, name: str = "branches"
) -> Plan:
    """Two entry stages and a join that also reads the model input (a function split):
    a = relu(2x+1); b = relu(3x+1); join: y = a + b + x."""
    _affine(directory / "a.onnx", "x", "a", 2.0, 1.0)
    _affine(directory / "b.onnx", "x", "b", 3.0, 1.0)
    shape: list[object] = ["batch", WIDTH]
    _save(
        directory / "j.onnx",
        [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "x"], ["y"])],
        [
            ("a", TensorProto.FLOAT, shape),
            ("b", TensorProto.FLOAT, shape),
            ("x", TensorProto.FLOAT, shape),
        ],
        [("y", TensorProto.FLOAT, shape)],
    )
    stages = (
        StageSpec(
            "a", "a.onnx", (StageInput(spec("x"), MODEL_INPUT),), (StageOutput(spec("a"), ("j",)),)
        ),
        StageSpec(
            "b", "b.onnx", (StageInput(spec("x"), MODEL_INPUT),), (StageOutput(spec("b"), ("j",)),)
        ),
        StageSpec(
            "j",
            "j.onnx",
            (
                StageInput(spec("a"), "a"),
                StageInput(spec("b"), "b"),
                StageInput(spec("x"), MODEL_INPUT),
            ),
            (StageOutput(spec("y"), (), True),),
        ),
    )
    plan = Plan(
        name=name,
        opset=OPSET,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        stages=stages,
        scheduling=_schedule(max_batch, max_delay_ms),
    )
    return plan.save(directory)


def branches_expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(2 * x + 1, 0) + np.maximum(3 * x + 1, 0) + x
