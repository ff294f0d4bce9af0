"""Where a hosted stage's outputs go: the routes a ``StageWorker`` builds once at start.

For every source (the ingress, ``MODEL_INPUT``, and each hosted stage) a list of
``Destination``: the stage that reads some of its tensors, which tensors, whether the
hand-over stays in memory (the stage is hosted here and all its inputs are made here) and
whether it is a join. The stage that makes the model outputs also answers the callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.errors import PlanError
from conveyor.plan import MODEL_INPUT, Plan, StageSpec
from workers.runner import stage_sources


@dataclass(frozen=True)
class Destination:
    stage: str
    names: tuple[str, ...]
    #: Handed over in memory (the stage is hosted here and all its inputs are made here).
    local: bool
    join: bool


@dataclass(frozen=True)
class Routes:
    #: Source -> the stages its tensors go to.
    destinations: dict[str, list[Destination]]
    #: Hosted stage -> the model outputs it makes (sent back to each caller).
    replies: dict[str, tuple[str, ...]]


def build_routes(plan: Plan, hosted: Sequence[str], hosts_ingress: bool) -> Routes:
    """The routes of a worker hosting ``hosted`` (and the ingress when ``hosts_ingress``)."""

    def local(spec: StageSpec) -> bool:
        return spec.name in hosted and all(
            (src == MODEL_INPUT and hosts_ingress) or src in hosted
            for src in stage_sources(spec)
        )

    routes = Routes({}, {})
    for source in [*([MODEL_INPUT] if hosts_ingress else []), *hosted]:
        wanted: dict[str, list[str]] = {}
        for spec in plan.stages:
            for inp in spec.inputs:
                if inp.source == source:
                    wanted.setdefault(spec.name, []).append(inp.tensor.name)
        routes.destinations[source] = [
            Destination(stage, tuple(names), local(plan.stage(stage)), plan.stage(stage).is_join)
            for stage, names in wanted.items()
        ]
        if source != MODEL_INPUT:
            outputs = plan.stage(source).outputs
            routes.replies[source] = tuple(o.tensor.name for o in outputs if o.model_output)
    return routes


def check_model_outputs(plan: Plan) -> None:
    """``PlanError`` unless exactly one stage makes all of the model's outputs."""
    producers = {s.name for s in plan.stages for o in s.outputs if o.model_output}
    if len(producers) > 1:
        raise PlanError(
            f"plan {plan.name!r}: model outputs come from several stages {sorted(producers)}; "
            "workers need one stage (the last, or a join) to produce all of them"
        )
    if not producers:
        raise PlanError(f"plan {plan.name!r}: no stage produces a model output")
