"""Graph analysis: the facts both splitters need, computed once per model.

``analyze(model)`` turns a prepared ModelProto into an ``Analysis``: the nodes in a
topological order chosen to keep tensors alive briefly (depth-first from the outputs),
what every node reads (outer values captured by If/Loop/Scan bodies included), the type
and shape of every tensor after shape inference, an estimate of the FLOPs of every node
for one sample, and the bytes crossing every position of the order.

Position ``p`` (0..n) is the cut in front of node ``p``: the tensors *live* there are those
made before ``p`` (graph inputs count as made before 0) and read at ``p`` or later (graph
outputs are read "at n", so a chain carries them to its last stage). Initializers and
constants are never live: every stage gets its own copy.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.fold import fold_constants
from converter.probe import Probe, probe_model
from converter.recompute import (
    Floating,
    StageRebuilder,
    find_floating,
    fixed_shape,
    stage_reads,
)
from conveyor.errors import UnsupportedModelError
from conveyor.plan import BATCH

log = logging.getLogger(__name__)

Dim = int | str | None


@functools.lru_cache(maxsize=64)
def _numpy_dtype(elem_type: int) -> str | None:
    if not elem_type:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=64)
def _itemsize(elem_type: int) -> int:
    name = _numpy_dtype(elem_type)
    return int(np.dtype(name).itemsize) if name else 4


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows of a tensor (``shape`` None: rank unknown)."""

    elem_type: int
    shape: tuple[Dim, ...] | None
    #: True when the probe ran the model (``converter.probe``): then ``batch_axis`` is the
    #: axis that follows the batch size (None: the tensor has none) and ``sample`` one
    #: sample's shape at the representative sizes of the symbolic dimensions.
    probed: bool = False
    batch_axis: int | None = None
    sample: tuple[int, ...] | None = None

    @property
    def batched(self) -> bool:
        """True when the first dimension is the batch. Probed: seen to follow the batch size.
        Else by shape inference: ``batch`` or unknown, not a fixed size nor another symbol
        (a time-major ``[seq, batch, ...]`` tensor is not batched)."""
        if self.probed:
            return self.batch_axis == 0
        return self.shape is None or (len(self.shape) > 0 and self.shape[0] in (BATCH, None))

    @property
    def cuttable(self) -> bool:
        """A cut may carry it: batched, or seen batched on another axis (then it crosses
        batch-first, see ``Analysis.wire_name``)."""
        return self.batched or (self.probed and self.batch_axis is not None)

    def batch_first(self) -> TensorInfo:
        """What crosses a cut: the batch axis moved to the front."""
        a = self.batch_axis
        if not self.probed or a is None or a == 0:
            return self
        shape = self.shape
        if shape is not None and a < len(shape):
            shape = (BATCH, *shape[:a], *shape[a + 1:])
        return replace(self, shape=shape, batch_axis=0)

    def concrete(self) -> tuple[int, ...] | None:
        """The shape of one sample with every dimension a number (the batch axis as 1)."""
        if self.sample is not None:
            dims = list(self.sample)
            if self.batch_axis is not None:
                dims.insert(self.batch_axis, 1)
            return tuple(dims)
        if self.shape is None:
            return None
        return tuple(d if isinstance(d, int) and d > 0 else 1 for d in self.shape)

    @property
    def numpy_dtype(self) -> str | None:
        return _numpy_dtype(self.elem_type)

    def sample_elements(self) -> int:
        """Elements of one sample: the batch dimension dropped, symbolic dims at their
        representative sizes when probed, else taken as 1."""
        if self.sample is not None:
            return math.prod(self.sample)
        if self.shape is None:
            return 1
        dims = self.shape[1:] if self.batched else self.shape
        return math.prod(d if isinstance(d, int) else 1 for d in dims)

    def sample_bytes(self) -> int:
        return self.sample_elements() * _itemsize(self.elem_type)


@dataclass(frozen=True)
class Analysis:
    model: onnx.ModelProto
    nodes: tuple[onnx.NodeProto, ...]
    #: Names each node reads (deduplicated, empty names dropped, sub-graph captures added).
    node_inputs: tuple[tuple[str, ...], ...]
    producer: dict[str, int]
    #: Initializer (and folded constant) name -> bytes.
    initializers: dict[str, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    flops: tuple[float, ...]
    #: Last node index reading a tensor; ``len(nodes)`` for graph outputs.
    last_use: dict[str, int]
    #: Representative sizes of the symbolic non-batch dimensions the costs were taken at
    #: (empty when the model was not probed or has none).
    dims: dict[str, int] = field(default_factory=dict)
    probed: bool = False
    #: Nodes of small shape arithmetic that every stage reading it recomputes: their
    #: outputs are never carried across a cut (``converter.recompute``).
    floating: frozenset[int] = frozenset()
    #: What each node needs from outside its stage: ``node_inputs`` less the floating
    #: tensors, plus the roots of their chains that a stage cannot rebuild.
    reads: tuple[tuple[str, ...], ...] = ()

    @property
    def n(self) -> int:
        return len(self.nodes)

    def info(self, name: str) -> TensorInfo:
        return self.tensors.get(name, TensorInfo(0, None))

    def wire_name(self, name: str) -> str:
        """The name a tensor has between stages: ``NAME__batch_first`` when its batch is
        not on axis 0 (the sending stage transposes it, the receiving one back)."""
        info = self.info(name)
        return name if info.batched or not info.cuttable else f"{name}__batch_first"

    def is_floating(self, name: str) -> bool:
        """True for a tensor a floating node makes (recomputed, never carried)."""
        return self.producer.get(name) in self.floating

    def rebuilder(self) -> StageRebuilder:
        """Recomputes the floating chains a stage reads (``converter.recompute``)."""
        roots = {x for k in self.floating for x in self.nodes[k].input[:1]
                 if self.nodes[k].op_type in ("Shape", "Size")}
        fixed = {r: f for r in roots if (f := fixed_shape(self.info(r).shape,
                                                          self.info(r).batch_axis,
                                                          self.info(r).sample)) is not None}
        axes = {t: i.batch_axis for t, i in self.tensors.items()}
        return StageRebuilder(self.nodes, self.producer, self.floating, fixed, axes)

    def defined_at(self, name: str) -> int:
        """Index of the producing node, -1 for a graph input."""
        return self.producer.get(name, -1)

    def live_at(self, p: int) -> list[str]:
        """Tensors crossing position ``p`` (in front of node ``p``), in a stable order."""
        return [t for t in self._carried() if self.defined_at(t) < p <= self.last_use[t]]

    def _carried(self) -> Iterable[str]:
        yield from (i for i in self.inputs if i in self.last_use)
        for outs in (n.output for n in self.nodes):
            yield from (o for o in outs if o in self.last_use)

    def cut_profile(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes per sample live at every position 0..n, and whether all of them are batched."""
        n = self.n
        delta = np.zeros(n + 2)
        unbatched = np.zeros(n + 2, dtype=np.int64)
        for t in self._carried():
            start, stop = self.defined_at(t) + 1, self.last_use[t] + 1
            if start >= stop:
                continue
            info = self.info(t)
            delta[start] += info.sample_bytes()
            delta[stop] -= info.sample_bytes()
            if not info.cuttable:
                unbatched[start] += 1
                unbatched[stop] -= 1
        return np.cumsum(delta)[: n + 1], np.cumsum(unbatched)[: n + 1] == 0

    def param_bytes(self, node_indices: Iterable[int]) -> int:
        names = {i for k in node_indices for i in self.node_inputs[k] if i in self.initializers}
        return sum(self.initializers[i] for i in names)


# -- building it ----------------------------------------------------------------------------
def analyze(model: onnx.ModelProto, *, dims: Mapping[str, int] | None = None,
            probe: bool = True, recompute: bool = True) -> Analysis:
    """Analyse a prepared model (see ``converter.export.prepare``).

    ``probe``: run it (``converter.probe``) to see which tensors carry the batch and how
    big they are with the symbolic dimensions at ``dims`` (default 1 each). ``recompute``:
    let small shape arithmetic float (``converter.recompute``; needs the probe).
    """
    model = infer_shapes(constants_to_initializers(model))
    seen = probe_model(model, dims or {}) if probe else None
    folded = fold_constants(model, seen) if seen is not None else None
    if folded is not None:  # plan-time constants became initializers: look again
        model = infer_shapes(folded)
        seen = probe_model(model, dims or {})
    g = model.graph
    inits = {t.name: _tensor_bytes(t) for t in g.initializer}
    inits.update({s.values.name: _tensor_bytes(s.values) for s in g.sparse_initializer})
    inputs = tuple(i.name for i in g.input if i.name not in inits)
    outputs = tuple(o.name for o in g.output)
    all_inputs = [_node_reads(node) for node in g.node]
    order = topological_order(g.node, all_inputs, outputs)
    nodes = tuple(g.node[i] for i in order)
    node_inputs = tuple(all_inputs[i] for i in order)
    producer = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    tensors = _tensor_infos(model)
    if seen is not None:
        tensors = _probed_infos(tensors, seen)
    floating = (_floating(nodes, node_inputs, inits, outputs, tensors, seen)
                if seen is not None and recompute else Floating(frozenset(), {}))
    reads = stage_reads(node_inputs, producer, floating)
    last_use: dict[str, int] = {}
    for k, names in enumerate(reads):
        for name in names:
            if name not in inits:
                last_use[name] = k
    for name in outputs:
        last_use[name] = len(nodes)
    flops = tuple(node_flops(node, reads, tensors) for node, reads in zip(nodes, node_inputs,
                                                                           strict=True))
    return Analysis(model, nodes, node_inputs, producer, inits, inputs, outputs, tensors,
                    flops, last_use, dict(seen.dims) if seen else {}, seen is not None,
                    floating.nodes, reads)


def _floating(nodes: Sequence[onnx.NodeProto], node_inputs: Sequence[Sequence[str]],
              inits: Mapping[str, int], outputs: Sequence[str],
              tensors: Mapping[str, TensorInfo], seen: Probe) -> Floating:
    batched = {t for t, i in tensors.items() if i.probed and i.batch_axis is not None}
    rebuildable = {t for t in batched
                   if fixed_shape(tensors[t].shape, tensors[t].batch_axis, tensors[t].sample)}
    found = find_floating(nodes, node_inputs, set(inits), set(outputs), seen, rebuildable,
                          batched)
    if found.nodes:
        log.info("%d node(s) of shape arithmetic are recomputed in every stage reading them",
                 len(found.nodes))
    return found


def _probed_infos(tensors: dict[str, TensorInfo], seen: Probe) -> dict[str, TensorInfo]:
    """``tensors`` with what the probe saw; a tensor batched on axis 0 shows ``batch`` there."""
    out = dict(tensors)
    for name in seen.shapes:
        info = tensors.get(name, TensorInfo(0, None))
        axis = seen.batch_axis(name)
        shape = info.shape
        if shape is not None and axis == 0 and len(shape) == len(seen.shapes[name][0]):
            shape = (BATCH, *shape[1:])
        out[name] = replace(info, shape=shape, probed=True, batch_axis=axis,
                            sample=seen.sample_shape(name))
    return out


def _tensor_bytes(t: onnx.TensorProto) -> int:
    itemsize = 1
    if t.data_type != onnx.TensorProto.STRING:
        itemsize = int(np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
    return int(math.prod(t.dims)) * itemsize


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn top-level ``Constant`` nodes into initializers, so they are copied, not cut."""
    if not any(n.op_type == "Constant" for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep: list[onnx.NodeProto] = []
    for node in out.graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        return t
    values: dict[str, np.ndarray] = {
        "value_float": np.array(attr.f, dtype=np.float32),
        "value_floats": np.array(list(attr.floats), dtype=np.float32),
        "value_int": np.array(attr.i, dtype=np.int64),
        "value_ints": np.array(list(attr.ints), dtype=np.int64),
    }
    return numpy_helper.from_array(values[attr.name]) if attr.name in values else None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info from ONNX shape inference (weights are not re-serialised)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if math.prod(t.dims) > 64:  # weights: shape inference needs their dims, not data
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError: keep what the model declares
        log.warning("shape inference failed, using declared shapes only: %s", exc)
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    return out


def _tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    g = model.graph
    infos: dict[str, TensorInfo] = {}
    for vi in (*g.value_info, *g.input, *g.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        shape: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
        old = infos.get(vi.name)
        if old is None or (old.shape is None and shape is not None) or not old.elem_type:
            infos[vi.name] = TensorInfo(tt.elem_type or (old.elem_type if old else 0), shape)
    for t in g.initializer:
        infos[t.name] = TensorInfo(t.data_type, tuple(t.dims))
    return infos


# -- reads, captures and order ----------------------------------------------------------------
def _node_reads(node: onnx.NodeProto) -> tuple[str, ...]:
    reads = dict.fromkeys(n for n in node.input if n)
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            reads.update(dict.fromkeys(sorted(outer_references(sub))))
    return tuple(reads)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a sub-graph (and its nested sub-graphs) reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n and n not in defined)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                used.update(outer_references(sub) - defined)
        defined.update(node.output)
    return used


def topological_order(
    nodes: Sequence[onnx.NodeProto], reads: Sequence[Sequence[str]], outputs: Sequence[str]
) -> list[int]:
    """Depth-first post-order from the graph outputs: producers land next to their readers.

    Nodes that no output depends on are dropped (they cannot change the result).
    """
    producer = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    state = [0] * len(nodes)  # 0 new, 1 on stack, 2 emitted
    order: list[int] = []
    # outputs made early are placed early: a model output carried along is batch-first,
    # what it is made from (a time-major tensor before its Transpose) may not be
    for out in sorted(outputs, key=lambda o: producer.get(o, -1)):
        if out not in producer:
            continue
        stack: list[tuple[int, int]] = [(producer[out], 0)]
        while stack:
            k, i = stack.pop()
            if i == 0:
                if state[k] == 2:
                    continue
                if state[k] == 1:
                    raise UnsupportedModelError(
                        f"the graph has a cycle through node {nodes[k].name!r}")
                state[k] = 1
            ins = reads[k]
            while i < len(ins) and (ins[i] not in producer or state[producer[ins[i]]] == 2):
                i += 1
            if i < len(ins):
                stack.append((k, i + 1))
                stack.append((producer[ins[i]], 0))
            else:
                state[k] = 2
                order.append(k)
    dropped = len(nodes) - len(order)
    if dropped:
        log.info("dropped %d node(s) that no model output depends on", dropped)
    return order


# -- FLOPs ------------------------------------------------------------------------------------
_ELEMENTWISE_COST = {"Softmax": 5.0, "LogSoftmax": 5.0, "BatchNormalization": 2.0,
                     "LayerNormalization": 8.0, "InstanceNormalization": 8.0, "Erf": 4.0,
                     "Gelu": 8.0, "Sigmoid": 4.0, "Tanh": 4.0, "Exp": 4.0, "Log": 4.0,
                     "HardSwish": 3.0, "Swish": 4.0, "Pow": 4.0, "Sqrt": 2.0, "Div": 2.0}
FREE_OPS = frozenset({"Shape", "Size", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity",
         "Constant", "ConstantOfShape", "Cast"})


def _elements(info: TensorInfo) -> float:
    shape = info.concrete()
    return 1.0 if shape is None else float(math.prod(shape))


def node_flops(node: onnx.NodeProto, reads: Sequence[str], tensors: dict[str, TensorInfo]) -> float:
    """Estimated floating-point operations of a node for one sample (batch taken as 1)."""
    def shape(name: str) -> tuple[int, ...] | None:
        return tensors[name].concrete() if name in tensors and name else None

    out = sum(_elements(tensors.get(o, TensorInfo(0, None))) for o in node.output if o)
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv") and len(node.input) > 1:
        w = shape(node.input[1] if op != "QLinearConv" else node.input[3])
        k = math.prod(d if isinstance(d, int) else 1 for d in (w or (1,))[1:])
        return 2.0 * out * k
    if op == "ConvTranspose" and len(node.input) > 1:
        x, w = shape(node.input[0]), shape(node.input[1])
        k = math.prod(d if isinstance(d, int) else 1 for d in (w or (1,))[1:])
        return 2.0 * _elements(TensorInfo(1, x)) * k
    if op in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        a = shape(node.input[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k_dim = (a[-2] if trans_a else a[-1]) if a and len(a) >= 1 else 1
        return 2.0 * out * (k_dim if isinstance(k_dim, int) else 1)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        ks = next((list(at.ints) for at in node.attribute if at.name == "kernel_shape"), [1])
        return out * math.prod(ks)
    if op.startswith(("Global", "Reduce")):
        return _elements(tensors.get(node.input[0], TensorInfo(0, None)))
    if op in FREE_OPS:
        return 0.0
    if any(_subgraphs(a) for a in node.attribute):
        return out * (1 + len(reads))
    return out * _ELEMENTWISE_COST.get(op, 1.0)


def analyze_io(model: onnx.ModelProto) -> list[tuple[str, TensorInfo]]:
    """The model's inputs (initializers excluded) with what their declarations say."""
    inits = {t.name for t in model.graph.initializer}
    infos = _tensor_infos(model)
    return [(i.name, infos.get(i.name, TensorInfo(0, None))) for i in model.graph.input
            if i.name not in inits]
