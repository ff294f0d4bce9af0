"""``--constant NAME=VALUE``: a tensor fixed at plan time by the user.

A model wrapped in a top-level If decided by the data (its condition computed from the
request) cannot be split inside. When the deployment always takes one branch (a flag
input that is always set, a mode chosen per deployment), the user says so: the tensor
(a model input, or any tensor of the top-level graph, such as the If's condition) becomes
an initializer with that value, the nodes only it needed are dropped, and an If it decides
is replaced by its branch (``converter.fold.inline_decided_ifs``). The plan then always
computes what the model computes with that value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.fold import inline_decided_ifs
from conveyor.errors import ConfigError

log = logging.getLogger(__name__)

_WORDS = {"true": 1, "false": 0}


def parse_constants(specs: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings (VALUE a number, true/false, or numbers separated by commas)
    -> {name: list of numbers} (ConfigError on a malformed one)."""
    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            if not sep or not name.strip() or not text.strip():
                raise ValueError
            values = [_WORDS.get(v.strip().lower()) if v.strip().lower() in _WORDS
                      else float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"--constant {spec!r} is not NAME=VALUE (VALUE a number, "
                              "true/false or numbers separated by commas, e.g. cond=1)") from None
        out[name.strip()] = values
    return out


def fix_constants(model: onnx.ModelProto, constants: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy of ``model`` with every named tensor an initializer holding its value, and
    the top-level Ifs those decide inlined."""
    if not constants:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _known_types(out)
    inputs = {vi.name for vi in g.input}
    made = {o for n in g.node for o in n.output if o}
    for name, value in constants.items():
        if name not in inputs and name not in made:
            raise ConfigError(f"--constant {name}: the model's top-level graph has no tensor "
                              f"{name!r} (its inputs are {sorted(inputs)})")
        array = _array(name, value, types.get(name))
        if name in inputs:
            kept = [vi for vi in g.input if vi.name != name]
            del g.input[:]
            g.input.extend(kept)
        for node in g.node:  # the producer's output goes nowhere now
            node.output[:] = [f"{o}__replaced_by_constant" if o == name else o
                              for o in node.output]
        g.initializer.append(numpy_helper.from_array(array, name))
        log.warning("tensor %r is fixed to %s at plan time (--constant): the plan always "
                    "computes the model with that value", name, array.tolist())
    return inline_decided_ifs(out)


def _known_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Element type and (fixed) shape of every top-level tensor shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # InferenceError, ValidationError: the declarations alone
        inferred = model
    g = inferred.graph
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for vi in (*g.value_info, *g.input, *g.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shape = tuple(int(d) for d in dims if d is not None) \
            if tt.HasField("shape") and None not in dims else None
        out[vi.name] = (tt.elem_type, shape)
    return out


def _array(name: str, value: Any, known: tuple[int, tuple[int, ...] | None] | None
           ) -> np.ndarray:
    if known is None or not known[0]:
        raise ConfigError(f"--constant {name}: the element type of {name!r} is unknown")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(known[0]))
    array = np.asarray(value)
    shape = known[1]
    if shape is not None:
        if array.size != int(np.prod(shape)):
            raise ConfigError(f"--constant {name}: {array.size} value(s) given, the tensor "
                              f"has shape {list(shape)}")
        array = array.reshape(shape)
    elif array.size == 1:
        array = array.reshape(())
    return array.astype(dtype)
