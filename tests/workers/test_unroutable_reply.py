"""A reply that reaches no queue (its client is gone or reconnecting) is counted and logged
at WARNING with its request id, and the worker goes on serving."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from conveyor import wire
from conveyor.envelope import RequestMeta
from conveyor.plan import Plan
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan
from workers import serve

RNG = np.random.default_rng(12)


def rand() -> np.ndarray:
    return RNG.random((1, 4), dtype=np.float32)


async def test_unroutable_reply_is_counted_and_logged_with_its_request_id(
    broker: BrokerHandle, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    client = await Harness(await broker.connect(), plan).open()
    worker = await serve(plan, await broker.connect(), None, "cpu")
    try:
        # A reply queue of the plan's scheme (workers reply to no other) that nobody declared.
        gone = RequestMeta("orphan-1", reply_to=client.topology.reply_queue(uuid.uuid4().hex),
                           plan_hash=plan.hash)
        with caplog.at_level(logging.WARNING, logger="workers.outbox"):
            await client.publish(gone.to_message(wire.encode({"x": rand()})))
            # Served in order on one worker: once this one is answered, the orphan's
            # reply has been tried.
            x = rand()
            rid = await client.send({"x": x})
            await client.wait_for([rid])
        result = client.one(rid)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
        assert worker.outbox.unroutable_replies == 1
        warned = [r for r in caplog.records if "orphan-1" in r.getMessage()]
        assert warned and warned[0].levelno == logging.WARNING, caplog.text
    finally:
        await worker.stop(grace=2.0)
        await client.close()
