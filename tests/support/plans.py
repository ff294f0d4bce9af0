"""Tiny hand-built plans for tests (onnx.helper; ir_version 10 for onnxruntime 1.31).

``chain_plan`` is k affine stages in a row (stage i computes ``relu(x * (i + 2) + 1)`` on
``[batch, 4]``); ``join_plan``, ``gather_plan`` and ``branches_plan`` fan out, fail on a bad
index, and join model inputs; each has its ``*_expected`` answer. ``weighted_chain_plan``
(the controller's real-worker tests) is a chain where chosen stages are made heavy: before
the affine step they lift ``x`` into ``width`` columns, multiply it ``depth`` times by an
identity matrix and project it back. The identity products are exact in float32 (each
output is one ``x * 1`` plus zeros), so a heavy stage computes the very same values as
the light one (``chain_expected``), at a cost of about ``depth x 2 x width^2`` FLOPs per row
that onnxruntime cannot fold away (the chain depends on the input). ``WholeModel`` runs a
plan's stages in one process, the reference for answers served through workers;
``isolated_copy`` gives a plan another name (hence queues of its own).
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid
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


#: A heavy stage's (width, depth): see the module's docstring.
Heavy = tuple[int, int]


def _affine(
    path: Path,
    x: str,
    y: str,
    scale: float,
    shift: float,
    width: int = WIDTH,
    heavy: Heavy | None = None,
) -> None:
    """y = relu(x * scale + shift) on [batch, width] float32; with ``heavy``, x first goes
    through the lift-identity^depth-project chain (same values, more FLOPs)."""
    p = path.stem
    s = numpy_helper.from_array(np.float32(scale).reshape(()), f"{p}_s")
    b = numpy_helper.from_array(np.float32(shift).reshape(()), f"{p}_b")
    inits = [s, b]
    nodes: list[onnx.NodeProto] = []
    src = x
    if heavy is not None:
        src = _heavy_prefix(p, x, width, heavy, nodes, inits)
    nodes += [
        helper.make_node("Mul", [src, s.name], [f"{p}_m"]),
        helper.make_node("Add", [f"{p}_m", b.name], [f"{p}_a"]),
        helper.make_node("Relu", [f"{p}_a"], [y]),
    ]
    shape: list[object] = ["batch", width]
    _save(path, nodes, [(x, TensorProto.FLOAT, shape)], [(y, TensorProto.FLOAT, shape)], inits)


def _heavy_prefix(
    p: str,
    x: str,
    columns: int,
    heavy: Heavy,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> str:
    """Append x -> lift -> identity^depth -> project to ``nodes``; the output's name."""
    width, depth = heavy
    lift = np.zeros((columns, width), np.float32)
    lift[:, :columns] = np.eye(columns, dtype=np.float32)
    inits += [
        numpy_helper.from_array(lift, f"{p}_lift"),
        numpy_helper.from_array(np.eye(width, dtype=np.float32), f"{p}_eye"),
        numpy_helper.from_array(np.ascontiguousarray(lift.T), f"{p}_proj"),
    ]
    nodes.append(helper.make_node("MatMul", [x, f"{p}_lift"], [f"{p}_z0"]))
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"{p}_z{i}", f"{p}_eye"], [f"{p}_z{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"{p}_z{depth}", f"{p}_proj"], [f"{p}_x"]))
    return f"{p}_x"


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
    heavy: Mapping[int, Heavy] | None = None,
) -> Plan:
    """k stages in a row; stage i computes relu(x * (i + 2) + 1); ``heavy`` maps a stage
    index to its (width, depth) (see the module's docstring)."""
    heavy = heavy or {}
    stages = []
    for i in range(k):
        x = "x" if i == 0 else f"h{i}"
        y = "y" if i == k - 1 else f"h{i + 1}"
        _affine(directory / f"s{i}.onnx", x, y, i + 2.0, 1.0, width, heavy.get(i))
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
        scheduling=_schedule(max_batch, max_delay_ms),
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
        name=name,
        opset=OPSET,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        stages=stages,
        scheduling=_schedule(max_batch, max_delay_ms),
    )
    return plan.save(directory)


def join_expected(x: np.ndarray) -> np.ndarray:
    h = np.maximum(2 * x + 1, 0)
    return np.maximum(3 * h + 1, 0) + np.maximum(4 * h + 1, 0)


def gather_plan(
    directory: Path,
    *,
    max_batch: int = 8,
    max_delay_ms: float = 5.0,
    name: str = "gather",
    stage: str = "g",
) -> Plan:
    """One stage: y = GatherElements(x, idx, axis=1); an index >= WIDTH makes onnxruntime fail."""
    _save(
        directory / f"{stage}.onnx",
        [helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1, name=stage)],
        [("x", TensorProto.FLOAT, ["batch", WIDTH]), ("idx", TensorProto.INT64, ["batch", 1])],
        [("y", TensorProto.FLOAT, ["batch", 1])],
    )
    idx = TensorSpec("idx", "int64", ("batch", 1))
    y = TensorSpec("y", "float32", ("batch", 1))
    plan = Plan(
        name=name,
        opset=OPSET,
        inputs=(spec("x"), idx),
        outputs=(y,),
        stages=(
            StageSpec(
                stage,
                f"{stage}.onnx",
                (StageInput(spec("x"), MODEL_INPUT), StageInput(idx, MODEL_INPUT)),
                (StageOutput(y, (), True),),
            ),
        ),
        scheduling=_schedule(max_batch, max_delay_ms),
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


def weighted_chain_plan(
    directory: Path,
    k: int,
    heavy: Mapping[int, Heavy],
    *,
    name: str,
    max_batch: int = 8,
    max_delay_ms: float = 2.0,
    partitioning: Partitioning | None = None,
) -> Plan:
    """``chain_plan`` with heavy stages: ``heavy`` maps a stage index to its (width, depth)."""
    return chain_plan(directory, k, max_batch=max_batch, max_delay_ms=max_delay_ms,
                      partitioning=partitioning, name=name, heavy=heavy)


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


def isolated_copy(plan: Plan, directory: Path) -> Plan:
    """The same stages under another plan name: another hash, so queues of its own."""
    directory.mkdir(parents=True)
    assert plan.directory is not None
    for stage in plan.stages:
        shutil.copy2(plan.directory / stage.file, directory / stage.file)
    renamed = dataclasses.replace(plan, name=f"{plan.name}-{uuid.uuid4().hex[:8]}", hash="")
    return renamed.save(directory)
