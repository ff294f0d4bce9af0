"""A plan reads only files inside its directory, and its hash covers every one it reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conveyor.errors import PlanError
from conveyor.plan import MODEL_INPUT, Plan, StageInput, StageOutput, StageSpec, TensorSpec
from conveyor.plan_files import external_locations, stage_files

WEIGHTS = np.arange(12, dtype=np.float32).reshape(3, 4)


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm", [x], [y],
        initializer=[numpy_helper.from_array(WEIGHTS, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _plan(root: Path, file: str = "s.onnx") -> Plan:
    xs = TensorSpec("x", "float32", ("batch", 3))
    ys = TensorSpec("y", "float32", ("batch", 4))
    stage = StageSpec("s", file, (StageInput(xs, MODEL_INPUT),),
                      (StageOutput(ys, (), model_output=True),))
    return Plan(name="mm", opset=17, inputs=(xs,), outputs=(ys,), stages=(stage,))


def _external_plan(root: Path, location: str = "s.onnx.data") -> Plan:
    root.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_model(), str(root / "s.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return _plan(root).save(root)


def test_the_hash_covers_external_weights(tmp_path: Path) -> None:
    plan = _external_plan(tmp_path / "p")
    assert external_locations(tmp_path / "p" / "s.onnx") == ["s.onnx.data"]
    assert [f.name for f in stage_files(plan.directory, "s.onnx")] == ["s.onnx", "s.onnx.data"]
    data = tmp_path / "p" / "s.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF  # one weight changed, the model file untouched
    data.write_bytes(bytes(raw))
    with pytest.raises(PlanError, match="corrupt"):
        Plan.load(tmp_path / "p")


def test_external_data_named_by_any_file_name_is_hashed(tmp_path: Path) -> None:
    plan = _external_plan(tmp_path / "p", location="weights.bin")
    before = plan.hash
    (tmp_path / "p" / "weights.bin").write_bytes(b"\0" * len(WEIGHTS.tobytes()))
    assert plan.compute_hash(tmp_path / "p") != before


def test_a_stage_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    onnx.save_model(_model(), str(tmp_path / "outside.onnx"))
    with pytest.raises(PlanError, match="outside the plan directory"):
        _plan(tmp_path / "p", "../outside.onnx").save(tmp_path / "p")
    with pytest.raises(PlanError, match="absolute path"):
        _plan(tmp_path / "p", str(tmp_path / "outside.onnx")).save(tmp_path / "p")


def test_a_symlink_to_a_file_outside_is_refused(tmp_path: Path) -> None:
    plan = _external_plan(tmp_path / "p")
    onnx.save_model(_model(), str(tmp_path / "evil.onnx"))
    (tmp_path / "p" / "s.onnx").unlink()
    (tmp_path / "p" / "s.onnx").symlink_to(tmp_path / "evil.onnx")
    with pytest.raises(PlanError, match="symbolic link"):
        Plan.load(tmp_path / "p")
    with pytest.raises(PlanError, match="outside the plan directory"):
        Plan.load(tmp_path / "p", verify=False).stage_path("s")
    assert plan.hash  # the plan as written was fine


def test_a_symlink_inside_the_directory_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    onnx.save_model(_model(), str(root / "real.onnx"))
    (root / "s.onnx").symlink_to("real.onnx")
    plan = _plan(root).save(root)
    assert Plan.load(root).hash == plan.hash


def test_external_data_outside_the_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    onnx.save_model(_model(), str(root / "s.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    (root / "w.bin").rename(tmp_path / "secret" / "w.bin")
    # A tampered model names its weights ../secret/w.bin (onnx itself would not write
    # that): a plan must not read that file.
    proto = onnx.load(str(root / "s.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret/w.bin"
    (root / "s.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(PlanError, match=r"external data file '\.\./secret/w\.bin'"):
        _plan(root).save(root)


def test_an_external_data_plan_runs_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.session import StageSession

    _external_plan(tmp_path / "p")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = Plan.load(os.path.relpath(tmp_path / "p", elsewhere))
    session = StageSession.load(loaded.stage_path("s"), loaded.stages[0], device="cpu")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(session.run({"x": x})["y"], x @ WEIGHTS)
