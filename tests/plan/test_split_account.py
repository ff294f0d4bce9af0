"""The converter's account of a split lives in plan.json, under the hash; older plans
(written without it) keep their hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import onnx

from converter.report import read_report
from conveyor.plan import PLAN_FORMAT, Plan, SplitInfo
from tests.plan.test_integrity import _model, _plan

TENSOR_X = {"name": "x", "dtype": "float32", "shape": ["batch", 3]}
TENSOR_Y = {"name": "y", "dtype": "float32", "shape": ["batch", 4]}


def _old_plan_json(root: Path) -> dict[str, object]:
    """plan.json as the converter wrote it before the account moved in (and split.json)."""
    onnx.save(_model(), str(root / "s.onnx"))
    body = {
        "format": PLAN_FORMAT, "name": "mm", "opset": 17,
        "inputs": [TENSOR_X], "outputs": [TENSOR_Y],
        "stages": [{"name": "s", "file": "s.onnx",
                    "inputs": [{"tensor": TENSOR_X, "source": "@input"}],
                    "outputs": [{"tensor": TENSOR_Y, "consumers": [], "model_output": True}],
                    "cost": {"nodes": 1, "flops": 24.0, "param_bytes": 48,
                             "in_bytes_per_sample": 12, "cost": 2.5e-6, "share": 1.0},
                    "group": None}],
        "split": {"by": "layer", "k": 1, "balance": 1.0, "cost_model": "flops"},
        "partitioning": {"kind": "random", "shards": 1, "range_on": "key", "boundaries": []},
        "scheduling": {"default": {"workers": 1, "prefetch": 32, "max_batch": 16,
                                   "max_delay_ms": 2.0, "prefetch_min": 1, "prefetch_max": 64},
                       "stages": {}, "max_moves": 1},
    }
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update((root / "s.onnx").read_bytes())
    return {**body, "hash": h.hexdigest()}


def test_a_plan_written_before_the_account_keeps_its_hash(tmp_path: Path) -> None:
    old = _old_plan_json(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(old))
    (tmp_path / "split.json").write_text(json.dumps(
        {"dims": {}, "probed": True, "notes": ["n"], "measured": None,
         "estimated": {"balance": 1.0, "shares": [1.0]}}))
    plan = Plan.load(tmp_path)  # verifies the hash
    assert plan.split.estimated_balance is None and plan.stages[0].cost.estimated_share is None
    assert plan.save(tmp_path).hash == old["hash"]  # saved again: the same plan
    report = read_report(tmp_path)  # the old split.json is still shown
    assert report is not None and report["notes"] == ["n"]


def test_the_account_round_trips_and_is_hashed(tmp_path: Path) -> None:
    onnx.save(_model(), str(tmp_path / "s.onnx"))
    bare = _plan(tmp_path).save(tmp_path)
    stage = bare.stages[0]
    told = replace(
        bare,
        split=SplitInfo(by="layer", dims={"height": 64}, probed=True, estimated_balance=1.2,
                        measured_balance=1.1, notes=("stage 3 merged",)),
        stages=(replace(stage, cost=replace(stage.cost, estimated_share=1.0,
                                            measured_share=1.0)),),
    ).save(tmp_path)
    assert told.hash != bare.hash  # workers agree on the account too
    loaded = Plan.load(tmp_path)
    assert loaded.split == told.split and loaded.stages == told.stages
    report = read_report(tmp_path)
    assert report is not None
    assert report["dims"] == {"height": 64} and report["notes"] == ["stage 3 merged"]
    assert report["measured"] == {"balance": 1.1, "shares": [1.0]}
