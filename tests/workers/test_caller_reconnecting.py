"""A worker that looks for a caller while the caller reconnects must not drop its requests.

The SDK's reply queue is exclusive: it goes with the client's connection and comes back
when the client reconnects, which then sends again what was in flight. Here a client's
requests wait in the input queue, its connection is lost and new ones are refused (the
network is down), and a worker starts meanwhile: it finds the reply queue missing. The
network comes back a moment later. Every request must be answered: the worker holds them
within its grace (``workers.callers``) instead of dropping them and runs them once the
reply queue is back, and the copies the client sends again run too (the client takes one
reply per request). Before the grace rule
the worker dropped them all and kept "gone" for a second, so the copies sent again were
dropped as well: all lost (the fault suite's connection-loss test lost 49 that way).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from conveyor.client import Client
from conveyor.errors import NotFound
from conveyor.plan import Plan
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from tests.support.relay import Relay
from workers import serve
from workers.amqp import AmqpSettings, AmqpTransport
from workers.stage_worker import StageWorker

pytestmark = pytest.mark.rabbitmq

REQUESTS = 12


async def reply_queue_missing(admin: AmqpTransport, queue: str) -> bool:
    try:
        await admin.queue_stats(queue)
    except NotFound:
        return True
    return False


def ran(worker: StageWorker, stage: str) -> int:
    return next(s.requests for s in worker.stats().stages if s.stage == stage)


async def test_requests_of_a_reconnecting_caller_are_all_answered(
    rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=2, name=unique).directory)
    relay, via_relay = await Relay.before(rabbitmq_url)
    admin = await AmqpTransport.connect(rabbitmq_url)
    transport = await AmqpTransport.connect(
        AmqpSettings.from_url(via_relay, reconnect_interval_s=0.1))
    client = await Client(plan, transport, on_no_consumer="off").open()
    worker = None
    try:
        rng = np.random.default_rng(5)
        xs = [rng.random((1, 4), dtype=np.float32) for _ in range(REQUESTS)]
        answers = [asyncio.create_task(client.infer({"x": x}, timeout=30.0)) for x in xs]
        await until(lambda: client.stats().sent == REQUESTS, 10.0, "the requests confirmed")

        relay.refuse()
        await relay.drop()  # the client's connections die; its reply queue goes with them
        await until(lambda: reply_queue_missing(admin, client.reply_queue), 10.0,
                    "the client's reply queue to go with its connection")
        worker = await serve(plan, await AmqpTransport.connect(rabbitmq_url), None, "cpu")
        callers = worker._intake.callers
        await until(lambda: callers.asked >= 1, 10.0, "the worker to look for the caller")
        relay.accept()  # the network is back: the client reconnects and sends again

        for x, got in zip(xs, await asyncio.gather(*answers), strict=True):
            np.testing.assert_allclose(got["y"], chain_expected(x, k=2), rtol=1e-5)
        stats = client.stats()
        assert stats.reconnects >= 1 and stats.resent == REQUESTS, stats
        first = worker.metrics.registry.get_sample_value(
            "conveyor_requests_total",
            {"worker": worker.worker_id, "stage": plan.stages[0].name, "outcome": "caller_gone"},
        )
        assert not first, f"{first} requests of a reconnecting caller dropped"
        # The first copies ran as well, once the worker saw the queue back (none is left
        # queued, none dropped): the copies sent again are the duplicates.
        await until(lambda: ran(worker, plan.stages[0].name) == 2 * REQUESTS, 10.0,
                    lambda: f"both copies of each request run: {ran(worker, plan.stages[0].name)}")
    finally:
        if worker is not None:
            await worker.stop(grace=2.0)
            await worker.transport.close(grace=0.5)
        await client.close()
        await transport.close(grace=0.5)
        await admin.close(grace=0.5)
        await relay.cut()
