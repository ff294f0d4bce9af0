"""``conveyor infer`` and ``conveyor demo`` from the command line (in-process, brokerless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conveyor.app.cli import main
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


def test_infer_npy_prints_outputs_and_saves_them(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.array([[1, 2, 3], [0, -1, 5]], np.float32)
    np.save(tmp_path / "x.npy", x)
    code = main(["infer", str(scale_plan.directory), str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "y.npz")])
    out = capsys.readouterr().out
    assert code == 0
    assert "y: shape [2, 3] float32" in out
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], 3 * x + 1)


def test_infer_npz_with_named_inputs(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "req.npz", x=np.ones((1, 3), np.float32))
    assert main(["infer", str(scale_plan.directory), str(tmp_path / "req.npz")]) == 0
    assert "max 4 mean 4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p / "in.npy", np.ones((1, 4), np.float32)), "dimension 1 is 4"),
        (lambda p: np.savez(p / "in.npz", z=np.ones((1, 3), np.float32)), "unknown input"),
        (lambda p: (p / "in.npy").write_bytes(b"not numpy"), "cannot read"),
        (lambda p: None, "does not exist"),
    ],
)
def test_infer_bad_input_exits_2_naming_the_cause(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: object, message: str,
) -> None:
    assert callable(make)
    make(tmp_path)
    path = tmp_path / ("in.npz" if (tmp_path / "in.npz").exists() else "in.npy")
    assert main(["infer", str(scale_plan.directory), str(path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_serves_checks_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "64", "--concurrency", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "64/64 match the whole model" in out
    assert "requests/s" in out and "p99" in out
    assert "provider:   CPUExecutionProvider" in out
