"""Real Keras models, exported once per session: every split reproduces the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter import convert
from converter.split_layer import allowed_cuts
from conveyor.app import cli
from conveyor.plan import MODEL_INPUT, Plan
from tests.converter.conftest import Exports, assert_batched_cuts, assert_reproduces, rel
from tests.converter.test_models_people_bring import merged_slivers

MODELS = ["mlp", "branches", "mobilenetv2", "resnet50", "densenet121"]


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_split_reproduces_the_model(name: str, exports: Exports,
                                                tmp_path: Path) -> None:
    from converter.api import analyze_model

    src = exports.get(name)
    analysis, _ = analyze_model(src)
    top = min(8, len(allowed_cuts(analysis)) + 1)
    assert top >= 4, f"{name}: only {top - 1} cut positions"
    for k in range(2, top + 1):
        plan = convert(src, tmp_path / f"k{k}", by="layer", stages=k)
        # issue 11: a stage with next to no work (a lone Softmax) is merged, and said so
        assert len(plan.stages) == k - merged_slivers(tmp_path / f"k{k}")
        assert_batched_cuts(plan)
        assert plan.split.balance >= 1.0
        assert_reproduces(tmp_path / f"k{k}", src, seed=k)


def test_function_split_of_a_sequential_model_exits_2_with_the_reason(
    exports: Exports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))
    code = cli.main(["convert", str(exports.get("mlp")), "--out", str(tmp_path / "p"),
                     "--by", "function"])
    assert code == 2
    assert "no parallel structure" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("name", [m for m in MODELS if m != "mlp"])
def test_function_split_reproduces_the_model(name: str, exports: Exports,
                                             tmp_path: Path) -> None:
    src = exports.get(name)
    whole = convert(src, tmp_path / "all", by="function")
    assert whole.split.by == "function"
    assert all(s.group for s in whole.stages)
    assert_reproduces(tmp_path / "all", src)
    merged = convert(src, tmp_path / "k3", by="function", stages=3)
    assert len(merged.stages) <= 3
    assert_reproduces(tmp_path / "k3", src, seed=1)


def test_export_keeps_the_keras_names_and_numbers(exports: Exports) -> None:
    from converter.verify import run_model

    model = exports.keras_model("branches")
    rng = np.random.default_rng(0)
    inputs = {"image_features": rng.standard_normal((4, 12)).astype(np.float32),
              "metadata": rng.standard_normal((4, 5)).astype(np.float32)}
    got = run_model(exports.get("branches"), inputs)
    assert list(got) == ["class_probs", "score"]
    want = model([inputs["image_features"], inputs["metadata"]], training=False)
    for name, ref in zip(["class_probs", "score"], want, strict=True):
        assert rel(got[name], np.asarray(ref)) <= 1e-5


def test_two_branch_model_splits_into_a_dag_with_fan_out_and_fan_in(
    exports: Exports, tmp_path: Path
) -> None:
    plan = convert(exports.get("branches"), tmp_path / "p", by="function")
    by_group = {s.group: s for s in plan.stages}
    left = next(s for g, s in by_group.items() if g and g.startswith("left_1"))
    right = next(s for g, s in by_group.items() if g and g.startswith("right_1"))
    # each branch reads its own model input and nothing from the other branch
    assert {i.source for i in left.inputs} == {MODEL_INPUT}
    assert {i.source for i in right.inputs} == {MODEL_INPUT}
    join = next(s for s in plan.stages if {left.name, right.name} <= set(s.upstream))
    assert join.is_join
    fan_out = [o for s in plan.stages for o in s.outputs if len(o.consumers) >= 2]
    assert fan_out, "the trunk feeds both heads"
    assert {t.name for t in plan.outputs} == {"class_probs", "score"}


def test_user_groups_become_stages(exports: Exports, tmp_path: Path) -> None:
    plan = convert(exports.get("mlp"), tmp_path / "p", by="function",
                   groups=["head=probs", "body=fc"])
    assert [s.group for s in plan.stages] == ["body", "head"]
    assert_reproduces(tmp_path / "p", exports.get("mlp"))


def test_profiled_split_of_the_mlp(exports: Exports, tmp_path: Path) -> None:
    plan = convert(exports.get("mlp"), tmp_path / "p", by="layer", stages=3, profile=True)
    assert plan.split.cost_model == "profile"
    assert_reproduces(tmp_path / "p", exports.get("mlp"))


def test_keras_object_and_keras_file(exports: Exports, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = exports.keras_model("mlp")
    plan = convert(model, tmp_path / "from_object", by="layer", stages=3)
    assert [t.name for t in plan.inputs] == ["pixels"]
    assert [t.name for t in plan.outputs] == ["probs"]
    assert plan.inputs[0].shape == ("batch", 784)
    assert_reproduces(tmp_path / "from_object", exports.get("mlp"))
    model.save(tmp_path / "mlp.keras")
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))
    assert cli.main(["convert", str(tmp_path / "mlp.keras"), "--out", str(tmp_path / "cli"),
                     "--stages", "2"]) == 0
    assert Plan.load(tmp_path / "cli").stage_names == ["stage0", "stage1"]
    assert_reproduces(tmp_path / "cli", exports.get("mlp"))


def test_saved_model_directory_and_opset(exports: Exports, tmp_path: Path) -> None:
    from converter.verify import random_inputs, run_plan_sequentially

    model = exports.keras_model("branches")
    model.export(str(tmp_path / "saved"))
    plan = convert(tmp_path / "saved", tmp_path / "p", by="function", opset=13)
    assert plan.opset == 13
    assert [t.name for t in plan.inputs] == ["image_features", "metadata"]
    inputs = random_inputs(plan, batch=3)
    got = run_plan_sequentially(plan, inputs)
    want = model([inputs["image_features"], inputs["metadata"]], training=False)
    # the serving signature names its outputs output_0, output_1 in model order
    for name, ref in zip(sorted(got), want, strict=True):
        assert rel(got[name], np.asarray(ref)) <= 1e-5
