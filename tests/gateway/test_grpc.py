"""The KServe v2 gRPC service beside REST, driven with ``tritonclient.grpc``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from conveyor.app.gateway import GatewaySettings, RunningGateway

from .conftest import CLASSES, WIDTH, GatewayThread, Served

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def grpc_gateway(mlp: Served) -> Iterator[RunningGateway]:
    with GatewayThread(mlp.plan, GatewaySettings(port=0, grpc_port=0)) as running:
        assert running.grpc_address is not None
        yield running


def tensors(feed: dict[str, np.ndarray], datatype: str = "FP32") -> list[object]:
    made = []
    for name, value in feed.items():
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        made.append(t)
    return made


def test_grpc_health_metadata_and_infer_match_the_whole_model(
    grpc_gateway: RunningGateway, mlp: Served
) -> None:
    c = grpcclient.InferenceServerClient(grpc_gateway.grpc_address)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mlp")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("mlp", as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["x", "bias"]
    rng = np.random.default_rng(5)
    feed = {"x": rng.normal(size=(3, WIDTH)).astype(np.float32),
            "bias": rng.normal(size=(3, CLASSES)).astype(np.float32)}
    result = c.infer("mlp", tensors(feed), request_id="g1",
                     outputs=[grpcclient.InferRequestedOutput("probs")])
    assert result.get_response().id == "g1"
    assert result.as_numpy("logits") is None
    want = mlp.expected(feed)["probs"]
    np.testing.assert_allclose(result.as_numpy("probs"), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("feed", "datatype", "code", "text"), [
    ({"x": np.ones((1, WIDTH), np.float64), "bias": np.zeros((1, CLASSES))}, "FP64",
     "StatusCode.INVALID_ARGUMENT", "the model expects FP32"),
    ({"x": np.ones((1, WIDTH + 1), np.float32), "bias": np.zeros((1, CLASSES), np.float32)},
     "FP32", "StatusCode.INVALID_ARGUMENT", "dimension 1 is 9"),
])
def test_grpc_errors_map_like_rest(
    grpc_gateway: RunningGateway, feed: dict[str, np.ndarray], datatype: str, code: str,
    text: str,
) -> None:
    c = grpcclient.InferenceServerClient(grpc_gateway.grpc_address)
    with pytest.raises(InferenceServerException) as info:
        c.infer("mlp", tensors(feed, datatype))
    assert info.value.status() == code and text in info.value.message()


def test_grpc_deadline_and_unknown_model(grpc_gateway: RunningGateway) -> None:
    c = grpcclient.InferenceServerClient(grpc_gateway.grpc_address)
    feed = {"x": np.ones((1, WIDTH), np.float32), "bias": np.zeros((1, CLASSES), np.float32)}
    with pytest.raises(InferenceServerException) as info:
        c.infer("mlp", tensors(feed), timeout=1)  # Triton's parameter: microseconds
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as info:
        c.infer("resnet", tensors(feed))
    assert info.value.status() == "StatusCode.NOT_FOUND"
