"""Write a plan directory: stage files and ``plan.json``, all or nothing.

Everything is written into a hidden temporary directory next to the target, which is
renamed into place only when complete; on any error it is removed, so a failed convert
never leaves a partial plan behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from converter.costs import CostModel
from converter.extract import StageExtractor, WiredStage, save_stage
from converter.graph import Analysis
from converter.tensors import tensor_spec
from conveyor.errors import ConfigError
from conveyor.plan import (
    PLAN_FILE,
    Partitioning,
    Plan,
    Scheduling,
    SplitInfo,
    StageCost,
    StageInput,
    StageOutput,
    StageSpec,
    TensorSpec,
)

#: Where plans written before the converter's account moved into plan.json (SplitInfo,
#: StageCost) kept it; read for those only (``converter.report.read_report``).
SPLIT_REPORT = "split.json"


def stage_shares(analysis: Analysis, costs: CostModel,
                 stages: Sequence[WiredStage]) -> tuple[list[float], float]:
    """Every stage's share of the total cost under ``costs``, and the balance."""
    raw = [sum(costs.node_seconds[v] for v in s.nodes)
           + costs.transfer(sum(analysis.info(t).sample_bytes() for t, _ in s.inputs))
           for s in stages]
    total = sum(raw) or 1.0
    return [c / total for c in raw], max(raw) / (total / len(raw))


def split_report(analysis: Analysis, stages: Sequence[WiredStage], estimate: CostModel,
                 measured: CostModel | None, notes: Sequence[str]) -> dict[str, Any]:
    est, est_balance = stage_shares(analysis, estimate, stages)
    report: dict[str, Any] = {
        "dims": dict(analysis.dims), "probed": analysis.probed, "notes": list(notes),
        "estimated": {"balance": est_balance, "shares": est},
        "measured": None,
    }
    if measured is not None:
        got, balance = stage_shares(analysis, measured, stages)
        report["measured"] = {"balance": balance, "shares": got}
    return report


def _wire_spec(analysis: Analysis, name: str) -> TensorSpec:
    return tensor_spec(analysis.wire_name(name), analysis.info(name).batch_first())


def build_specs(analysis: Analysis, costs: CostModel,
                stages: Sequence[WiredStage]) -> tuple[list[StageSpec], float]:
    """Stage specs with their costs, and the balance (slowest over the ideal total/K)."""
    raw = []
    for s in stages:
        in_bytes = sum(analysis.info(t).sample_bytes() for t, _ in s.inputs)
        compute = sum(costs.node_seconds[v] for v in s.nodes)
        raw.append((in_bytes, compute + costs.transfer(in_bytes)))
    total = sum(c for _, c in raw) or 1.0
    specs = []
    for s, (in_bytes, cost) in zip(stages, raw, strict=True):
        specs.append(StageSpec(
            name=s.name,
            file=f"{s.name}.onnx",
            inputs=tuple(StageInput(_wire_spec(analysis, t), src) for t, src in s.inputs),
            outputs=tuple(StageOutput(_wire_spec(analysis, t), cons, mo)
                          for t, cons, mo in s.outputs),
            cost=StageCost(
                nodes=len(s.nodes),
                flops=float(sum(analysis.flops[v] for v in s.nodes)),
                param_bytes=analysis.param_bytes(s.nodes),
                in_bytes_per_sample=int(in_bytes),
                cost=cost,
                share=cost / total,
            ),
            group=s.group,
        ))
    balance = max(c for _, c in raw) / (total / len(raw))
    return specs, balance


def write_plan(
    analysis: Analysis,
    costs: CostModel,
    stages: Sequence[WiredStage],
    out_dir: Path,
    *,
    name: str,
    split: SplitInfo,
    partitioning: Partitioning | None = None,
    scheduling: Scheduling | None = None,
    external_threshold: int | None = None,
    overwrite: bool = False,
    report: Mapping[str, Any] | None = None,
) -> Plan:
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite=overwrite)
    specs, balance = build_specs(analysis, costs, stages)
    g = analysis.model.graph
    opset = next(o.version for o in analysis.model.opset_import if o.domain in ("", "ai.onnx"))
    if report is not None:
        split, specs = _with_report(split, specs, report)
    plan = Plan(
        name=name,
        opset=opset,
        inputs=tuple(tensor_spec(i, analysis.info(i)) for i in analysis.inputs),
        outputs=tuple(tensor_spec(o.name, analysis.info(o.name)) for o in g.output),
        stages=tuple(specs),
        split=replace(split, k=len(specs), balance=balance),
        partitioning=partitioning or Partitioning(),
        scheduling=scheduling or Scheduling(),
    )
    plan.validate()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a plan is read by workers of any user
        extractor = StageExtractor(analysis)
        for stage, spec in zip(stages, specs, strict=True):
            save_stage(extractor.extract(stage), tmp / spec.file,
                       external_threshold=external_threshold)
        plan = plan.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace(plan, directory=out_dir)


def _with_report(split: SplitInfo, specs: Sequence[StageSpec], report: Mapping[str, Any]
                 ) -> tuple[SplitInfo, list[StageSpec]]:
    """The split and stage specs carrying the converter's account (``split_report``)."""
    est, got = report["estimated"], report["measured"]
    split = replace(split, dims=dict(report["dims"]), probed=bool(report["probed"]),
                    estimated_balance=est["balance"],
                    measured_balance=got["balance"] if got else None,
                    notes=tuple(report["notes"]))
    return split, [replace(s, cost=replace(s.cost, estimated_share=est["shares"][i],
                                           measured_share=got["shares"][i] if got else None))
                   for i, s in enumerate(specs)]


def check_target(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to replace anything but an existing plan (and that only with ``overwrite``)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / PLAN_FILE).exists():
        raise ConfigError(f"{out_dir} exists, is not empty and is not a plan; choose another --out")
    if not overwrite:
        raise ConfigError(f"{out_dir} already holds a plan; pass --force to replace it")
