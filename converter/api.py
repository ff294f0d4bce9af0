"""``convert``: the converter's Python API (the ``conveyor convert`` command calls it)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from converter.costs import CostModel, estimate_costs, profile_costs
from converter.export import load_model, sanitize
from converter.extract import wire_chain, wire_dag
from converter.graph import Analysis, analyze
from converter.plan_writer import check_target, write_plan
from converter.split_function import parse_groups, split_by_function
from converter.split_layer import split_by_layer
from conveyor.errors import SplitError
from conveyor.plan import Partitioning, Plan, Scheduling, SplitInfo

log = logging.getLogger(__name__)

SplitBy = Literal["layer", "function"]


def convert(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    by: SplitBy = "layer",
    stages: int | None = None,
    groups: Sequence[str] = (),
    profile: bool = False,
    opset: int | None = None,
    partitioning: Partitioning | None = None,
    scheduling: Scheduling | None = None,
    name: str | None = None,
    external_threshold: int | None = None,
    overwrite: bool = False,
) -> Plan:
    """Export ``model`` to ONNX, split it and write a plan directory at ``out_dir``.

    ``model``: a Keras model, an ``onnx.ModelProto`` or a path (.onnx, .keras, .h5,
    SavedModel directory). ``by="layer"`` makes a chain of ``stages`` (default 2) stages;
    ``by="function"`` a DAG of stages by function key (``groups``: ``NAME=REGEX``), merged
    down to at most ``stages`` when given. ``profile`` balances measured onnxruntime time
    instead of FLOP estimates. ``external_threshold`` forces weights of at least that many
    bytes into external data files. Raises ``ConversionError`` subclasses or ``ConfigError``.
    """
    out = Path(out_dir)
    if by not in ("layer", "function"):
        raise SplitError(f"unknown split {by!r}; use 'layer' or 'function'")
    if stages is not None and stages < 1:
        raise SplitError(f"--stages must be at least 1, got {stages}")
    if groups and by != "function":
        raise SplitError("--group applies to --by function only")
    compiled = parse_groups(groups)
    check_target(out, overwrite=overwrite)
    partitioning = partitioning or Partitioning()
    scheduling = scheduling or Scheduling()
    proto = load_model(model, opset=opset)
    analysis = analyze(proto)
    costs = profile_costs(analysis) if profile else estimate_costs(analysis)
    if by == "layer":
        split = split_by_layer(analysis, costs, stages or 2)
        wired = wire_chain(analysis, split.ranges(analysis.n))
    else:
        drafts = split_by_function(analysis, costs, groups=compiled, max_stages=stages)
        wired = wire_dag(analysis, drafts)
    return write_plan(
        analysis, costs, wired, out,
        name=name or _default_name(model, proto),
        split=SplitInfo(by=by, cost_model=costs.kind),
        partitioning=partitioning,
        scheduling=scheduling,
        external_threshold=external_threshold,
        overwrite=overwrite,
    )


def analyze_model(model: Any, *, opset: int | None = None,
                  profile: bool = False) -> tuple[Analysis, CostModel]:
    """Load and analyse a model without splitting it (``conveyor inspect MODEL``)."""
    analysis = analyze(load_model(model, opset=opset))
    return analysis, (profile_costs(analysis) if profile else estimate_costs(analysis))


def _default_name(source: Any, proto: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return sanitize(Path(source).stem) or "model"
    return sanitize(getattr(source, "name", "") or proto.graph.name or "model")
