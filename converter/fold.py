"""Plan-time constants: shape arithmetic folded away, and a top-level If decided.

A small integer tensor that does not depend on the data (it reaches the model inputs only
through Shape/Size) and came out the same at both probe batch sizes is a constant of the
plan when every model input has fixed non-batch dimensions. Such tensors (a YOLO-style
head's grid sizes, a loop's trip count) are made early and read far downstream; left as
they are, each one blocks every cut in between (it has no batch dimension). Folded into
initializers they are copied into each stage instead.

A top-level If whose condition is such a constant (or an initializer) is replaced by the
branch it selects, so the split can cut inside it. An If decided by the data stays one
node: ``control_flow_note`` says why it cannot be split inside, and that the user may fix
its condition (``--constant``, ``converter.constants``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.probe import Probe
from conveyor.errors import UnsupportedModelError

log = logging.getLogger(__name__)

_SHAPE_OPS = frozenset({"Shape", "Size"})


def static_inputs(model: onnx.ModelProto) -> bool:
    """Every model input's dimensions past the batch are fixed numbers."""
    inits = {t.name for t in model.graph.initializer}
    return all(d.HasField("dim_value") and d.dim_value > 0
               for vi in model.graph.input if vi.name not in inits
               for d in list(vi.type.tensor_type.shape.dim)[1:])


def data_free(model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on the model inputs through their shapes only (or not at all)."""
    g = model.graph
    free = {t.name for t in g.initializer}
    for node in g.node:  # graph order is topological for a valid model
        nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                     for a in node.attribute)
        if not nested and (node.op_type in _SHAPE_OPS
                           or all(not x or x in free for x in node.input)):
            free.update(o for o in node.output if o)
    return free


def fold_constants(model: onnx.ModelProto, probe: Probe) -> onnx.ModelProto | None:
    """A copy with plan-time constant tensors as initializers, the top-level Ifs they
    decide inlined; None when there is nothing to fold."""
    if not static_inputs(model):
        return None
    free = data_free(model)
    inits = {t.name for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for name in free - inits:
        value = probe.constant(name)
        if value is not None:
            values[name] = value
    keep = [n for n in model.graph.node
            if not (n.output and all(o in values for o in n.output if o))]
    conds = {n.input[0] for n in keep if n.op_type == "If"}
    if len(keep) == len(model.graph.node) and not conds & (set(values) | inits):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in sorted(values.items()))
    log.info("folded %d plan-time constant tensor(s)", len(values))
    return inline_decided_ifs(out)


def inline_decided_ifs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Top-level Ifs whose condition is an initializer, replaced by the chosen branch."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        if node.op_type != "If" or node.input[0] not in inits:
            nodes.append(node)
            continue
        taken = bool(numpy_helper.to_array(inits[node.input[0]]).reshape(-1)[0])
        branch = _attr(node, "then_branch" if taken else "else_branch")
        nodes.extend(_inlined(g, node, branch))
        g.initializer.extend(branch.initializer)
        log.info("If %r is decided at plan time (%s): its %s branch is inlined", node.name,
                 node.input[0], "then" if taken else "else")
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(nodes)
    return model


def _attr(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    graph: onnx.GraphProto = next(a.g for a in node.attribute if a.name == name)
    return graph


def _inlined(graph: onnx.GraphProto, node: onnx.NodeProto,
             branch: onnx.GraphProto) -> list[onnx.NodeProto]:
    outer = ({vi.name for vi in graph.input} | {t.name for t in graph.initializer}
             | {o for n in graph.node for o in n.output})
    inner = {o for n in branch.node for o in n.output} | {t.name for t in branch.initializer}
    clash = sorted(inner & outer)
    if clash:
        raise UnsupportedModelError(
            f"If {node.name!r} is decided at plan time but its branch redefines {clash[:3]}, "
            "names of the outer graph; re-export the model with unique tensor names")
    bridge = [helper.make_node("Identity", [b.name], [o], name=f"{node.name}__{o}")
              for b, o in zip(branch.output, node.output, strict=True) if o]
    return [*branch.node, *bridge]


def _nested(graph: onnx.GraphProto) -> int:
    """Nodes of a graph, those inside its sub-graphs included."""
    return sum(1 + sum(_nested(g) for a in n.attribute
                       for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs))
               for n in graph.node)


def control_flow_note(model: onnx.ModelProto) -> str | None:
    """Why a split cannot cut inside the control-flow node that holds most of the model.

    The share is counted in nodes (sub-graphs included): the FLOPs of a body are not known
    outside it, and a model wrapped in one If is one node with the whole model inside.
    """
    total = _nested(model.graph) or 1
    for node in model.graph.node:
        if node.op_type not in ("If", "Loop", "Scan"):
            continue
        inside = _nested(onnx.GraphProto(node=[node])) - 1
        if inside / total > 0.5:
            fix = (f"; if every request takes the same branch, fix its condition with "
                   f"--constant {node.input[0]}=1 (or =0): that branch is inlined and split"
                   if node.op_type == "If" else "")
            return (f"{node.op_type} {node.name!r} holds {100 * inside / total:.0f}% of the "
                    "model's nodes in one node: its condition / trip count depends on the "
                    f"request's data, so no plan-time split can cut inside it{fix}")
    return None
