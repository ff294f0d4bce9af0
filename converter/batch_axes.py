"""Where the batch is in the model's inputs and outputs, and making it axis 0, symbolic.

Workers batch requests along axis 0 of every tensor, so a plan's inputs and outputs are
``[batch, ...]``. Exports say so in several ways, and ``batch_first`` accepts them all:

- ``batch`` or any other symbol (``N``, ``unk__3``) or ``-1`` on axis 0: renamed ``batch``;
- a fixed batch of 1 (most published exports): made symbolic; the probe then proves it by
  running batch 2 and 3 and names the node that hard-codes 1 when it does not
  (``converter.probe.probe_model``);
- the batch on another axis (recurrent state ``[layers, batch, hidden]``, time-major
  ``[time, batch, features]``): ``--batch-axis NAME=AXIS``, or found by a dimension named
  like a batch; the plan's tensor is batch-first and a Transpose inside the model restores
  the layout the model was written for;
- a scalar input (a sample rate, a threshold) read only by elementwise operators: a
  per-request value, ``[batch]`` in the plan, broadcast to each request's rows.

Anything else (a fixed first dimension other than 1, a scalar used as a trip count or a
shape) is refused naming the tensor, the node and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conveyor.errors import ConfigError, UnsupportedModelError
from conveyor.plan import BATCH

#: Operators that broadcast a scalar over their other operand: a scalar input read only by
#: these can be one value per request.
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Greater",
                          "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "And", "Or",
                          "Xor", "Where", "PRelu", "BitShift"})
_BATCH_NAME = re.compile(r"^(batch|batch_size|bs|n)$", re.IGNORECASE)


def parse_batch_axes(specs: Sequence[str]) -> dict[str, int]:
    """``NAME=AXIS`` strings -> {name: axis} (ConfigError on a malformed one)."""
    axes: dict[str, int] = {}
    for spec in specs:
        name, sep, axis = spec.partition("=")
        if not sep or not name or not axis.strip().isdigit():
            raise ConfigError(f"--batch-axis {spec!r} is not NAME=AXIS (AXIS a number, e.g. h0=1)")
        axes[name] = int(axis)
    return axes


def batch_first(model: onnx.ModelProto, axes: Mapping[str, int]) -> None:
    """Make every model input and output ``[batch, ...]`` in place (see the module doc)."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    known = {vi.name for vi in (*graph.input, *graph.output)}
    unknown = sorted(set(axes) - known)
    if unknown:
        raise ConfigError(f"--batch-axis names {unknown}, which the model has not among its "
                          f"inputs and outputs {sorted(known - inits)}")
    inputs = [vi for vi in graph.input if vi.name not in inits]
    for vi in inputs:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            raise UnsupportedModelError(f"model input {vi.name!r} has no shape: no batch dimension")
        rank = len(vi.type.tensor_type.shape.dim)
        axis = axes.get(vi.name, _named_batch_axis(vi))
        if rank == 0:
            _per_request_scalar(model, vi)
        elif axis:
            _check_axis(vi, axis)
            _transpose_input(graph, vi, axis)
    for vi in graph.output:
        axis = axes.get(vi.name, _named_batch_axis(vi))
        if axis and vi.type.tensor_type.HasField("shape"):
            _check_axis(vi, axis)
            _transpose_output(graph, vi, axis)
    _symbolic_batch(graph)


def _named_batch_axis(vi: onnx.ValueInfoProto) -> int:
    """The axis named like a batch when axis 0 is not (``[seq, batch, hidden]``), else 0."""
    dims = list(vi.type.tensor_type.shape.dim)
    if not dims or _BATCH_NAME.match(dims[0].dim_param or ""):
        return 0
    return next((i for i, d in enumerate(dims) if _BATCH_NAME.match(d.dim_param or "")), 0)


def _check_axis(vi: onnx.ValueInfoProto, axis: int) -> None:
    dims = vi.type.tensor_type.shape.dim
    if axis >= len(dims):
        raise ConfigError(f"--batch-axis {vi.name}={axis}: {vi.name!r} has rank {len(dims)}")
    if dims[axis].HasField("dim_value") and dims[axis].dim_value > 1:
        raise UnsupportedModelError(
            f"{vi.name!r}: axis {axis} has the fixed size {dims[axis].dim_value}, not a batch")


def _moved(vi: onnx.ValueInfoProto, name: str, axis: int) -> onnx.ValueInfoProto:
    dims = list(vi.type.tensor_type.shape.dim)
    order = [dims[axis], *dims[:axis], *dims[axis + 1:]]
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
             for d in order]
    return helper.make_tensor_value_info(name, vi.type.tensor_type.elem_type, shape)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
    for out in graph.output:
        if out.name == old:
            out.name = new


def _transpose_input(graph: onnx.GraphProto, vi: onnx.ValueInfoProto, axis: int) -> None:
    """Input ``x`` batch-first in the plan; each node reading it gets its own Transpose back
    to the model's layout (``x__model_layout_K``), so that only the batch-first ``x`` lives
    across the graph and a cut may carry it."""
    rank = len(vi.type.tensor_type.shape.dim)
    others = [i for i in range(rank) if i != axis]
    perm = [0 if i == axis else others.index(i) + 1 for i in range(rank)]
    readers = [k for k, node in enumerate(graph.node) if vi.name in node.input]
    for j, k in enumerate(reversed(readers)):
        inner = f"{vi.name}__model_layout_{len(readers) - 1 - j}"
        node = graph.node[k]
        node.input[:] = [inner if x == vi.name else x for x in node.input]
        graph.node.insert(k, helper.make_node("Transpose", [vi.name], [inner], perm=perm,
                                              name=f"{inner}__batch_first_in"))
    vi.CopyFrom(_moved(vi, vi.name, axis))


def _transpose_output(graph: onnx.GraphProto, vi: onnx.ValueInfoProto, axis: int) -> None:
    """Output ``y`` batch-first in the plan; the model's own ``y`` is renamed."""
    rank = len(vi.type.tensor_type.shape.dim)
    perm = [axis, *[i for i in range(rank) if i != axis]]
    inner = f"{vi.name}__model_layout"
    made = len(graph.node) - 1
    for k, node in enumerate(graph.node):
        if vi.name in node.output:
            made = k
        node.output[:] = [inner if x == vi.name else x for x in node.output]
        node.input[:] = [inner if x == vi.name else x for x in node.input]
    # right behind its producer: the layer order places an output made early early
    graph.node.insert(made + 1, helper.make_node("Transpose", [inner], [vi.name], perm=perm,
                                                 name=f"{vi.name}__batch_first_out"))
    vi.CopyFrom(_moved(vi, vi.name, axis))


def _per_request_scalar(model: onnx.ModelProto, vi: onnx.ValueInfoProto) -> None:
    """A scalar input read only by broadcasting operators becomes ``[batch]`` in the plan,
    reshaped inside to ``[batch, 1, ..., 1]`` so each request's value meets its own rows."""
    graph = model.graph
    readers = [n for n in graph.node if vi.name in n.input]
    bad = next((n for n in readers if n.op_type not in BROADCASTING), None)
    if bad is not None:
        raise UnsupportedModelError(
            f"model input {vi.name!r} is a scalar read by {bad.op_type} {bad.name!r}, which "
            "cannot take one value per request of a batch; fix: export the model with "
            f"{vi.name!r} as a [batch, ...] tensor, or with its value fixed (an initializer)")
    ranks = _ranks(model)
    rank = max((ranks.get(x, 0) for n in readers for x in n.input if x != vi.name), default=1)
    inner = f"{vi.name}__per_request"
    _rename_reads(graph, vi.name, inner)
    shape_name = f"{vi.name}__per_request_shape"
    graph.initializer.append(numpy_helper.from_array(
        np.array([-1] + [1] * (max(rank, 1) - 1), dtype="int64"), shape_name))
    graph.node.insert(0, helper.make_node("Reshape", [vi.name, shape_name], [inner],
                                          name=f"{vi.name}__per_request"))
    vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, [BATCH]))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # InferenceError, ValidationError: ranks unknown
        return {}
    return {vi.name: len(vi.type.tensor_type.shape.dim)
            for vi in (*inferred.graph.value_info, *inferred.graph.input)
            if vi.type.tensor_type.HasField("shape")}


def _symbolic_batch(graph: onnx.GraphProto) -> None:
    """Axis 0 of every input and output becomes ``batch`` (a fixed 1 and ``-1`` included)."""
    inits = {i.name for i in graph.initializer}
    renamed: set[str] = set()
    fixed_one = False
    for vi in graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        fixed_one |= len(dims) > 0 and dims[0].dim_value == 1
        if len(dims) == 0 or (dims[0].HasField("dim_value") and dims[0].dim_value > 1):
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise UnsupportedModelError(
                f"model input {vi.name!r} has shape {shape}: no symbolic batch dimension "
                "(the first dimension must be variable or 1; for a batch on another axis "
                f"pass --batch-axis {vi.name}=AXIS)"
            )
        if dims[0].dim_param and dims[0].dim_param != BATCH:
            renamed.add(dims[0].dim_param)
        dims[0].dim_param = BATCH
    for vi in graph.output:
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape"):
            continue
        if len(dims) == 0 or (dims[0].HasField("dim_value") and dims[0].dim_value > 1):
            raise UnsupportedModelError(
                f"model output {vi.name!r} has no symbolic batch dimension "
                f"(rank {len(dims)}, first dimension fixed or missing; for a batch on another "
                f"axis pass --batch-axis {vi.name}=AXIS)"
            )
        dims[0].dim_param = BATCH
    for vi in graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param in renamed:
            dims[0].dim_param = BATCH
    if fixed_one:  # a batch-1 export's inner shapes say 1 too: let shape inference redo them
        keep = [vi for vi in graph.value_info
                if not (len(vi.type.tensor_type.shape.dim)
                        and vi.type.tensor_type.shape.dim[0].dim_value == 1)]
        del graph.value_info[:]
        graph.value_info.extend(keep)
