"""Human-readable views: the stage table, a model summary and Graphviz DOT."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.errors import ConfigError, ConveyorError
from conveyor.plan import MODEL_INPUT, PLAN_FILE, Plan


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [h.ljust(w) if i < 2 else h.rjust(w)
           for i, (h, w) in enumerate(zip(header, widths, strict=True))]
    body = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join(["  ".join(fmt), line, *body])


def stage_table(plan: Plan, report: Mapping[str, Any] | None = None) -> str:
    """The stages as a table; with the converter's ``split.json``, the estimated and the
    measured (``--profile``) share of every stage, the sizes costs were taken at, notes."""
    est = (report or {}).get("estimated") or {}
    got = (report or {}).get("measured") or {}
    rows = []
    for i, s in enumerate(plan.stages):
        c = s.cost
        reads = ", ".join(sorted({"input" if i.source == MODEL_INPUT else i.source
                                  for i in s.inputs})) or "-"
        row = [s.name, reads, str(c.nodes), _si(c.flops), _si(c.param_bytes, "B"),
               _si(c.in_bytes_per_sample, "B"), f"{100 * c.share:.1f}%"]
        if report is not None:
            row += [_pct(est.get("shares"), i), _pct(got.get("shares"), i)]
        rows.append(row)
    header = ["stage", "reads from", "nodes", "FLOPs", "params", "cut/sample", "share"]
    if report is not None:
        header += ["estimated", "measured"]
    sp = plan.split
    text = (f"plan {plan.name}: {len(plan.stages)} stage(s) by {sp.by}, opset {plan.opset}, "
            f"balance {sp.balance:.3f} ({sp.cost_model}), partitioning "
            f"{plan.partitioning.kind} x{plan.partitioning.shards}\n")
    if report is not None:
        dims = ", ".join(f"{k}={v}" for k, v in report.get("dims", {}).items()) or "none"
        text += (f"symbolic dims taken at: {dims}; balance estimated "
                 f"{est.get('balance', 0.0):.3f}, measured "
                 + (f"{got['balance']:.3f}" if got else "- (convert with --profile)") + "\n")
        text += "".join(f"note: {n}\n" for n in report.get("notes", []))
    return text + _table(header, rows)


def _pct(shares: Any, i: int) -> str:
    return f"{100 * shares[i]:.1f}%" if isinstance(shares, list) and i < len(shares) else "-"


def read_report(directory: Path) -> dict[str, Any] | None:
    """The converter's account of a plan's split (``split_report``'s layout): from its
    plan.json, or from the ``split.json`` that older plans kept beside it; None when
    neither has it."""
    from converter.plan_writer import SPLIT_REPORT

    try:
        plan = Plan.load(directory, verify=False)
    except ConveyorError:
        return None
    if plan.split.estimated_balance is not None:
        return plan_report(plan)
    try:
        data = json.loads((directory / SPLIT_REPORT).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_report(plan: Plan) -> dict[str, Any]:
    """What ``split_report`` wrote, as plan.json carries it (SplitInfo, StageCost)."""
    sp = plan.split
    measured = None
    if sp.measured_balance is not None:
        measured = {"balance": sp.measured_balance,
                    "shares": [s.cost.measured_share for s in plan.stages]}
    return {"dims": dict(sp.dims), "probed": sp.probed, "notes": list(sp.notes),
            "estimated": {"balance": sp.estimated_balance,
                          "shares": [s.cost.estimated_share for s in plan.stages]},
            "measured": measured}


#: FLOP/s one replica sustains when the caller gives no figure: a few CPU cores running
#: onnxruntime on small dense layers (measure yours: bench/, `--replica-flops`).
DEFAULT_REPLICA_FLOPS = 2e10


def replica_table(plan: Plan, rate: float, replica_flops: float = DEFAULT_REPLICA_FLOPS) -> str:
    """Replicas each stage needs to serve ``rate`` samples/s, from the plan's FLOP estimates
    and what one replica sustains; the plan's static schedule beside it."""
    if rate <= 0 or replica_flops <= 0:
        raise ConfigError(f"--rate and --replica-flops must be > 0, got {rate} and {replica_flops}")
    rows = []
    for s in plan.stages:
        need = rate * s.cost.flops
        replicas = max(1, math.ceil(need / replica_flops))
        rows.append([s.name, _si(s.cost.flops), _si(need, "FLOP/s"), str(replicas),
                     str(plan.scheduling.for_stage(s.name).workers)])
    table = _table(["stage", "FLOPs/sample", "needed", "replicas", "planned"], rows)
    return (f"replicas for {rate:g} samples/s at {_si(replica_flops, 'FLOP/s')} per replica "
            f"(set the plan's scheduling workers to them, or let KEDA scale from there):\n"
            f"{table}")


def plan_dot(plan: Plan) -> str:
    lines = [f'digraph "{plan.name}" {{', "  rankdir=LR;", '  node [shape=box];',
             '  "@input" [shape=oval, label="input"];', '  "@output" [shape=oval, label="output"];']
    for s in plan.stages:
        lines.append(f'  "{s.name}" [label="{s.name}\\n{s.cost.nodes} nodes, '
                     f'{100 * s.cost.share:.0f}%"];')
        for i in s.inputs:
            if i.source == MODEL_INPUT:
                lines.append(f'  "@input" -> "{s.name}" [label="{i.tensor.name}"];')
        for o in s.outputs:
            for c in o.consumers:
                lines.append(f'  "{s.name}" -> "{c}" [label="{o.tensor.name}"];')
            if o.model_output:
                lines.append(f'  "{s.name}" -> "@output" [label="{o.tensor.name}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def inspect_target(target: Path) -> tuple[str, str]:
    """(text, DOT) for a plan directory or an ONNX model file."""
    if target.is_dir() and (target / PLAN_FILE).exists():
        plan = Plan.load(target)
        return stage_table(plan, read_report(target)) + f"\nhash {plan.hash}", plan_dot(plan)
    if target.is_dir():
        raise ConfigError(f"{target} is a directory without {PLAN_FILE}: not a plan")
    return model_summary(target)


def model_summary(path: Path) -> tuple[str, str]:
    from converter.api import analyze_model
    from converter.split_layer import allowed_cuts

    analysis, _ = analyze_model(path)
    flops_by_op: defaultdict[str, float] = defaultdict(float)
    for node, f in zip(analysis.nodes, analysis.flops, strict=True):
        flops_by_op[node.op_type] += f
    total = sum(analysis.flops) or 1.0
    top = sorted(flops_by_op.items(), key=lambda kv: -kv[1])[:10]
    rows = [[op, "", str(sum(1 for n in analysis.nodes if n.op_type == op)), _si(f), "", "",
             f"{100 * f / total:.1f}%"] for op, f in top]
    table = _table(["op", "", "nodes", "FLOPs", "", "", "share"], rows)
    io = ", ".join(f"{n}{list(analysis.info(n).shape or [])}" for n in analysis.inputs)
    out = ", ".join(f"{n}{list(analysis.info(n).shape or [])}" for n in analysis.outputs)
    text = (f"model {path.name}: {analysis.n} nodes, {_si(total)}FLOPs/sample, "
            f"{_si(sum(analysis.initializers.values()), 'B')} of weights, "
            f"{len(allowed_cuts(analysis))} cut positions (at most "
            f"{len(allowed_cuts(analysis)) + 1} layer stages)\ninputs: {io}\noutputs: {out}\n"
            f"{table}")
    lines = [f'digraph "{path.stem}" {{', "  node [shape=box];"]
    for k, node in enumerate(analysis.nodes):
        lines.append(f'  n{k} [label="{node.op_type}"];')
        for x in analysis.node_inputs[k]:
            if x in analysis.producer:
                lines.append(f"  n{analysis.producer[x]} -> n{k};")
    lines.append("}")
    return text, "\n".join(lines) + "\n"
