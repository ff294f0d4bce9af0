"""Wire stage drafts into a DAG and build each stage's ModelProto.

``wire_chain`` / ``wire_dag`` decide what every stage reads (and from where) and what it
sends (and to whom). Either way exactly one stage produces the model outputs (workers
reply from one place): a chain's last stage, or for a DAG whose outputs are made by
several stages, a *gather* stage appended by ``wire_dag`` that reads each output from the
stage making it and passes it on unchanged.

``StageExtractor.extract`` is the pure proto step, in the manner of
``onnx.utils.Extractor``: the stage's nodes, a copy of every initializer they read (shared
ones duplicated), the value_info of its inner tensors, the opset imports and local
functions of the model. ``save_stage`` writes one, with external data when asked
or when the proto would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from onnx import helper

from converter.graph import Analysis, TensorInfo, outer_references
from conveyor.errors import SplitError
from conveyor.plan import BATCH, MODEL_INPUT

#: Protobuf cannot serialise a message of 2 GiB or more.
PROTO_LIMIT = 2**31 - 2**24
#: Group (and stage name suffix) of the stage that gathers model outputs made by several stages.
GATHER = "gather"


@dataclass(frozen=True)
class StageDraft:
    """A stage before wiring: its nodes (indices into the analysis order) and its key."""

    name: str
    nodes: tuple[int, ...]
    group: str | None = None


@dataclass(frozen=True)
class WiredStage:
    name: str
    nodes: tuple[int, ...]
    group: str | None
    #: (tensor, source stage or MODEL_INPUT)
    inputs: tuple[tuple[str, str], ...]
    #: (tensor, consumer stages, is a model output)
    outputs: tuple[tuple[str, tuple[str, ...], bool], ...]


def wire_chain(analysis: Analysis, ranges: Sequence[tuple[int, int]]) -> list[WiredStage]:
    """Stages of a layer split: each reads what is live at its start from the previous one."""
    k = len(ranges)
    names = [f"stage{i}" for i in range(k)]
    out: list[WiredStage] = []
    for i, (a, b) in enumerate(ranges):
        source = MODEL_INPUT if i == 0 else names[i - 1]
        inputs = tuple((t, source) for t in analysis.live_at(a))
        outputs: tuple[tuple[str, tuple[str, ...], bool], ...]
        if i == k - 1:
            outputs = tuple((t, (), True) for t in analysis.outputs)
        else:
            outputs = tuple((t, (names[i + 1],), False) for t in analysis.live_at(b))
        out.append(WiredStage(names[i], tuple(range(a, b)), None, inputs, outputs))
    return out


def runnable(analysis: Analysis, drafts: Sequence[StageDraft]) -> list[StageDraft]:
    """``drafts`` less those of floating nodes only: they have nothing to run (their nodes
    are recomputed where read, ``converter.recompute``)."""
    return [d for d in drafts if any(v not in analysis.floating for v in d.nodes)]


def wire_dag(analysis: Analysis, drafts: Sequence[StageDraft]) -> list[WiredStage]:
    """Stages of a function split: each reads every outside tensor from its producer."""
    drafts = runnable(analysis, drafts)
    stage_of = {v: d.name for d in drafts for v in d.nodes}
    readers: dict[str, dict[str, None]] = {}
    reads_per_stage: list[dict[str, None]] = []
    for d in drafts:
        made = {o for v in d.nodes for o in analysis.nodes[v].output if o}
        reads: dict[str, None] = {}
        for v in d.nodes:
            for x in analysis.reads[v]:
                if x not in made and x not in analysis.initializers:
                    reads.setdefault(x, None)
        reads_per_stage.append(reads)
        for x in reads:
            readers.setdefault(x, {})[d.name] = None
    model_outputs = set(analysis.outputs)
    out: list[WiredStage] = []
    for d, reads in zip(drafts, reads_per_stage, strict=True):
        inputs = tuple(
            (x, stage_of[analysis.producer[x]] if x in analysis.producer else MODEL_INPUT)
            for x in reads
        )
        outputs = []
        for v in d.nodes:
            for o in analysis.nodes[v].output:
                if o and (o in readers or o in model_outputs):
                    outputs.append((o, tuple(readers.get(o, {})), o in model_outputs))
        # model outputs in the model's order, whatever the order of the nodes making them
        rank = {o: i for i, o in enumerate(analysis.outputs)}
        outputs.sort(key=lambda o: rank.get(o[0], -1) if o[2] else -1)
        out.append(WiredStage(d.name, d.nodes, d.group, inputs, tuple(outputs)))
    for x in model_outputs - set(analysis.producer):
        raise SplitError(f"model output {x!r} is not computed by any node")
    return gather_outputs(analysis, out)


def output_stages(stages: Sequence[WiredStage]) -> set[str]:
    """Names of the stages that produce model outputs."""
    return {s.name for s in stages if any(mo for _, _, mo in s.outputs)}


def gather_outputs(analysis: Analysis, stages: Sequence[WiredStage]) -> list[WiredStage]:
    """``stages``, plus a gather stage when model outputs leave from more than one of them.

    The gather stage has no nodes: its graph outputs are its graph inputs (one per model
    output, same names, model order), so the caller sees the model's output names. The
    stages that made them send them to it as ordinary tensors: for the workers it is one
    more join, gathering a request's parts by request id.
    """
    if len(output_stages(stages)) <= 1:
        return list(stages)
    name = f"stage{len(stages)}_{GATHER}"
    producer = {t: s.name for s in stages for t, _, mo in s.outputs if mo}
    rewired = [
        replace(s, outputs=tuple((t, (*cons, name) if mo else cons, False)
                                 for t, cons, mo in s.outputs))
        for s in stages
    ]
    gather = WiredStage(
        name, (), GATHER,
        inputs=tuple((t, producer[t]) for t in analysis.outputs),
        outputs=tuple((t, (), True) for t in analysis.outputs),
    )
    return [*rewired, gather]


def value_info(name: str, info: TensorInfo) -> onnx.ValueInfoProto:
    if not info.elem_type:
        raise SplitError(f"cannot tell the element type of tensor {name!r} at a stage boundary")
    if info.shape is None:
        return helper.make_tensor_value_info(name, info.elem_type, None)
    dims: list[int | str | None] = list(info.shape)
    if info.batched and dims:
        dims[0] = BATCH
    return helper.make_tensor_value_info(name, info.elem_type, dims)


class StageExtractor:
    """Builds stage models from one analysed model (indexes its initializers once)."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        g = analysis.model.graph
        self._inits = {t.name: t for t in g.initializer}
        self._sparse = {s.values.name: s for s in g.sparse_initializer}
        self._vinfo = {vi.name: vi for vi in g.value_info}

    def extract(self, stage: WiredStage) -> onnx.ModelProto:
        a = self.analysis
        own = [v for v in sorted(stage.nodes) if v not in a.floating]
        chain, rebuilt = self._recomputed(stage, own)
        nodes = [n for _, n in sorted([*((v, a.nodes[v]) for v in own), *chain],
                                      key=lambda kn: kn[0])]
        reads = {x for n in nodes for x in _all_reads(n)}
        made = {o for n in nodes for o in n.output if o}
        out_names = {t for t, _, _ in stage.outputs}
        nodes = [*self._from_wire(stage), *nodes, *self._to_wire(stage)]
        graph = helper.make_graph(
            nodes,
            stage.name,
            [value_info(a.wire_name(t), a.info(t).batch_first()) for t, _ in stage.inputs],
            [value_info(a.wire_name(t), a.info(t).batch_first()) for t, _, _ in stage.outputs],
            initializer=[*(self._inits[x] for x in sorted(reads) if x in self._inits),
                         *rebuilt],
            value_info=[self._vinfo[x] for x in sorted(made - out_names) if x in self._vinfo],
        )
        graph.sparse_initializer.extend(self._sparse[x] for x in sorted(reads)
                                        if x in self._sparse)
        src = a.model
        model = helper.make_model(graph, opset_imports=list(src.opset_import),
                                  functions=list(src.functions))
        model.ir_version = src.ir_version
        model.producer_name = "conveyor"
        model.producer_version = src.producer_version
        model.metadata_props.extend(src.metadata_props)
        return model


    def _recomputed(self, stage: WiredStage, own: Sequence[int]
                    ) -> tuple[list[tuple[int, onnx.NodeProto]], list[onnx.TensorProto]]:
        """The floating chains the stage's nodes read, placed where the model has them
        (after their roots, before their readers), roots it lacks rebuilt."""
        a = self.analysis
        if not a.floating:
            return [], []
        received = [t for t, _ in stage.inputs]
        have = {*received, *(o for v in own for o in a.nodes[v].output if o)}
        batched = [t for t in received if a.info(t).batch_axis is not None]
        rebuilder = a.rebuilder()
        chain: list[tuple[int, onnx.NodeProto]] = []
        inits: list[onnx.TensorProto] = []
        for k in rebuilder.chain({x for v in own for x in a.node_inputs[v]}):
            nodes, consts = rebuilder.node(k, have, batched)
            chain.extend((k, n) for n in nodes)
            inits.extend(consts)
        return chain, inits

    def _from_wire(self, stage: WiredStage) -> list[onnx.NodeProto]:
        """Transposes from a received batch-first tensor back to the model's layout."""
        out = []
        for t, _ in stage.inputs:
            wire, axis = self.analysis.wire_name(t), self.analysis.info(t).batch_axis
            if wire != t and axis is not None:
                rank = len(self.analysis.info(t).sample or ()) + 1
                others = [i for i in range(rank) if i != axis]
                perm = [0 if i == axis else others.index(i) + 1 for i in range(rank)]
                out.append(helper.make_node("Transpose", [wire], [t], perm=perm,
                                            name=f"{wire}__from_wire"))
        return out

    def _to_wire(self, stage: WiredStage) -> list[onnx.NodeProto]:
        """Transposes making a sent tensor batch-first (not for one passed through)."""
        received = {t for t, _ in stage.inputs}
        out = []
        for t, _, _ in stage.outputs:
            wire, axis = self.analysis.wire_name(t), self.analysis.info(t).batch_axis
            if wire != t and axis is not None and t not in received:
                rank = len(self.analysis.info(t).sample or ()) + 1
                perm = [axis, *[i for i in range(rank) if i != axis]]
                out.append(helper.make_node("Transpose", [t], [wire], perm=perm,
                                            name=f"{wire}__to_wire"))
        return out


def _all_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, those its sub-graphs capture included."""
    names = {x for x in node.input if x}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
            names |= outer_references(g)
    return names


def save_stage(model: onnx.ModelProto, path: Path, *, external_threshold: int | None) -> None:
    """Write a stage; weights go to ``<file>.data`` when forced or when the proto is too big.

    ``external_threshold``: bytes from which an initializer is stored externally; None
    means only when the whole model would pass the protobuf limit (then 1 KiB).
    """
    too_big = model.ByteSize() >= PROTO_LIMIT
    if external_threshold is None and not too_big:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=external_threshold if external_threshold is not None else 1024,
    )
