"""Which tensors carry the batch, and how big they really are: run the model twice and look.

Shape inference cannot follow the batch through a Reshape whose target is computed at run
time or through a broadcast of two symbols (it invents ``unk__N``), and it knows nothing of
symbolic heights, widths and sequence lengths. So the model runs, every top-level tensor
exposed as an output, at two batch sizes (``BATCHES``) with the other symbolic dimensions at
their representative sizes (``--dims``): a dimension that is the batch size in both runs
is the batch axis; the rest, divided by nothing, is one sample's shape at those sizes.
Small integer tensors (shapes, indices) keep their values, so that the ones which are the
same in both runs can be folded to constants (see ``converter.fold``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from conveyor.errors import UnsupportedModelError

log = logging.getLogger(__name__)

#: Batch sizes of the two probe runs (two, so that no fixed dimension passes for the batch).
BATCHES = (2, 3)
#: Symbolic non-batch dimensions without a ``--dims`` value run at this size.
DEFAULT_DIM = 1
#: Integer tensors up to this many elements keep their values (shape arithmetic).
SMALL = 64


@dataclass(frozen=True)
class ProbeFailure:
    """Why the probe could not run: the message, the batch size and the node named."""

    message: str
    batch: int | None = None
    node: str | None = None


@dataclass(frozen=True)
class Probe:
    """Shapes of every top-level tensor at both batch sizes, values of the small ones."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    values: dict[str, tuple[np.ndarray, np.ndarray]]
    #: The representative size used for every symbolic non-batch dimension.
    dims: dict[str, int]
    batches: tuple[int, int] = BATCHES

    def batch_axis(self, name: str) -> int | None:
        """The axis that follows the batch size in both runs; None when none (or unknown)."""
        pair = self.shapes.get(name)
        if pair is None:
            return None
        a, b = pair
        if len(a) != len(b):
            return None
        follows = [i for i, (x, y) in enumerate(zip(a, b, strict=True))
                   if (x, y) == self.batches]
        others_equal = all(x == y for i, (x, y) in enumerate(zip(a, b, strict=True))
                           if i not in follows[:1])
        return follows[0] if follows and others_equal else None

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        """One sample's shape (the batch axis dropped) at the representative sizes."""
        pair = self.shapes.get(name)
        if pair is None:
            return None
        axis = self.batch_axis(name)
        shape = pair[0]
        return shape if axis is None else shape[:axis] + shape[axis + 1:]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a small tensor that came out the same at both batch sizes."""
        pair = self.values.get(name)
        if pair is None or pair[0].shape != pair[1].shape or not np.array_equal(*pair):
            return None
        return pair[0]


def input_shape(vi: onnx.ValueInfoProto, batch: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    """A concrete shape for a model input: batch on axis 0, symbols at their sizes."""
    shape = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if i == 0:
            shape.append(batch)
        elif d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        else:
            shape.append(int(dims.get(d.dim_param, DEFAULT_DIM)))
    return tuple(shape)


def random_feed(model: onnx.ModelProto, batch: int, dims: Mapping[str, int],
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs (floats normal, integers 0..3, bools) for every model input."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        shape = input_shape(vi, batch, dims)
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def symbolic_dims(model: onnx.ModelProto) -> list[str]:
    """Names of the symbolic non-batch dimensions of the model inputs, in order."""
    inits = {t.name for t in model.graph.initializer}
    names: dict[str, None] = {}
    for vi in model.graph.input:
        if vi.name not in inits:
            for d in list(vi.type.tensor_type.shape.dim)[1:]:
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    names.setdefault(d.dim_param or "?", None)
    return list(names)


def _exposed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every top-level tensor a node makes as an extra graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    kinds = {vi.name: vi.type.WhichOneof("value") for vi in g.value_info}
    have = {o.name for o in g.output}
    for node in g.node:
        for name in node.output:
            if name and name not in have and kinds.get(name) in (None, "tensor_type"):
                vi = onnx.ValueInfoProto()
                vi.name = name
                g.output.append(vi)
                have.add(name)
    return out


def run_probe(model: onnx.ModelProto, dims: Mapping[str, int], *, seed: int = 0,
              batches: tuple[int, int] = BATCHES) -> Probe | ProbeFailure:
    """Run ``model`` at both ``BATCHES`` (the failure, naming its node, when it cannot)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    exposed = _exposed(model)
    try:
        sess = ort.InferenceSession(exposed.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        return ProbeFailure(f"onnxruntime cannot load the model: {exc}")
    names = [o.name for o in sess.get_outputs()]
    runs = []
    rng = np.random.default_rng(seed)
    for batch in batches:
        try:
            runs.append(sess.run(names, random_feed(model, batch, dims, rng)))
        except Exception as exc:  # onnxruntime's own exception types
            return ProbeFailure(f"the model fails at batch {batch}: {exc}", batch,
                                _failing_node(str(exc)))
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, a, b in zip(names, *runs, strict=True):
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
            continue
        shapes[name] = (tuple(a.shape), tuple(b.shape))
        if a.dtype.kind in "iub" and max(a.size, b.size) <= SMALL:
            values[name] = (a, b)
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            shapes[vi.name] = (input_shape(vi, batches[0], dims), input_shape(vi, batches[1], dims))
    used = {d: int(dims.get(d, DEFAULT_DIM)) for d in symbolic_dims(model)}
    return Probe(shapes, values, used, batches)


def _failing_node(message: str) -> str | None:
    match = re.search(r"[Nn]ode \(([^)]+)\)", message)
    return match.group(1) if match else None


def probe_model(model: onnx.ModelProto, dims: Mapping[str, int]) -> Probe | None:
    """The probe of a prepared model; None (static analysis only) when it cannot run at all.

    A model that runs at batch 1 but not at the probe's sizes has its batch fixed somewhere
    inside (a batch-1 export whose Reshape targets start with 1): refused, naming the node.
    """
    result = run_probe(model, dims)
    if isinstance(result, Probe):
        return result
    if result.batch is not None and not isinstance(run_probe(model, dims, batches=(1, 1)),
                                                   ProbeFailure):
        raise UnsupportedModelError(
            f"the model runs at batch 1 but not at batch {result.batch}: "
            f"{_culprit(model, result)}. Its batch is fixed inside the graph; re-export it "
            "with a dynamic batch (e.g. torch.onnx.export(..., dynamic_axes={'x': {0: "
            "'batch'}}), tf2onnx with a None batch) or without the hard-coded size"
        )
    log.warning("cannot run the model to see which tensors carry the batch (%s); "
                "using shape inference alone", result.message.splitlines()[0][:300])
    return None


def _culprit(model: onnx.ModelProto, failure: ProbeFailure) -> str:
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    fixed = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]]).tolist()
            if target and target[0] == 1:
                fixed.append(f"Reshape {node.name!r} to {target}")
    named = f"node {failure.node!r} fails" if failure.node else "onnxruntime fails"
    if fixed:
        return f"{named}; hard-coded batch of 1 in " + ", ".join(fixed[:5])
    return f"{named} ({failure.message.splitlines()[0][:300]})"
