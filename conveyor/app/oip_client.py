"""A small async Open Inference Protocol client (binary tensors) for ``conveyor bench``.

    async with OipClient("http://127.0.0.1:8000", plan, connections=16) as http:
        outputs = await http.infer({"x": x})

It speaks to ``conveyor gateway`` or any KServe v2 / Triton server serving a model named as
the plan. HTTP failures come back as Conveyor's errors, the gateway's map read backwards
(400 ``CodecError``, 503 ``BackpressureError``, 504 ``DeadlineExceeded``, 500
``InferenceError``, anything else ``TransportError``), so a bench counts them the same way
whichever front door it measures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np

from conveyor.app.oip import DATATYPES, HEADER_LENGTH, NUMPY_TO_DATATYPE
from conveyor.errors import (
    BackpressureError,
    CodecError,
    ConveyorError,
    DeadlineExceeded,
    InferenceError,
    TransportError,
)
from conveyor.plan import Plan

_BY_STATUS: dict[int, type[ConveyorError]] = {
    400: CodecError, 504: DeadlineExceeded, 500: InferenceError,
}


class OipClient:
    def __init__(self, url: str, plan: Plan, *, connections: int = 64,
                 timeout: float = 30.0) -> None:
        self.infer_url = f"{url.rstrip('/')}/v2/models/{plan.name}/infer"
        self._connections = connections
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OipClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=self._timeout + 5.0),
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request, binary tensors both ways; the outputs by name."""
        assert self._session is not None, "use OipClient inside 'async with'"
        body, header_length = encode_request(inputs, self._timeout)
        try:
            async with self._session.post(
                self.infer_url, data=body,
                headers={HEADER_LENGTH: str(header_length),
                         "Content-Type": "application/octet-stream"},
            ) as response:
                payload = await response.read()
                if response.status != 200:
                    raise _error(response.status, payload)
                return decode_response(payload, response.headers.get(HEADER_LENGTH))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"POST {self.infer_url} failed: {exc!r}") from exc


def encode_request(inputs: Mapping[str, np.ndarray], timeout_s: float) -> tuple[bytes, int]:
    raws = [np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes()
            for v in inputs.values()]
    header = json.dumps({
        "inputs": [{"name": n, "shape": list(v.shape), "datatype": NUMPY_TO_DATATYPE[v.dtype.name],
                    "parameters": {"binary_data_size": len(raw)}}
                   for (n, v), raw in zip(inputs.items(), raws, strict=True)],
        "parameters": {"binary_data_output": True, "timeout": int(timeout_s * 1e6)},
    }).encode()
    return b"".join([header, *raws]), len(header)


def decode_response(payload: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    n = int(header_length) if header_length is not None else len(payload)
    doc: dict[str, Any] = json.loads(payload[:n])
    out: dict[str, np.ndarray] = {}
    offset = n
    for o in doc["outputs"]:
        dtype = np.dtype(DATATYPES[o["datatype"]]).newbyteorder("<")
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
            continue
        out[o["name"]] = np.frombuffer(payload, dtype, count=size // dtype.itemsize,
                                       offset=offset).reshape(o["shape"])
        offset += size
    return out


def _error(status: int, payload: bytes) -> ConveyorError:
    try:
        message = str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        message = payload[:200].decode(errors="replace")
    text = f"HTTP {status}: {message}"
    if status in (429, 503):
        return BackpressureError(text)
    return _BY_STATUS.get(status, TransportError)(text)
