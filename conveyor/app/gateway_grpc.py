"""The gateway's gRPC side: the KServe v2 / Triton ``inference.GRPCInferenceService``.

Started by ``serve_gateway`` when ``GatewaySettings.grpc_port`` is set, beside the REST
server and over the same ``Gateway`` (one shared client, so one set of request packs). The
message classes are the protocol's generated code as ``tritonclient[grpc]`` ships it
(imported here only: the gRPC side needs that extra, the REST side does not). Implemented:
ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (raw tensor
contents and typed ``contents`` both); the rest answer UNIMPLEMENTED. Errors map as the REST
ones do (docs/gateway.md): INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED,
INTERNAL. The call's gRPC deadline, when the client sets one, becomes the request's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from conveyor import __version__
from conveyor.app.oip import DATATYPES, NUMPY_TO_DATATYPE, datatype_of
from conveyor.errors import CodecError, ConfigError, ConveyorError

if TYPE_CHECKING:
    from conveyor.app.gateway import Gateway
    from conveyor.client import Outputs

#: InferTensorContents field per numpy dtype (typed, non-raw inputs).
_CONTENTS = {"bool": "bool_contents", "int8": "int_contents", "int16": "int_contents",
             "int32": "int_contents", "int64": "int64_contents", "uint8": "uint_contents",
             "uint16": "uint_contents", "uint32": "uint_contents", "uint64": "uint64_contents",
             "float32": "fp32_contents", "float64": "fp64_contents"}


def _modules() -> tuple[Any, Any, Any]:
    try:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError as exc:
        raise ConfigError("the gRPC gateway needs grpcio and tritonclient[grpc]: "
                          "pip install 'tritonclient[grpc]'") from exc
    return grpc, service_pb2, service_pb2_grpc


async def start_grpc(gateway: Gateway, host: str, port: int) -> tuple[Any, int]:
    """A started ``grpc.aio`` server for ``gateway`` and the port it got."""
    grpc, pb, pb_grpc = _modules()
    limit = gateway.settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        _servicer(gateway, grpc, pb, pb_grpc.GRPCInferenceServiceServicer), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise ConfigError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, bound


def _servicer(gateway: Gateway, grpc: Any, pb: Any, base: Any) -> Any:
    from conveyor.app.gateway import MODEL_VERSION, GatewayState

    plan = gateway.plan

    def serving() -> bool:
        return gateway.state is GatewayState.SERVING

    def ours(name: str, version: str) -> bool:
        return name == plan.name and version in ("", MODEL_VERSION)

    class Servicer(base):  # type: ignore[misc]  # the base answers UNIMPLEMENTED
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=serving())

        async def ModelReady(self, request: Any, context: Any) -> Any:
            return pb.ModelReadyResponse(ready=serving() and ours(request.name,
                                                                  request.version))

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            return pb.ServerMetadataResponse(name="conveyor", version=__version__,
                                             extensions=[])

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            if not ours(request.name, request.version):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model "
                                    f"{request.name!r}; this gateway serves {plan.name!r}")
            return pb.ModelMetadataResponse(
                name=plan.name, versions=[MODEL_VERSION], platform="conveyor",
                inputs=[_tensor_meta(pb, t) for t in plan.inputs],
                outputs=[_tensor_meta(pb, t) for t in plan.outputs])

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            if not ours(request.model_name, request.model_version):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model "
                                    f"{request.model_name!r}; this gateway serves "
                                    f"{plan.name!r}")
            if not serving():
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"the gateway is {gateway.state.value}")
            outputs = await _infer(gateway, grpc, request, context)
            wanted = [o.name for o in request.outputs] or [t.name for t in plan.outputs]
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"unknown output(s) {unknown}")
            return _infer_response(pb, request, outputs, wanted, plan.name)

    return Servicer()


#: gRPC status code (name) per HTTP status of a ``ConveyorError``; any other is INTERNAL.
_STATUS_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "FAILED_PRECONDITION",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _tensor_meta(pb: Any, spec: Any) -> Any:
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=datatype_of(spec), shape=shape)


async def _infer(gateway: Gateway, grpc: Any, request: Any, context: Any) -> Outputs:
    """The outputs of a ModelInferRequest through the gateway's client, under the call's
    deadline where it is shorter; a ``ConveyorError`` aborts the call with its status."""
    try:
        inputs = grpc_inputs(request, {t.name: t.dtype for t in gateway.plan.inputs})
        timeout, key = _parameters(request.parameters)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout or remaining, remaining)
        return await gateway.client.infer(
            inputs, timeout=timeout or gateway.settings.timeout, key=key)
    except ConveyorError as exc:
        from conveyor.app.gateway import status_of

        http = status_of(exc, gateway.settings.retry_after_s)
        code = grpc.StatusCode[_STATUS_CODES.get(http.status, "INTERNAL")]
        await context.abort(code, str(http))
        raise  # not reached: abort raises


def _infer_response(pb: Any, request: Any, outputs: Outputs, wanted: list[str],
                    model: str) -> Any:
    """The ModelInferResponse carrying the ``wanted`` outputs as little-endian raw contents."""
    from conveyor.app.gateway import MODEL_VERSION

    response = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION,
                                     id=request.id)
    for name in wanted:
        array = np.asarray(outputs[name])
        response.outputs.add(name=name, datatype=NUMPY_TO_DATATYPE[array.dtype.name],
                             shape=list(array.shape))
        response.raw_output_contents.append(
            np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return response


def grpc_inputs(request: Any, expected: dict[str, str]) -> dict[str, np.ndarray]:
    """The arrays of a ModelInferRequest (raw contents in input order, or typed contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise CodecError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name not in expected:
            raise CodecError(f"unknown input {t.name!r}; the model takes {sorted(expected)}")
        if t.datatype not in DATATYPES:
            raise CodecError(f"input {t.name!r}: datatype {t.datatype!r} is not supported")
        if DATATYPES[t.datatype] != expected[t.name]:
            raise CodecError(f"input {t.name!r}: datatype {t.datatype}, the model expects "
                             f"{NUMPY_TO_DATATYPE[expected[t.name]]}")
        dtype = np.dtype(DATATYPES[t.datatype])
        shape = [int(d) for d in t.shape]
        if any(d < 0 for d in shape):
            raise CodecError(f"input {t.name!r}: negative dimension in {shape}")
        if raw:
            if len(raw[i]) != math.prod(shape) * dtype.itemsize:
                raise CodecError(f"input {t.name!r}: {len(raw[i])} bytes of raw contents, "
                                 f"shape {shape} of {t.datatype} needs "
                                 f"{math.prod(shape) * dtype.itemsize}")
            arrays[t.name] = np.frombuffer(raw[i], dtype.newbyteorder("<")).reshape(shape)
            continue
        field = _CONTENTS.get(dtype.name)
        if field is None:
            raise CodecError(f"input {t.name!r}: {t.datatype} needs raw_input_contents")
        values = np.asarray(getattr(t.contents, field), dtype=dtype)
        if values.size != math.prod(shape):
            raise CodecError(f"input {t.name!r}: {values.size} values, shape {shape} needs "
                             f"{math.prod(shape)}")
        arrays[t.name] = values.reshape(shape)
    return arrays


def _parameters(params: Any) -> tuple[float | None, str | None]:
    """(timeout seconds, partition key) from the request's parameters map."""
    timeout = key = None
    if "timeout" in params:
        micros = params["timeout"].int64_param
        if micros <= 0:
            raise CodecError(f"parameter 'timeout' must be positive microseconds, got {micros}")
        timeout = micros * 1e-6
    if "partition_key" in params:
        key = params["partition_key"].string_param or None
    return timeout, key
