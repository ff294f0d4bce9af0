"""The Open Inference Protocol (KServe v2) REST codec: request bodies in, response bodies out.

Pure functions, no server: ``parse_infer_request`` turns the body of
``POST /v2/models/{name}/infer`` into numpy arrays (JSON tensors, or the binary tensor data
extension: the first ``Inference-Header-Content-Length`` bytes are the JSON header, the
raw tensors follow in input order, each sized by its ``binary_data_size`` parameter), and
``build_infer_response`` does the reverse for the outputs (``binary_data_output`` on the
request, or ``binary_data`` on one requested output, asks for raw bytes).

Every malformed request raises ``CodecError`` naming what is wrong (the gateway answers 400
with that text). Shapes and dtypes are checked against the plan again by the client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor.errors import CodecError
from conveyor.plan import Plan, TensorSpec

#: OIP datatype -> numpy dtype name (conveyor.plan.ALLOWED_DTYPES). BYTES has no numpy
#: equivalent on Conveyor's wire and is refused.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
#: The header naming the JSON part's length (binary tensor data extension).
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Triton's request parameters are microseconds (``tritonclient``'s ``timeout=``).
TIMEOUT_UNIT_S = 1e-6


def datatype_of(spec: TensorSpec) -> str:
    return NUMPY_TO_DATATYPE[spec.dtype]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor as ``GET /v2/models/{name}`` lists it (symbolic dimensions are -1)."""
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]
    return {"name": spec.name, "datatype": datatype_of(spec), "shape": shape}


def model_metadata(plan: Plan, version: str) -> dict[str, Any]:
    return {
        "name": plan.name,
        "versions": [version],
        "platform": "conveyor",
        "inputs": [tensor_metadata(t) for t in plan.inputs],
        "outputs": [tensor_metadata(t) for t in plan.outputs],
    }


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """One parsed infer request: its id, input arrays and what it asks for."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: None: every output of the model, binary when ``binary_default``.
    outputs: tuple[RequestedOutput, ...] | None = None
    binary_default: bool = False

    @property
    def timeout_s(self) -> float | None:
        """The request's ``timeout`` parameter (microseconds, Triton's unit) in seconds."""
        value = self.parameters.get("timeout")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise CodecError(f"parameter 'timeout' must be a positive number of microseconds, "
                             f"got {value!r}")
        return float(value) * TIMEOUT_UNIT_S

    @property
    def partition_key(self) -> str | None:
        """The partition key (``partition_key`` parameter) for hash / range plans."""
        value = self.parameters.get("partition_key")
        if value is None:
            return None
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise CodecError(f"parameter 'partition_key' must be a string, got {value!r}")
        return str(value)


def parse_infer_request(
    body: bytes, header_length: str | None, plan: Plan
) -> InferRequest:
    """Parse an infer request body (``header_length``: the header's value, or None)."""
    json_part, binary = _split_body(body, header_length)
    doc = _load_json(json_part)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CodecError(f"'id' must be a string, got {request_id!r}")
    parameters = _parameters(doc.get("parameters"), "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise CodecError("'inputs' must be a non-empty list of tensors")
    specs = {t.name: t for t in plan.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _input_tensor(raw, specs, binary, offset)
        if name in inputs:
            raise CodecError(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise CodecError(f"the body carries {len(binary) - offset} byte(s) of binary data "
                         "that no input's binary_data_size accounts for")
    outputs = _requested_outputs(doc.get("outputs"), plan, parameters)
    binary_default = bool(parameters.get("binary_data_output", False))
    return InferRequest(request_id, inputs, parameters, outputs, binary_default)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body):]
    try:
        n = int(header_length)
    except ValueError:
        raise CodecError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise CodecError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    return bytes(view[:n]), view[n:]


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"the request header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CodecError("the request header must be a JSON object")
    return doc


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CodecError(f"{where} 'parameters' must be an object, got {value!r}")
    return value


def _input_tensor(
    raw: object, specs: Mapping[str, TensorSpec], binary: memoryview, offset: int
) -> tuple[str, np.ndarray, int]:
    """(name, array, binary bytes used) of one entry of ``inputs``."""
    if not isinstance(raw, dict):
        raise CodecError(f"every input must be an object, got {raw!r:.80}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise CodecError(f"an input has no string 'name': {sorted(raw)}")
    spec = specs.get(name)
    if spec is None:
        raise CodecError(f"unknown input {name!r}; the model takes {sorted(specs)}")
    shape = _shape(raw.get("shape"), name)
    dtype = _dtype(raw.get("datatype"), name, spec)
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise CodecError(f"input {name!r} has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CodecError(f"input {name!r}: binary_data_size must be a byte count")
        if size != count * dtype.itemsize:
            raise CodecError(f"input {name!r}: binary_data_size is {size} bytes, shape "
                             f"{shape} of {raw['datatype']} needs {count * dtype.itemsize}")
        if offset + size > len(binary):
            raise CodecError(f"input {name!r}: the body ends before its {size} bytes of "
                             "binary data")
        chunk = binary[offset : offset + size]
        return name, np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape), size
    if "data" not in raw:
        raise CodecError(f"input {name!r} has neither 'data' nor binary_data_size")
    return name, _json_array(raw["data"], name, dtype, shape), 0


def _shape(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise CodecError(f"input {name!r}: 'shape' must be a list of non-negative integers, "
                         f"got {value!r:.80}")
    return value


def _dtype(value: object, name: str, spec: TensorSpec) -> np.dtype[Any]:
    if value not in DATATYPES:
        raise CodecError(f"input {name!r}: datatype {value!r} is not supported; use one of "
                         f"{sorted(DATATYPES)}")
    assert isinstance(value, str)
    if DATATYPES[value] != spec.dtype:
        raise CodecError(f"input {name!r}: datatype {value}, the model expects "
                         f"{datatype_of(spec)}")
    return np.dtype(DATATYPES[value])


def _json_array(data: object, name: str, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise CodecError(f"input {name!r}: 'data' must be a list")
    try:
        flat = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(f"input {name!r}: 'data' is not a list of "
                         f"{NUMPY_TO_DATATYPE[dtype.name]} values: {exc}") from exc
    if flat.size != math.prod(shape):
        raise CodecError(f"input {name!r}: 'data' has {flat.size} values, shape {shape} "
                         f"needs {math.prod(shape)}")
    return flat.reshape(shape)


def _requested_outputs(
    value: object, plan: Plan, parameters: Mapping[str, Any]
) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise CodecError("'outputs' must be a list")
    known = {t.name for t in plan.outputs}
    default = bool(parameters.get("binary_data_output", False))
    chosen = []
    for raw in value:
        name = raw.get("name") if isinstance(raw, dict) else None
        if name not in known:
            raise CodecError(f"unknown output {name!r}; the model gives {sorted(known)}")
        params = _parameters(raw.get("parameters"), f"output {name!r}")
        if params.get("classification"):
            raise CodecError(f"output {name!r}: the classification extension is not supported")
        chosen.append(RequestedOutput(name, bool(params.get("binary_data", default))))
    return tuple(chosen)


def build_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    order: Sequence[str],
) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary tensors, its JSON header's length."""
    wanted = request.outputs or tuple(RequestedOutput(n, request.binary_default) for n in order)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in wanted:
        array = np.asarray(outputs[out.name])
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": NUMPY_TO_DATATYPE[array.dtype.name],
            "shape": list(array.shape),
        }
        if out.binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
