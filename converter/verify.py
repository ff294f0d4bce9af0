"""Check a split: run a plan's stages in order with onnxruntime and compare with the model.

``run_plan_sequentially`` feeds every stage by tensor name, exactly as the workers do, so a
plan that passes here has consistent names, dtypes and shapes at every boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converter.tensors import random_array, random_inputs_for_model
from conveyor.errors import InferenceError, PlanError
from conveyor.plan import MODEL_INPUT, Plan, StageSpec

__all__ = ["max_relative_error", "random_array", "random_inputs", "random_inputs_for_model",
           "run_model", "run_plan_sequentially", "stage_order"]

CPU = ("CPUExecutionProvider",)


def _session(model: str | Path | bytes, providers: Sequence[str]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=list(providers))


def stage_order(plan: Plan) -> list[StageSpec]:
    """The stages in an order where every stage comes after the ones it reads from."""
    done: set[str] = set()
    order: list[StageSpec] = []
    pending = list(plan.stages)
    while pending:
        ready = [s for s in pending if set(s.upstream) <= done]
        if not ready:
            raise PlanError(f"plan {plan.name!r}: stages {[s.name for s in pending]} form a cycle")
        for s in ready:
            order.append(s)
            done.add(s.name)
        pending = [s for s in pending if s.name not in done]
    return order


def run_plan_sequentially(
    plan: Plan,
    inputs: Mapping[str, np.ndarray],
    *,
    providers: Sequence[str] = CPU,
) -> dict[str, np.ndarray]:
    """Run every stage once, in dependency order; returns the model outputs by name."""
    if plan.directory is None:
        raise PlanError(f"plan {plan.name!r} has no directory; load it with Plan.load")
    produced: dict[str, dict[str, np.ndarray]] = {MODEL_INPUT: dict(inputs)}
    results: dict[str, np.ndarray] = {}
    for stage in stage_order(plan):
        feeds = {}
        for i in stage.inputs:
            try:
                feeds[i.tensor.name] = produced[i.source][i.tensor.name]
            except KeyError as exc:
                raise PlanError(
                    f"stage {stage.name!r} reads {i.tensor.name!r} from {i.source!r}, "
                    "which does not provide it"
                ) from exc
        names = [o.tensor.name for o in stage.outputs]
        try:
            values = _session(plan.stage_path(stage.name), providers).run(names, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(f"stage {stage.name!r} failed: {exc}", stage=stage.name) from exc
        produced[stage.name] = dict(zip(names, values, strict=True))
        for o, v in zip(stage.outputs, values, strict=True):
            if o.model_output:
                results[o.tensor.name] = v
    return results


def run_model(model: onnx.ModelProto | str | Path, inputs: Mapping[str, np.ndarray], *,
              providers: Sequence[str] = CPU) -> dict[str, np.ndarray]:
    """The whole model's outputs by name (a reference for ``run_plan_sequentially``)."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = _session(src, providers)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs)), strict=True))


def random_inputs(plan: Plan, *, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: random_array(t, batch=batch, rng=rng) for t in plan.inputs}


def max_relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """Largest |got - want| over the largest |want|, across all outputs (names must match)."""
    if set(got) != set(want):
        raise PlanError(f"outputs differ: plan gives {sorted(got)}, model gives {sorted(want)}")
    worst = 0.0
    for name, ref in want.items():
        ref64 = ref.astype(np.float64)
        diff = np.max(np.abs(got[name].astype(np.float64) - ref64)) if ref.size else 0.0
        worst = max(worst, float(diff / max(float(np.max(np.abs(ref64))) if ref.size else 0.0,
                                            1e-30)))
    return worst
