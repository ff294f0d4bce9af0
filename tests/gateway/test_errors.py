"""Each failure reaches an OIP client as its documented HTTP status (docs/gateway.md)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from conveyor.app.gateway import GatewaySettings, RunningGateway
from conveyor.plan import Plan

from .conftest import CLASSES, WIDTH, GatewayThread, Served

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, headers, decoded JSON body) of a raw POST."""
    req = urllib.request.Request(url, body, headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def json_request(feed: dict[str, np.ndarray], **params: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": [
        {"name": n, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
        for n, v in feed.items()]}
    if params:
        doc["parameters"] = params
    return json.dumps(doc).encode()


def feed(rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, WIDTH), np.float32), "bias": np.zeros((rows, CLASSES),
                                                                      np.float32)}


def triton_error(running: RunningGateway, model: str, inputs: list[Any], **kw: Any) -> Any:
    c = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as info:
        c.infer(model, inputs, **kw)
    return info.value


def tensor(name: str, value: np.ndarray, datatype: str) -> Any:
    t = httpclient.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value, binary_data=True)
    return t


@pytest.mark.parametrize(("x", "datatype", "text"), [
    (np.ones((1, WIDTH), np.float64), "FP64", "datatype FP64, the model expects FP32"),
    (np.ones((1, WIDTH + 1), np.float32), "FP32", "dimension 1 is 9, the plan expects 8"),
])
def test_a_bad_tensor_is_400_with_the_codec_message(
    mlp_gateway: RunningGateway, x: np.ndarray, datatype: str, text: str
) -> None:
    bias = tensor("bias", np.zeros((1, CLASSES), np.float32), "FP32")
    err = triton_error(mlp_gateway, "mlp", [tensor("x", x, datatype), bias])
    assert err.status() == "400"
    assert text in err.message()


@pytest.mark.parametrize(("body", "text"), [
    (b"{not json", "not valid JSON"),
    (b'{"inputs": []}', "non-empty list"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32",
                             "data": [1, 2]}]}).encode(), "has 2 values"),
    (json.dumps({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32",
                             "data": [1]}]}).encode(), "unknown input 'z'"),
])
def test_malformed_requests_are_400(mlp_gateway: RunningGateway, body: bytes, text: str) -> None:
    status, _, answer = post(f"{mlp_gateway.url}/v2/models/mlp/infer", body)
    assert status == 400
    assert text in answer["error"]


def test_binary_sizes_that_disagree_are_400(mlp_gateway: RunningGateway) -> None:
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [1, WIDTH], "datatype": "FP32",
         "parameters": {"binary_data_size": 4 * WIDTH}},
        {"name": "bias", "shape": [1, CLASSES], "datatype": "FP32",
         "parameters": {"binary_data_size": 4 * CLASSES}}]}).encode()
    short = header + b"\0" * (4 * WIDTH)  # bias's bytes are missing
    status, _, answer = post(f"{mlp_gateway.url}/v2/models/mlp/infer", short,
                             {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "ends before" in answer["error"]


def test_an_unknown_model_is_404(mlp_gateway: RunningGateway) -> None:
    x = tensor("x", np.ones((1, WIDTH), np.float32), "FP32")
    err = triton_error(mlp_gateway, "resnet", [x])
    assert err.status() == "404" and "serves 'mlp'" in err.message()


def test_a_passed_deadline_is_504(mlp_gateway: RunningGateway) -> None:
    """``timeout`` is Triton's parameter, in microseconds: 1 us passes before any answer."""
    inputs = [tensor(n, v, "FP32") for n, v in feed().items()]
    err = triton_error(mlp_gateway, "mlp", inputs, timeout=1)
    assert err.status() == "504" and "no reply within" in err.message()


def test_a_failing_stage_is_500_with_the_worker_message(broken_plan: Plan) -> None:
    with GatewayThread(broken_plan, GatewaySettings(port=0)) as running:
        x = tensor("x", np.ones((1, 3), np.float32), "FP32")
        err = triton_error(running, "broken", [x])
    assert err.status() == "500"
    assert "reshape" in err.message().lower()  # onnxruntime's text, from the worker


@pytest.fixture(scope="module")
def hashed_gateway(hashed_mlp: Served) -> Iterator[tuple[GatewayThread, RunningGateway]]:
    thread = GatewayThread(hashed_mlp.plan, GatewaySettings(port=0, retry_after_s=7))
    with thread as running:
        yield thread, running


def test_partition_key_parameter_reaches_the_plan(
    hashed_gateway: tuple[GatewayThread, RunningGateway], hashed_mlp: Served
) -> None:
    _, running = hashed_gateway
    url = f"{running.url}/v2/models/mlph/infer"
    status, _, answer = post(url, json_request(feed()))
    assert status == 400 and "needs a request key" in answer["error"]
    status, _, answer = post(url, json_request(feed(), partition_key="user-1"))
    assert status == 200
    want = hashed_mlp.expected(feed())["probs"]
    got = next(o for o in answer["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.array(got["data"]).reshape(got["shape"]), want, atol=1e-6)


def test_a_full_queue_is_503_with_retry_after(
    hashed_gateway: tuple[GatewayThread, RunningGateway],
) -> None:
    """A bounded queue on the request's route that is full (reject-publish)."""
    from conveyor.topology import partition_routing_key
    from conveyor.transport import QueueSpec

    thread, running = hashed_gateway
    client: Any = running.gateway.client
    plan = client.plan

    async def bound_full_queue() -> None:
        admin = client.broker.connect()
        await admin.declare_queue(QueueSpec("gw-full", max_length=1,
                                            overflow="reject-publish"))
        await admin.bind_queue("gw-full", client.topology.input_exchange,
                               partition_routing_key(plan.partitioning, "k"))

    thread.call(bound_full_queue())
    url = f"{running.url}/v2/models/mlph/infer"
    assert post(url, json_request(feed(), partition_key="k"))[0] == 200  # fills gw-full
    status, headers, answer = post(url, json_request(feed(), partition_key="k"))
    assert status == 503
    assert headers["Retry-After"] == "7"
    assert answer["error"]


def raw_exchange(running: RunningGateway, head: bytes, body: bytes) -> bytes:
    parts = urlsplit(running.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_body_over_the_limit_is_413_before_it_is_read(mlp_gateway: RunningGateway) -> None:
    """A Content-Length of 1 GB with 100 bytes sent: answered at once, not awaited."""
    head = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
    answer = raw_exchange(mlp_gateway, head, b"{" * 100)
    assert answer.startswith(b"HTTP/1.1 413")


def test_a_chunked_body_over_the_limit_is_413(mlp_gateway: RunningGateway) -> None:
    limit = mlp_gateway.gateway.settings.max_body_bytes
    head = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    size = limit + 1024
    answer = raw_exchange(mlp_gateway, head, f"{size:x}\r\n".encode() + b" " * size + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413")


def test_metrics_count_answers_by_status(mlp_gateway: RunningGateway) -> None:
    post(f"{mlp_gateway.url}/v2/models/mlp/infer", json_request(feed()))
    post(f"{mlp_gateway.url}/v2/models/mlp/infer", b"{bad")
    with urllib.request.urlopen(f"{mlp_gateway.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("conveyor_gateway_requests_total")}
    assert counts['code="200"'] >= 1 and counts['code="400"'] >= 1
    assert "conveyor_gateway_ready 1.0" in text
