"""Export: a Keras model, a saved Keras/TensorFlow model or an ONNX file -> a ModelProto.

``load_model`` is the file-facing wrapper (it validates the source first); ``prepare`` is
the pure step every model goes through, whatever its origin: it checks that onnxruntime
can load the opsets, lowers the IR version to one onnxruntime accepts, names every node,
and makes every model input and output batch-first with the symbol ``batch``.

TensorFlow is imported only on the Keras path. ``tf2onnx.convert.from_keras`` does not work
with Keras 3, so a Keras model is wrapped in a ``tf.function`` with a batch-free input
signature and converted with ``tf2onnx.convert.from_function``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from converter.batch_axes import batch_first
from conveyor.errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


# -- what the installed onnxruntime accepts ---------------------------------------------
@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int]:
    """(highest default-domain opset, highest IR version) the installed onnxruntime loads.

    Probed once with a one-node model, so the answer follows onnxruntime upgrades.
    """
    import onnxruntime as ort

    def loads(opset: int, ir: int) -> bool:
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    max_ir = next((ir for ir in range(onnx.IR_VERSION, 3, -1) if loads(13, ir)), 8)
    max_opset = next(
        (op for op in range(onnx.defs.onnx_opset_version(), 12, -1) if loads(op, max_ir)), 17
    )
    return max_opset, max_ir


# -- the file-facing wrapper --------------------------------------------------------------
def load_model(source: Any, *, opset: int | None = None,
               batch_axes: Mapping[str, int] | None = None,
               custom_objects: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    """Any supported source -> a prepared ModelProto (weights loaded into memory).

    ``source``: an ``onnx.ModelProto``, a Keras model object, or a path to an ``.onnx``
    file, a ``.keras``/``.h5`` file or a SavedModel directory. ``opset``: the target opset
    of the export (Keras) or of a version conversion (ONNX files; default: keep it).
    """
    if opset is not None and opset < 7:
        raise UnsupportedModelError(f"opset {opset} is too old; use 13 or newer")
    if isinstance(source, onnx.ModelProto):
        model = _convert_version(source, opset) if opset else source
    elif isinstance(source, str | os.PathLike):
        model = _load_path(Path(source), opset, custom_objects)
    elif _looks_like_keras(source):
        model = keras_to_onnx(source, opset=opset or DEFAULT_OPSET)
    else:
        raise ModelLoadError(
            f"cannot convert a {type(source).__name__}: expected a Keras model, an "
            "onnx.ModelProto or a path to a .onnx/.keras/.h5 file or SavedModel directory"
        )
    return prepare(model, batch_axes=batch_axes)


def _load_path(path: Path, opset: int | None,
               custom_objects: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ModelLoadError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return saved_model_to_onnx(path, opset=opset or DEFAULT_OPSET)
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return keras_to_onnx(_load_keras_file(path, custom_objects),
                             opset=opset or DEFAULT_OPSET)
    if suffix == ".onnx":
        model = load_onnx(path)
        return _convert_version(model, opset) if opset else model
    raise ModelLoadError(
        f"{path}: unknown model format {suffix or '(no suffix)'!r}; "
        "expected .onnx, .keras, .h5 or a SavedModel directory"
    )


def load_onnx(path: Path) -> onnx.ModelProto:
    """Read an ONNX file, external data included."""
    try:
        model = onnx.load_model(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph in it)")
    return model


def _convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    if _default_opset(model) == opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError
        raise UnsupportedModelError(
            f"cannot convert the model from opset {_default_opset(model)} to {opset}: {exc}"
        ) from exc


# -- Keras / TensorFlow -------------------------------------------------------------------
def _looks_like_keras(obj: Any) -> bool:
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and callable(obj)


def _import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ModelLoadError(
            "converting a Keras model needs TensorFlow: pip install 'conveyor[keras]'"
        ) from exc
    return tf


def _load_keras_file(path: Path, custom_objects: Mapping[str, Any] | None = None) -> Any:
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(8)
        hint = ("it is an HDF5 file: rename it to .h5" if head == b"\x89HDF\r\n\x1a\n"
                else "save it again with model.save('model.keras'), or convert the "
                "SavedModel directory or .h5 file it came from")
        raise ModelLoadError(f"{path} is not a Keras v3 .keras file (a zip archive); {hint}")
    _import_tf()
    import keras

    try:
        return keras.models.load_model(str(path), compile=False,
                                       custom_objects=dict(custom_objects or {}))
    except Exception as exc:  # Keras raises ValueError, OSError, h5py errors...
        hint = ("" if custom_objects else "; if it uses custom layers, pass "
                "--custom-objects FILE.py (or a module name) defining them")
        raise ModelLoadError(f"{path} is not a loadable Keras model: {exc}{hint}") from exc


def load_custom_objects(spec: str) -> dict[str, Any]:
    """The custom Keras objects a module defines: its ``CUSTOM_OBJECTS`` dict, else every
    public class and function defined in it. ``spec``: a ``.py`` file or a module name."""
    import importlib
    import importlib.util

    try:
        if spec.endswith(".py"):
            file = Path(spec)
            if not file.is_file():
                raise ModelLoadError(f"--custom-objects {spec}: no such file")
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            if loader_spec is None or loader_spec.loader is None:
                raise ModelLoadError(f"--custom-objects {spec}: cannot import it")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except ModelLoadError:
        raise
    except Exception as exc:  # whatever the user's module raises on import
        raise ModelLoadError(f"--custom-objects {spec}: importing it failed: {exc}") from exc
    declared = getattr(module, "CUSTOM_OBJECTS", None)
    if isinstance(declared, Mapping):
        return dict(declared)
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and callable(obj)
            and getattr(obj, "__module__", None) == module.__name__}


def sanitize(name: str) -> str:
    """A tensor name safe for files, queues and headers: ``[A-Za-z0-9_.-]`` only."""
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", name.split(":")[0]).strip("_")
    return clean or "t"


def _unique(names: Iterable[str], fallback: str) -> list[str]:
    out: list[str] = []
    for i, n in enumerate(names):
        name = sanitize(n) if n else f"{fallback}_{i}"
        while name in out:
            name = f"{name}_{i}"
        out.append(name)
    return out


def _keras_input_name(tensor: Any) -> str:
    """The InputLayer's name (``pixels``), not the tensor's (``keras_tensor_12``)."""
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None)
    return str(getattr(layer, "name", "") or tensor.name)


def _keras_output_names(model: Any) -> list[str]:
    """``model.output_names`` where Keras fills it, else the names of the output layers."""
    outputs = list(model.outputs)
    declared = list(getattr(model, "output_names", None) or [])
    if len(declared) == len(outputs) and all(declared):
        return [str(n) for n in declared]
    names = []
    for i, t in enumerate(outputs):
        layer = getattr(getattr(t, "_keras_history", None), "operation", None)
        names.append(str(getattr(layer, "name", "") or f"output_{i}"))
    return names


def keras_to_onnx(model: Any, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A Keras model object -> ModelProto with the model's input and output names."""
    tf = _import_tf()
    import tf2onnx

    inputs = list(model.inputs)
    for t in inputs:
        if len(t.shape) == 0:
            raise UnsupportedModelError(f"Keras input {t.name!r} is a scalar: no batch dimension")
    in_names = _unique((_keras_input_name(t) for t in inputs), "input")
    out_names = _unique(_keras_output_names(model), "output")
    specs = [
        tf.TensorSpec((None, *tuple(t.shape[1:])), t.dtype, name=n)
        for t, n in zip(inputs, in_names, strict=True)
    ]

    def call(*args: Any) -> list[Any]:
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        if isinstance(out, Mapping):
            return [out[k] for k in (out_names if set(out_names) <= set(out) else sorted(out))]
        return list(out) if isinstance(out, list | tuple) else [out]

    fn = tf.function(call, input_signature=specs)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds
        raise UnsupportedModelError(f"tf2onnx cannot convert the Keras model: {exc}") from exc
    return _rename_io(proto, in_names, out_names)


def saved_model_to_onnx(path: Path, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A TensorFlow SavedModel directory (its serving signature) -> ModelProto."""
    tf = _import_tf()
    import tf2onnx

    try:
        loaded = tf.saved_model.load(str(path))
        sig = loaded.signatures["serving_default"]
    except Exception as exc:  # TF raises OSError, KeyError, ValueError...
        raise ModelLoadError(f"{path}: cannot load a serving signature: {exc}") from exc
    in_specs = sig.structured_input_signature[1]
    in_names = sorted(in_specs)
    specs = [
        tf.TensorSpec((None, *tuple(in_specs[n].shape[1:])), in_specs[n].dtype, name=sanitize(n))
        for n in in_names
    ]
    out_names = sorted(sig.structured_outputs)

    def call(*args: Any) -> list[Any]:
        out = sig(**dict(zip(in_names, args, strict=True)))
        return [out[k] for k in out_names]

    fn = tf.function(call, input_signature=specs)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds
        raise UnsupportedModelError(f"tf2onnx cannot convert {path}: {exc}") from exc
    return _rename_io(proto, [s.name for s in specs], _unique(out_names, "output"))


def _rename_io(
    model: onnx.ModelProto, in_names: list[str], out_names: list[str]
) -> onnx.ModelProto:
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
    mapping = dict(zip(graph_inputs, in_names, strict=False))
    mapping.update(zip([o.name for o in model.graph.output], out_names, strict=False))
    return rename_values(model, {k: v for k, v in mapping.items() if k != v})


def rename_values(model: onnx.ModelProto, mapping: Mapping[str, str]) -> onnx.ModelProto:
    """A copy with tensors renamed everywhere (nodes, sub-graphs, I/O, value_info)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if mapping:
        _rename_in_graph(out.graph, mapping)
    return out


def _rename_in_graph(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    for vi in (*graph.input, *graph.output, *graph.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _rename_in_graph(sub, mapping)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


# -- the pure preparation step -------------------------------------------------------------
def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare(model: onnx.ModelProto, *,
            batch_axes: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """Checked, runtime-loadable copy: opset checked, IR lowered, nodes named, every input
    and output batch-first with a symbolic batch (``converter.batch_axes``)."""
    max_opset, max_ir = runtime_limits()
    opset = _default_opset(model)
    if opset == 0:
        raise UnsupportedModelError("the model imports no default-domain opset")
    if opset > max_opset:
        raise UnsupportedModelError(
            f"the model uses opset {opset}; the installed onnxruntime loads at most opset "
            f"{max_opset} (re-export with --opset {max_opset} or lower)"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.ir_version > max_ir or out.ir_version == 0:
        out.ir_version = max_ir
    _name_nodes(out.graph)
    batch_first(out, batch_axes or {})
    return out


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)
