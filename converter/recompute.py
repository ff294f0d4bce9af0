"""Shape arithmetic recomputed in every stage that reads it, never sent across a cut.

Exporters compute shapes at run time: tf2onnx turns ``tf.shape(x)[0]`` into
``Shape -> Slice/Gather -> Unsqueeze -> Concat`` feeding a Reshape, an Expand or a
ConstantOfShape, often far from where ``x`` was (the batch size taken once at the model
input and read by every attention block's Reshape). Such a tensor has no batch dimension,
so while it lives no cut is allowed; and it depends on the batch, so it is no plan-time
constant (``converter.fold``). Under micro-batching it must not even cross a cut: a worker
batches requests afresh at every stage, so a batch size computed in stage 0 is wrong in
stage 1.

So these small tensors *float* (``find_floating``): they are never carried; each stage
reading one recomputes its whole chain (``StageRebuilder``). A chain is made of cheap
ops on initializers and on the shapes of *root* tensors (what its Shape/Size nodes read).
A stage that has the root (received across its cut, or made inside) copies the chain
as it is. One that has not rebuilds the root's shape from a batched tensor it has: every
batched tensor of a request has the same batch size, and the root's other dimensions are
fixed numbers (``rebuildable``). A root whose other dimensions are not fixed (a symbolic
sequence length) is carried to the chain's readers instead: it is batched, so it does not
block the cuts it crosses.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.probe import Probe
from conveyor.errors import SplitError

#: Ops a floating chain may hold: shape arithmetic, each cheap on a handful of integers.
CHAIN_OPS = frozenset({
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Reshape",
    "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Min", "Max", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Where", "Range",
    "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "Flatten", "Expand", "Tile",
})
_ROOT_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Floating:
    """The floating part of a model, in the analysis' node order."""

    #: Indices of the floating nodes.
    nodes: frozenset[int]
    #: Floating tensor -> the roots its chain reads that must be carried to its readers
    #: (those a stage cannot rebuild).
    carried_roots: Mapping[str, tuple[str, ...]]


def find_floating(nodes: Sequence[onnx.NodeProto], reads: Sequence[Sequence[str]],
                  initializers: Collection[str], outputs: Collection[str],
                  probe: Probe, rebuildable: Collection[str],
                  batched: Collection[str]) -> Floating:
    """The nodes whose outputs are small shape arithmetic (see the module docstring).

    A node floats when it is one of ``CHAIN_OPS`` (default domain, no sub-graph), all its
    outputs are small integer tensors the probe saw (``Probe.values``) and none is a model
    output, and every input is an initializer, a floating tensor or, for Shape/Size, a
    ``batched`` tensor (the root).
    """
    out: set[int] = set()
    made: set[str] = set()
    roots: dict[str, frozenset[str]] = {}
    for k, node in enumerate(nodes):
        if not _floats(node, reads[k], initializers, outputs, probe, made, batched):
            continue
        out.add(k)
        got: frozenset[str] = frozenset()
        for x in reads[k]:
            if x in made:
                got |= roots[x]
            elif node.op_type in _ROOT_OPS and x not in initializers:
                got |= {x}
        for o in node.output:
            if o:
                made.add(o)
                roots[o] = got
    carried = {t: tuple(sorted(r - set(rebuildable))) for t, r in roots.items()}
    return Floating(frozenset(out), {t: r for t, r in carried.items() if r})


def stage_reads(node_inputs: Sequence[Sequence[str]], producer: Mapping[str, int],
                 floating: Floating) -> tuple[tuple[str, ...], ...]:
    """``node_inputs`` with floating tensors replaced by the roots carried for them."""
    if not floating.nodes:
        return tuple(tuple(r) for r in node_inputs)
    out = []
    for k, names in enumerate(node_inputs):
        need: dict[str, None] = {}
        for x in names:
            if producer.get(x) not in floating.nodes:
                need.setdefault(x, None)
            elif k not in floating.nodes:
                need.update(dict.fromkeys(floating.carried_roots.get(x, ())))
        out.append(tuple(need))
    return tuple(out)


def _floats(node: onnx.NodeProto, reads: Sequence[str], initializers: Collection[str],
            outputs: Collection[str], probe: Probe, made: Collection[str],
            batched: Collection[str]) -> bool:
    if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for a in node.attribute):
        return False
    outs = [o for o in node.output if o]
    if not outs or any(o in outputs or o not in probe.values for o in outs):
        return False
    root_op = node.op_type in _ROOT_OPS
    return all(x in initializers or x in made or (root_op and x in batched) for x in reads)


def fixed_shape(shape: Sequence[int | str | None] | None, axis: int | None,
                sample: Sequence[int] | None) -> tuple[int, ...] | None:
    """The shape of a batched tensor with its batch axis as 0, when every other dimension
    is a fixed number (shape inference and the probe agree); else None."""
    if shape is None or axis is None or sample is None or len(shape) != len(sample) + 1:
        return None
    others = [d for i, d in enumerate(shape) if i != axis]
    if not all(isinstance(d, int) and d > 0 for d in others) or list(others) != list(sample):
        return None
    return tuple(d if i != axis and isinstance(d, int) else 0 for i, d in enumerate(shape))


class StageRebuilder:
    """The floating chain a stage needs, with the roots it lacks rebuilt from a tensor it has.

    ``fixed``: root -> its shape with 0 on the batch axis (``fixed_shape``);
    ``batch_axis``: tensor -> its batch axis.
    """

    def __init__(self, nodes: Sequence[onnx.NodeProto], producer: Mapping[str, int],
                 floating: Collection[int], fixed: Mapping[str, tuple[int, ...]],
                 batch_axis: Mapping[str, int | None]) -> None:
        self.nodes = nodes
        self.producer = producer
        self.floating = floating
        self.fixed = fixed
        self.batch_axis = batch_axis

    def chain(self, reads: Collection[str]) -> list[int]:
        """Indices of the floating nodes that compute the floating tensors in ``reads``."""
        need: set[int] = set()
        stack = [x for x in reads if self.producer.get(x) in self.floating]
        while stack:
            k = self.producer[stack.pop()]
            if k in need:
                continue
            need.add(k)
            stack.extend(x for x in self.nodes[k].input
                         if x and self.producer.get(x) in self.floating)
        return sorted(need)

    def node(self, k: int, have: Collection[str], batched_inputs: Sequence[str]
             ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Node ``k`` of a chain as the stage runs it: itself when the stage has what it
        reads, else (a Shape/Size whose root the stage lacks) the root's shape rebuilt from
        the first of ``batched_inputs``."""
        node = self.nodes[k]
        root = node.input[0] if node.op_type in _ROOT_OPS else None
        if root is None or root in have or root not in self.fixed:
            return [node], []
        if not batched_inputs:
            raise SplitError(f"cannot recompute {node.output[0]!r} (the shape of {root!r}) in "
                             "a stage that receives no batched tensor")
        return _rebuilt(node, self.fixed[root], self.batch_axis[root] or 0,
                        batched_inputs[0], self.batch_axis[batched_inputs[0]] or 0)


def _rebuilt(node: onnx.NodeProto, shape: tuple[int, ...], axis: int, source: str,
             source_axis: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Shape(root) (or Size) as Shape(source)[source_axis] among the root's fixed dims."""
    out = node.output[0]
    pre = f"{out}__rebuilt"
    inits = [numpy_helper.from_array(np.array([source_axis], np.int64), f"{pre}_axis")]
    nodes = [helper.make_node("Shape", [source], [f"{pre}_src"], name=f"{pre}_src"),
             helper.make_node("Gather", [f"{pre}_src", f"{pre}_axis"], [f"{pre}_batch"],
                              axis=0, name=f"{pre}_batch")]
    if node.op_type == "Size":
        rest = int(np.prod([d for i, d in enumerate(shape) if i != axis]))
        inits.append(numpy_helper.from_array(np.array([rest], np.int64), f"{pre}_rest"))
        nodes += [helper.make_node("Mul", [f"{pre}_batch", f"{pre}_rest"], [f"{pre}_n"]),
                  helper.make_node("Squeeze", [f"{pre}_n"], [out], name=pre)]
        return nodes, inits
    attrs = {a.name: a.i for a in node.attribute}
    # Shape's start/end clamp and count from the back exactly as a Python slice does
    picked = list(range(len(shape)))[attrs.get("start", 0):attrs.get("end", len(shape))]
    parts: list[str] = []
    for i in picked:
        if i == axis:
            parts.append(f"{pre}_batch")
        else:
            name = f"{pre}_d{i}"
            inits.append(numpy_helper.from_array(np.array([shape[i]], np.int64), name))
            parts.append(name)
    if axis not in picked:  # the batch is not among them: a constant
        value = np.array([shape[i] for i in picked], np.int64)
        return [], [numpy_helper.from_array(value, out)]
    nodes.append(helper.make_node("Concat", parts, [out], axis=0, name=pre))
    return nodes, inits
