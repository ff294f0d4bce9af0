"""``conveyor convert`` / ``conveyor inspect``: exit codes, messages, no partial plans."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conveyor.app import cli
from conveyor.plan import Plan
from tests.converter import graphs
from tests.converter.conftest import assert_reproduces


@pytest.fixture(autouse=True)
def _converter_commands_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # the converter's commands must work whatever else is (or is not yet) installed
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_convert_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(graphs.control_flow(), tmp_path / "cf.onnx")
    out = tmp_path / "plan"
    assert cli.main(["convert", str(src), "--out", str(out), "--stages", "3",
                     "--partition", "range", "--shards", "3", "--boundaries", "10,20"]) == 0
    plan = Plan.load(out)
    assert (plan.split.by, plan.split.k) == ("layer", 3)
    assert plan.partitioning.kind == "range" and plan.partitioning.boundaries == (10.0, 20.0)
    assert_reproduces(out, graphs.control_flow())
    capsys.readouterr()
    dot = tmp_path / "plan.dot"
    assert cli.main(["inspect", str(out), "--dot", str(dot)]) == 0
    text = capsys.readouterr().out
    for s in plan.stages:
        assert s.name in text
    assert plan.hash in text
    assert '"stage0" -> "stage1"' in dot.read_text()
    assert cli.main(["inspect", str(src)]) == 0
    assert "cut positions" in capsys.readouterr().out


def test_plan_json_numbers_are_consistent(tmp_path: Path) -> None:
    src = _save(graphs.multi_io(), tmp_path / "m.onnx")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "p"), "--stages", "4"]) == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    plan = Plan.load(tmp_path / "p")
    assert doc["hash"] == plan.hash
    shares = [s.cost.share for s in plan.stages]
    assert sum(shares) == pytest.approx(1.0)
    slowest = max(s.cost.cost for s in plan.stages)
    total = sum(s.cost.cost for s in plan.stages)
    assert plan.split.balance == pytest.approx(slowest / (total / len(plan.stages)))
    for s in plan.stages:
        assert s.cost.in_bytes_per_sample == sum(i.tensor.sample_bytes() for i in s.inputs)


def test_refuses_to_overwrite_without_force(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(graphs.wide(), tmp_path / "w.onnx")
    out = tmp_path / "plan"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    first = Plan.load(out).hash
    assert cli.main(["convert", str(src), "--out", str(out), "--stages", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert Plan.load(out).hash == first
    assert cli.main(["convert", str(src), "--out", str(out), "--stages", "3", "--force"]) == 0
    assert len(Plan.load(out).stages) == 3


def _bad_opset(tmp: Path) -> list[str]:
    return [str(_save(graphs.with_opset(graphs.wide(), 99), tmp / "new.onnx"))]


def _not_a_model(tmp: Path) -> list[str]:
    bad = tmp / "notes.onnx"
    bad.write_text("this is not a model\n")
    return [str(bad)]


BAD = {
    "not a model": (_not_a_model, "not a readable ONNX model"),
    "unknown suffix": (lambda t: [str(_save(graphs.wide(), t / "w.bin"))], "unknown model format"),
    "missing file": (lambda t: [str(t / "nope.onnx")], "does not exist"),
    "unsupported opset": (_bad_opset, "opset 99"),
    "K too large": (lambda t: [str(_save(graphs.wide(layers=2), t / "w.onnx")), "--stages", "9"],
                    "cannot split into 9 stages"),
    "group matches nothing": (
        lambda t: [str(_save(graphs.wide(), t / "w.onnx")), "--by", "function",
                   "--group", "head=^nothing_like_this"],
        "head match no node"),
    "no batch dimension": (lambda t: [str(_save(graphs.no_batch(), t / "nb.onnx"))],
                           "no symbolic batch dimension"),
    "bad boundaries": (
        lambda t: [str(_save(graphs.wide(), t / "w.onnx")), "--partition", "range",
                   "--shards", "3", "--boundaries", "5"],
        "needs 2 --boundaries"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_the_cause_and_leaves_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_args, message = BAD[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    args = make_args(src_dir)
    out_root = tmp_path / "out"
    out_root.mkdir()
    code = cli.main(["convert", *args, "--out", str(out_root / "plan")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("conveyor convert: error: ")
    assert message in err
    assert _leftovers(out_root) == []


def test_an_error_while_writing_removes_the_temporary_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from converter import plan_writer
    from conveyor.errors import ConversionError

    calls = []

    def failing_save(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise ConversionError("disk full (simulated)")
        onnx.save(args[0], str(args[1]))  # type: ignore[arg-type]

    monkeypatch.setattr(plan_writer, "save_stage", failing_save)
    src = _save(graphs.wide(), tmp_path / "w.onnx")
    out_root = tmp_path / "out"
    out_root.mkdir()
    assert cli.main(["convert", str(src), "--out", str(out_root / "plan"), "--stages", "3"]) == 2
    assert _leftovers(out_root) == []


def test_inspect_shows_estimated_and_measured_share_per_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.converter import builders

    src = _save(builders.dynamic_image(), tmp_path / "dyn.onnx")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "p"), "--stages", "3",
                     "--profile", "--dims", "height=32,width=24"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    # the converter's account is in plan.json (covered by the plan hash), not beside it
    assert not (tmp_path / "p" / "split.json").exists()
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    split = plan["split"]
    assert split["dims"] == {"height": 32, "width": 24} and split["probed"] is True
    assert "symbolic dims taken at: height=32, width=24" in text
    assert f"measured {split['measured_balance']:.3f}" in text
    header = next(line for line in text.splitlines() if line.startswith("stage "))
    assert header.split()[-2:] == ["estimated", "measured"]
    rows = [line.split() for line in text.splitlines() if line.startswith("stage") and
            line.split()[0] != "stage"]
    assert len(rows) == 3
    for row, stage in zip(rows, plan["stages"], strict=True):
        est, got = stage["cost"]["estimated_share"], stage["cost"]["measured_share"]
        assert row[-2:] == [f"{100 * est:.1f}%", f"{100 * got:.1f}%"]


@pytest.mark.parametrize(("args", "message"), [
    (["--dims", "height"], "--dims 'height' is not NAME=SIZE"),
    (["--batch-axis", "state"], "is not NAME=AXIS"),
    (["--batch-axis", "nope=1"], "--batch-axis names ['nope']"),
])
def test_bad_dims_and_batch_axes_exit_2(args: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(graphs.wide(), tmp_path / "w.onnx")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "p"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
