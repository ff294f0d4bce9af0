"""Plans of real ONNX stages with a chosen cost, for the controller's real-worker tests.

``weighted_chain_plan`` is ``tests.workers.plans.chain_plan`` (stage i computes
``relu(x * (i + 2) + 1)`` on ``[batch, 4]``) where chosen stages are made heavy: before
the affine step they lift ``x`` into ``width`` columns, multiply it ``depth`` times by an
identity matrix and project it back. The identity products are exact in float32 (each
output is one ``x * 1`` plus zeros), so a heavy stage computes the very same values as
the light one (``chain_expected``), at a cost of about ``depth x 2 x width^2`` FLOPs per row
that onnxruntime cannot fold away (the chain depends on the input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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


def _spec(name: str) -> TensorSpec:
    return TensorSpec(name, "float32", ("batch", WIDTH))


def _stage_model(path: Path, x: str, y: str, scale: float, heavy: tuple[int, int] | None) -> None:
    """y = relu(lift-identity^depth-project(x) * scale + 1) on [batch, 4] float32."""
    p = path.stem
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{p}_s"),
        numpy_helper.from_array(np.array(1.0, np.float32), f"{p}_b"),
    ]
    nodes: list[onnx.NodeProto] = []
    src = x
    if heavy is not None:
        width, depth = heavy
        lift = np.zeros((WIDTH, width), np.float32)
        lift[:, :WIDTH] = np.eye(WIDTH, dtype=np.float32)
        inits += [
            numpy_helper.from_array(lift, f"{p}_lift"),
            numpy_helper.from_array(np.eye(width, dtype=np.float32), f"{p}_eye"),
            numpy_helper.from_array(np.ascontiguousarray(lift.T), f"{p}_proj"),
        ]
        nodes.append(helper.make_node("MatMul", [x, f"{p}_lift"], [f"{p}_z0"]))
        for i in range(depth):
            nodes.append(helper.make_node("MatMul", [f"{p}_z{i}", f"{p}_eye"], [f"{p}_z{i + 1}"]))
        nodes.append(helper.make_node("MatMul", [f"{p}_z{depth}", f"{p}_proj"], [f"{p}_x"]))
        src = f"{p}_x"
    nodes += [
        helper.make_node("Mul", [src, f"{p}_s"], [f"{p}_m"]),
        helper.make_node("Add", [f"{p}_m", f"{p}_b"], [f"{p}_a"]),
        helper.make_node("Relu", [f"{p}_a"], [y]),
    ]
    shape: list[str | int | None] = ["batch", WIDTH]
    graph = helper.make_graph(
        nodes, p,
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def weighted_chain_plan(
    directory: Path,
    k: int,
    heavy: Mapping[int, tuple[int, int]],
    *,
    name: str,
    max_batch: int = 8,
    max_delay_ms: float = 2.0,
    partitioning: Partitioning | None = None,
) -> Plan:
    """k stages in a row; ``heavy`` maps a stage index to its (width, depth)."""
    stages = []
    for i in range(k):
        x = "x" if i == 0 else f"h{i}"
        y = "y" if i == k - 1 else f"h{i + 1}"
        _stage_model(directory / f"s{i}.onnx", x, y, i + 2.0, heavy.get(i))
        stages.append(
            StageSpec(
                name=f"s{i}",
                file=f"s{i}.onnx",
                inputs=(StageInput(_spec(x), MODEL_INPUT if i == 0 else f"s{i - 1}"),),
                outputs=(StageOutput(_spec(y), () if i == k - 1 else (f"s{i + 1}",), i == k - 1),),
            )
        )
    plan = Plan(
        name=name,
        opset=OPSET,
        inputs=(_spec("x"),),
        outputs=(_spec("y"),),
        stages=tuple(stages),
        partitioning=partitioning or Partitioning(),
        scheduling=Scheduling(
            default=StageSchedule(max_batch=max_batch, max_delay_ms=max_delay_ms)
        ),
    )
    return plan.save(directory)


class WholeModel:
    """The plan's stages chained in one process, one onnxruntime session each: the
    reference every answer served through the workers is compared with."""

    def __init__(self, plan: Plan, stages: Sequence[str] | None = None) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.plan = plan
        self.sessions = [
            ort.InferenceSession(str(plan.stage_path(s.name)), opts,
                                 providers=["CPUExecutionProvider"])
            for s in plan.stages if stages is None or s.name in stages
        ]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = x
        for sess in self.sessions:
            (out,) = sess.run(None, {sess.get_inputs()[0].name: out})
        return np.asarray(out)
