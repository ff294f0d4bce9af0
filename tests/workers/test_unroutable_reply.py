"""A reply that reaches no queue (its client left after the request was admitted, or is
reconnecting) is counted and logged at WARNING with its request id, and the worker goes on
serving."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from conveyor import wire
from conveyor.envelope import RequestMeta
from conveyor.plan import Plan
from conveyor.transport import QueueSpec
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from workers import serve
from workers.metrics import WorkerCollector
from workers.stage_worker import StageWorker

RNG = np.random.default_rng(12)


def rand() -> np.ndarray:
    return RNG.random((1, 4), dtype=np.float32)


async def test_unroutable_reply_is_counted_and_logged_with_its_request_id(
    broker: BrokerHandle, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply queue exists when the request is admitted (else it would not run,
    tests/workers/test_caller_gone.py) and is gone when the last stage replies."""
    plan = Plan.load(chain_plan(tmp_path, k=2, name=unique).directory)
    transport = await broker.connect()
    client = await Harness(transport, plan).open()
    first = await serve(plan, await broker.connect(), ["s0"], "cpu")
    last: StageWorker | None = None
    try:
        orphan_queue = client.topology.reply_queue(uuid.uuid4().hex)
        await transport.declare_queue(QueueSpec(orphan_queue))
        gone = RequestMeta("orphan-1", reply_to=orphan_queue, plan_hash=plan.hash)
        await client.publish(gone.to_message(wire.encode({"x": rand()})))
        s1 = client.topology.stage_queue("s1")

        async def passed_s0() -> bool:
            return (await transport.queue_stats(s1)).depth == 1

        await until(passed_s0, 10.0, "the orphan to pass stage s0")
        await transport.delete_queue(orphan_queue)
        with caplog.at_level(logging.WARNING, logger="workers.outbox"):
            last = await serve(plan, await broker.connect(), ["s1"], "cpu")
            # Served in order on one worker: once this one is answered, the orphan's
            # reply has been tried.
            x = rand()
            rid = await client.send({"x": x})
            await client.wait_for([rid])
        result = client.one(rid)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], chain_expected(x, k=2), rtol=1e-5)
        assert last.outbox.unroutable_replies == 1
        exported = {m.name: m.samples[0].value for m in WorkerCollector(last).collect()
                    if m.name in ("conveyor_unroutable_replies", "conveyor_expired_unsent")}
        assert exported == {"conveyor_unroutable_replies": 1, "conveyor_expired_unsent": 0}
        warned = [r for r in caplog.records if "orphan-1" in r.getMessage()]
        assert warned and warned[0].levelno == logging.WARNING, caplog.text
    finally:
        for worker in (first, last):
            if worker is not None:
                await worker.stop(grace=2.0)
        await client.close()
