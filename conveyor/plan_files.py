"""The files a plan may read: its stage models and their external weights, all inside it.

A plan directory is untrusted input (it may come from anywhere): a stage file named
``../../etc/x.onnx``, a symbolic link to a file elsewhere, or an ONNX tensor whose external
data ``location`` points outside would let a plan read any file the worker can. Every
path a plan names is resolved (symbolic links followed) and must stay inside the resolved
plan directory; otherwise ``PlanError`` names the file and the way out.

``stage_files`` lists what a stage reads, which is what the plan hash covers: the model
file, then every external data file its tensors name (initializers, ``Constant`` values
and sub-graphs of ``If``/``Loop``/``Scan`` included), in the order they first appear.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.errors import PlanError

if TYPE_CHECKING:
    import onnx

#: Bytes a model file must contain before it is worth parsing for external data: every
#: external tensor carries a ``location`` key (protobuf stores the string as it is).
_EXTERNAL_MARK = b"location"


def confined(directory: Path, relative: str, what: str) -> Path:
    """``directory / relative``, refused unless it resolves to a path inside ``directory``."""
    root = directory.resolve()
    candidate = Path(relative)
    if candidate.is_absolute():
        raise PlanError(f"{what} {relative!r} is an absolute path; a plan names files "
                        f"relative to its directory {directory}")
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise PlanError(
            f"{what} {relative!r} resolves to {resolved}, outside the plan directory {root} "
            "(through '..' or a symbolic link); copy the file into the plan directory"
        )
    return resolved


def stage_files(directory: Path, stage_file: str) -> list[Path]:
    """The model of a stage and the external data files it names, each confined."""
    model = confined(directory, stage_file, "stage file")
    files = [model]
    for location in external_locations(model):
        # Relative to the stage file as the plan names it (how onnxruntime resolves it).
        relative = (Path(stage_file).parent / location).as_posix()
        data = confined(directory, relative, "external data file")
        if data not in files:
            files.append(data)
    return files


def external_locations(model: Path) -> list[str]:
    """The ``location`` of every external tensor of ``model`` (first appearance order)."""
    try:
        with model.open("rb") as f:
            raw = f.read()
    except OSError as exc:
        raise PlanError(f"cannot read stage file {model}: {exc}") from exc
    if _EXTERNAL_MARK not in raw:
        return []
    import onnx
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except DecodeError as exc:
        raise PlanError(f"stage file {model} is not an ONNX model: {exc}") from exc
    seen: list[str] = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            raise PlanError(f"stage file {model}: tensor {tensor.name!r} is external but "
                            "names no location")
        if location not in seen:
            seen.append(location)
    return seen


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``graph``: initializers, sparse values, tensor attributes and
    those of every sub-graph."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
