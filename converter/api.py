"""``convert``: the converter's Python API (the ``conveyor convert`` command calls it)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from converter.constants import fix_constants
from converter.costs import CostModel, estimate_costs, profile_costs
from converter.export import load_model, sanitize
from converter.extract import WiredStage, runnable, wire_chain, wire_dag
from converter.fold import control_flow_note
from converter.graph import Analysis, analyze
from converter.plan_writer import check_target, split_report, write_plan
from converter.split_function import parse_groups, split_by_function
from converter.split_layer import merge_slivers, split_by_layer
from conveyor.errors import SplitError
from conveyor.plan import Partitioning, Plan, Scheduling, SplitInfo

log = logging.getLogger(__name__)

SplitBy = Literal["layer", "function"]

#: Stages of a layer split when ``stages`` is not given.
DEFAULT_LAYER_STAGES = 2
#: Most stages of a function split when ``stages`` is not given. Every stage boundary is a
#: trip through the broker and every stage wants its own worker; past a handful of stages
#: that overhead outweighs the parallelism, so the model's structure (often 30 to 120
#: segments for CNNs) is merged, cheapest neighbours first, down to this many.
DEFAULT_FUNCTION_STAGES = 8
#: Why a function split of a sequential model is refused (or falls back to a layer split).
NO_PARALLEL_STRUCTURE = ("the function split finds no parallel structure in this model: its "
                         "layers form one chain, so it would be one stage")


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
    dims: Mapping[str, int] | None = None,
    batch_axes: Mapping[str, int] | None = None,
    custom_objects: Mapping[str, Any] | None = None,
    constants: Mapping[str, Any] | None = None,
    fallback: Literal["layer"] | None = None,
) -> Plan:
    """Export ``model`` to ONNX, split it and write a plan directory at ``out_dir``.

    ``model``: a Keras model, an ``onnx.ModelProto`` or a path (.onnx, .keras, .h5,
    SavedModel directory). ``by="layer"`` makes a chain of ``stages`` (default 2) stages;
    ``by="function"`` a DAG of stages by function key (``groups``: ``NAME=REGEX``), merged
    down to at most ``stages`` (default ``DEFAULT_FUNCTION_STAGES``, 8), a gather stage for
    model outputs made in several places included. ``profile`` balances measured
    onnxruntime time instead of FLOP estimates. ``external_threshold`` forces weights of
    at least that many bytes into external data files. ``dims``: representative sizes of
    symbolic dimensions (``height=640``) the costs are taken at; ``batch_axes``: inputs or
    outputs whose batch is not on axis 0 (``converter.batch_axes``); ``custom_objects``: for
    loading a Keras file with custom layers; ``constants``: tensors fixed at plan time
    (``{"cond": 1}``, ``converter.constants``); ``fallback="layer"``: a function split
    without parallel structure becomes a layer split, noted. Raises ``ConversionError``
    subclasses or ``ConfigError``.
    """
    out = Path(out_dir)
    compiled = _checked_groups(by, stages, groups, fallback)
    check_target(out, overwrite=overwrite)
    partitioning = partitioning or Partitioning()
    scheduling = scheduling or Scheduling()
    proto = fix_constants(load_model(model, opset=opset, batch_axes=batch_axes,
                                     custom_objects=custom_objects), constants or {})
    analysis = analyze(proto, dims=dims)
    estimate = estimate_costs(analysis)
    costs = profile_costs(analysis) if profile else estimate
    notes = [f"tensor {k!r} fixed at plan time to {v} (--constant)"
             for k, v in (constants or {}).items()]
    by, wired = _split(analysis, costs, by, stages, compiled, fallback, notes)
    return write_plan(
        analysis, costs, wired, out,
        name=name or _default_name(model, proto),
        split=SplitInfo(by=by, cost_model=costs.kind),
        partitioning=partitioning,
        scheduling=scheduling,
        external_threshold=external_threshold,
        overwrite=overwrite,
        report=split_report(analysis, wired, estimate, costs if profile else None, notes),
    )


def _split(analysis: Analysis, costs: CostModel, by: SplitBy, stages: int | None,
           groups: Sequence[tuple[str, re.Pattern[str]]], fallback: str | None,
           notes: list[str]) -> tuple[SplitBy, list[WiredStage]]:
    """The split asked for (``by``), or the layer split a function split fell back to."""
    if by == "function":
        found = function_stages(analysis, costs, groups, stages or DEFAULT_FUNCTION_STAGES,
                                fallback=fallback == "layer")
        if found is not None:
            return by, found
        notes.append(f"{NO_PARALLEL_STRUCTURE}: fell back to --by layer (--fallback layer)")
        log.warning("%s", notes[-1])
    return "layer", layer_stages(analysis, costs, stages or DEFAULT_LAYER_STAGES, notes)


def _checked_groups(by: str, stages: int | None, groups: Sequence[str],
                    fallback: str | None = None) -> list[tuple[str, re.Pattern[str]]]:
    if fallback not in (None, "layer") or (fallback and by != "function"):
        raise SplitError(f"fallback={fallback!r}: only 'layer', and for --by function only")
    if by not in ("layer", "function"):
        raise SplitError(f"unknown split {by!r}; use 'layer' or 'function'")
    if stages is not None and stages < 1:
        raise SplitError(f"--stages must be at least 1, got {stages}")
    if groups and by != "function":
        raise SplitError("--group applies to --by function only")
    return parse_groups(groups)


def layer_stages(analysis: Analysis, costs: CostModel, k: int,
                 notes: list[str]) -> list[WiredStage]:
    """The layer split into ``k`` stages wired as a chain, slivers merged (``notes`` says)."""
    stuck = control_flow_note(analysis.model)
    if stuck and k > 1:
        raise SplitError(f"{stuck}; serve it unsplit (--stages 1), or export it with the "
                         "branch fixed")
    split, merged = merge_slivers(analysis, costs, split_by_layer(analysis, costs, k))
    for note in merged:
        log.warning("%s", note)
    notes.extend(merged)
    return wire_chain(analysis, split.ranges(analysis.n))


def function_stages(analysis: Analysis, costs: CostModel,
                    groups: Sequence[tuple[str, re.Pattern[str]]],
                    max_stages: int, *, fallback: bool = False) -> list[WiredStage] | None:
    """The function split wired as a DAG, at most ``max_stages`` stages in all; for a model
    without parallel structure a SplitError, or None with ``fallback``.

    When the model outputs end up in several stages, ``wire_dag`` appends a gather stage;
    should that pass ``max_stages``, the split is merged one stage further first.
    """
    drafts = split_by_function(analysis, costs, groups=groups, max_stages=max_stages)
    if len(runnable(analysis, drafts)) == 1 and analysis.n > 1:
        if fallback:
            return None
        raise SplitError(
            f"{NO_PARALLEL_STRUCTURE}; use --by layer --stages K for a pipeline, name stages "
            "with --group NAME=REGEX, or pass --fallback layer to get a layer split instead")
    wired = wire_dag(analysis, drafts)
    if len(wired) > max_stages:
        drafts = split_by_function(analysis, costs, groups=groups, max_stages=max_stages - 1)
        wired = wire_dag(analysis, drafts)
    return wired


def analyze_model(model: Any, *, opset: int | None = None, profile: bool = False,
                  dims: Mapping[str, int] | None = None,
                  batch_axes: Mapping[str, int] | None = None,
                  constants: Mapping[str, Any] | None = None) -> tuple[Analysis, CostModel]:
    """Load and analyse a model without splitting it (``conveyor inspect MODEL``)."""
    proto = fix_constants(load_model(model, opset=opset, batch_axes=batch_axes),
                          constants or {})
    analysis = analyze(proto, dims=dims)
    return analysis, (profile_costs(analysis) if profile else estimate_costs(analysis))


def _default_name(source: Any, proto: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return sanitize(Path(source).stem) or "model"
    return sanitize(getattr(source, "name", "") or proto.graph.name or "model")
