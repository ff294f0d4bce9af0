"""The gateway as a client of the RabbitMQ pipeline: worker processes serve, it answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from conveyor.app.gateway import GatewaySettings
from tests.support.plans import isolated_copy

from .conftest import CLASSES, WIDTH, GatewayThread, Served

httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.rabbitmq


def test_gateway_on_rabbitmq_answers_like_the_whole_model(
    mlp: Served, rabbitmq_url: str, tmp_path: Path
) -> None:
    from conveyor.app.demo_serving import start_workers, stop_workers

    plan = isolated_copy(mlp.plan, tmp_path / "plan")
    loop = asyncio.new_event_loop()
    procs = loop.run_until_complete(start_workers(plan, rabbitmq_url, tmp_path))
    try:
        with GatewayThread(plan, GatewaySettings(port=0), url=rabbitmq_url) as running:
            c = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
            assert c.is_model_ready(plan.name)
            rng = np.random.default_rng(3)
            feed = {"x": rng.normal(size=(2, WIDTH)).astype(np.float32),
                    "bias": rng.normal(size=(2, CLASSES)).astype(np.float32)}
            inputs = []
            for name, value in feed.items():
                t = httpclient.InferInput(name, list(value.shape), "FP32")
                t.set_data_from_numpy(value)
                inputs.append(t)
            result = c.infer(plan.name, inputs, request_id="amqp-1")
            assert result.get_response()["id"] == "amqp-1"
            for name, want in mlp.expected(feed).items():
                np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-6)
    finally:
        loop.run_until_complete(stop_workers(procs))
        loop.close()
