"""The gateway as Triton users reach it: ``tritonclient.http``, JSON and binary tensors.

Every answer is compared with onnxruntime running the whole (unsplit) model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conveyor.app.gateway import RunningGateway

from .conftest import CLASSES, WIDTH, Served

httpclient = pytest.importorskip("tritonclient.http")
TOL = 1e-5


def client_for(running: RunningGateway) -> Any:
    return httpclient.InferenceServerClient(running.url.removeprefix("http://"))


def inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, WIDTH)).astype(np.float32),
            "bias": rng.normal(size=(rows, CLASSES)).astype(np.float32)}


def triton_inputs(feed: dict[str, np.ndarray], binary: bool) -> list[Any]:
    made = []
    for name, value in feed.items():
        t = httpclient.InferInput(name, list(value.shape), "FP32")
        t.set_data_from_numpy(value, binary_data=binary)
        made.append(t)
    return made


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(np.max(np.abs(want))), 1.0)
    assert float(np.max(np.abs(got - want))) / scale <= TOL


def test_health_and_metadata(mlp_gateway: RunningGateway, mlp: Served) -> None:
    c = client_for(mlp_gateway)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("mlp")
    assert not c.is_model_ready("nope")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata("mlp")
    assert meta["name"] == "mlp"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("x", "FP32", [-1, WIDTH]), ("bias", "FP32", [-1, CLASSES])]
    assert {t["name"] for t in meta["outputs"]} == {"logits", "probs"}


@pytest.mark.parametrize(("binary_in", "binary_out"),
                         [(False, False), (True, True), (True, False), (False, True)])
def test_infer_matches_the_whole_model(
    mlp_gateway: RunningGateway, mlp: Served, binary_in: bool, binary_out: bool
) -> None:
    c = client_for(mlp_gateway)
    feed = inputs(3, seed=int(binary_in) * 2 + int(binary_out))
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out)
               for n in ("probs", "logits")]
    result = c.infer("mlp", triton_inputs(feed, binary_in), outputs=outputs,
                     request_id=f"req-{binary_in}-{binary_out}")
    want = mlp.expected(feed)
    response = result.get_response()
    assert response["id"] == f"req-{binary_in}-{binary_out}"
    assert [o["name"] for o in response["outputs"]] == ["probs", "logits"]
    for name in ("logits", "probs"):
        assert_close(result.as_numpy(name), want[name])


def test_no_requested_outputs_returns_all_in_binary(
    mlp_gateway: RunningGateway, mlp: Served
) -> None:
    feed = inputs(2, seed=11)
    result = client_for(mlp_gateway).infer("mlp", triton_inputs(feed, True))
    outs = result.get_response()["outputs"]
    assert {o["name"] for o in outs} == {"logits", "probs"}
    assert all("binary_data_size" in o["parameters"] for o in outs)
    want = mlp.expected(feed)
    for name in want:
        assert_close(result.as_numpy(name), want[name])


def test_one_requested_output_only(mlp_gateway: RunningGateway, mlp: Served) -> None:
    feed = inputs(1, seed=12)
    result = client_for(mlp_gateway).infer(
        "mlp", triton_inputs(feed, False), outputs=[httpclient.InferRequestedOutput("probs")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probs"]
    assert result.as_numpy("logits") is None
    assert_close(result.as_numpy("probs"), mlp.expected(feed)["probs"])


def test_many_concurrent_requests_all_match(mlp_gateway: RunningGateway, mlp: Served) -> None:
    """64 requests in flight from 16 client connections: every answer is right."""
    import concurrent.futures

    c = httpclient.InferenceServerClient(mlp_gateway.url.removeprefix("http://"),
                                         concurrency=16)
    feeds = [inputs(1, seed=100 + i) for i in range(64)]
    pending = [c.async_infer("mlp", triton_inputs(f, True)) for f in feeds]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results = list(pool.map(lambda p: p.get_result(), pending))
    for feed, result in zip(feeds, results, strict=True):
        want = mlp.expected(feed)
        for name in want:
            assert_close(result.as_numpy(name), want[name])


def test_requests_arriving_together_leave_as_request_packs(
    mlp_gateway: RunningGateway, mlp: Served
) -> None:
    """A burst of HTTP requests on open connections: the shared client sends fewer
    messages than requests (request packs), and every answer is still right."""
    import asyncio

    import aiohttp

    url = f"{mlp_gateway.url}/v2/models/mlp/infer"
    feeds = [inputs(1, seed=200 + i) for i in range(32)]
    bodies = [{"inputs": [{"name": n, "shape": list(v.shape), "datatype": "FP32",
                           "data": v.ravel().tolist()} for n, v in f.items()]} for f in feeds]

    async def burst(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(url, json=body) as r:
                assert r.status == 200
                answer: dict[str, Any] = await r.json()
                return answer
        return await asyncio.gather(*(one(b) for b in bodies))

    async def main() -> int:
        connector = aiohttp.TCPConnector(limit=len(bodies))
        async with aiohttp.ClientSession(connector=connector) as session:
            await burst(session)  # opens the connections
            for _ in range(5):  # a burst is enough in practice; the loop only bounds it
                before = mlp_gateway.gateway.client.stats()
                answers = await burst(session)
                for feed, answer in zip(feeds, answers, strict=True):
                    got = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"])
                           for o in answer["outputs"]}
                    for name, want in mlp.expected(feed).items():
                        assert_close(got[name], want)
                after = mlp_gateway.gateway.client.stats()
                assert after.sent - before.sent == len(bodies)
                if after.messages_sent - before.messages_sent < len(bodies):
                    return after.messages_sent - before.messages_sent
        return len(bodies)

    assert asyncio.run(main()) < len(bodies)
