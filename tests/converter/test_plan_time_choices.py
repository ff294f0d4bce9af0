"""What the user decides at plan time: ``--constant NAME=VALUE`` (a top-level If decided by
the data, split inside the branch the user fixes) and ``--fallback layer`` (a function split
of a sequential model becomes a layer split, and says so)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converter import convert
from converter.api import analyze_model
from converter.constants import fix_constants, parse_constants
from converter.export import prepare
from converter.report import read_report
from converter.split_layer import allowed_cuts
from converter.verify import max_relative_error, run_model, run_plan_sequentially
from conveyor.app import cli
from conveyor.errors import ConfigError, SplitError
from conveyor.plan import Plan
from tests.converter import builders
from tests.converter.conftest import TOLERANCE, assert_batched_cuts


@pytest.mark.parametrize(("cond", "sign"), [(1, 1.0), (0, -1.0)])
def test_a_fixed_condition_inlines_its_branch_and_splits_it(cond: int, sign: float,
                                                             tmp_path: Path) -> None:
    model = builders.top_level_if(by_data=True)  # cond = sum(x) > 0
    analysis, _ = analyze_model(model, constants={"cond": [cond]})
    assert not any(node.op_type == "If" for node in analysis.nodes)
    top = min(8, len(allowed_cuts(analysis)) + 1)
    assert top >= (8 if cond else 5)  # then: 6 dense layers (18 nodes), else: 2 (6 nodes)
    for k in range(2, top + 1):
        plan = convert(model, tmp_path / f"k{k}", by="layer", stages=k,
                       constants={"cond": [cond]})
        merged = sum("merged into its neighbour" in n for n in plan.split.notes)
        assert len(plan.stages) == k - merged
        assert_batched_cuts(plan)
        assert any("'cond' fixed at plan time" in n for n in plan.split.notes)
        for batch in (1, 3):
            # inputs that take that branch in the original model: the plans agree with it
            x = sign * np.abs(np.random.default_rng(k).standard_normal((batch, 16)))
            x = x.astype(np.float32)
            want = run_model(prepare(model), {"x": x})
            err = max_relative_error(run_plan_sequentially(plan, {"x": x}), want)
            assert err <= TOLERANCE


def test_a_constant_input_is_no_longer_an_input() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fixed = fix_constants(model, parse_constants(["gain=1,2,3,4"]))
    assert [i.name for i in fixed.graph.input] == ["x"]
    x = np.ones((2, 4), np.float32)
    assert run_model(fixed, {"x": x})["y"].tolist() == [[1, 2, 3, 4]] * 2


@pytest.mark.parametrize(("spec", "message"), [
    ("cond", "is not NAME=VALUE"),
    ("cond=yes", "is not NAME=VALUE"),
    ("nothing=1", "has no tensor 'nothing'"),
    ("x=1,2", "2 value"),
])
def test_a_bad_constant_is_refused_saying_why(spec: str, message: str) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match=message):
        fix_constants(model, parse_constants([spec]))


def test_the_function_split_falls_back_to_layers_when_asked(tmp_path: Path) -> None:
    model = builders.minus_one_dims()  # one chain of dense layers
    with pytest.raises(SplitError, match="--fallback layer"):
        convert(model, tmp_path / "refused", by="function")
    assert not (tmp_path / "refused").exists()
    plan = convert(model, tmp_path / "p", by="function", stages=3, fallback="layer")
    assert (plan.split.by, plan.split.k, len(plan.stages)) == ("layer", 3, 3)
    report = read_report(tmp_path / "p")
    assert report is not None
    assert any("fell back to --by layer" in n for n in report["notes"])
    with pytest.raises(SplitError, match="for --by function only"):
        convert(model, tmp_path / "q", by="layer", fallback="layer")


def test_the_cli_takes_constant_and_fallback(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))
    wrapped = tmp_path / "wrapped.onnx"
    onnx.save(builders.top_level_if(by_data=True), str(wrapped))
    assert cli.main(["convert", str(wrapped), "--out", str(tmp_path / "a"),
                     "--stages", "3"]) == 2
    assert "--constant cond=1" in capsys.readouterr().err
    assert cli.main(["convert", str(wrapped), "--out", str(tmp_path / "a"), "--stages", "3",
                     "--constant", "cond=true"]) == 0
    assert Plan.load(tmp_path / "a").split.k == 3
    chain = tmp_path / "chain.onnx"
    onnx.save(builders.minus_one_dims(), str(chain))
    assert cli.main(["convert", str(chain), "--out", str(tmp_path / "f"), "--by",
                     "function"]) == 2
    capsys.readouterr()
    assert cli.main(["convert", str(chain), "--out", str(tmp_path / "f"), "--by",
                     "function", "--fallback", "layer"]) == 0
    assert "note: the function split finds no parallel structure" in capsys.readouterr().out
    assert Plan.load(tmp_path / "f").split.by == "layer"
