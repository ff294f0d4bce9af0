"""A request whose publish the loss of the connection cuts short is sent again once the
connection is back, and answered: the caller sees neither ``ChannelBroken`` nor a timeout.

The client reaches RabbitMQ through a TCP relay of the test's own; the worker connects
directly. The relay holds the client's frames (the publish leaves but is never confirmed),
then drops the connection; aio-pika reconnects through the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import numpy as np
import pytest

from conveyor.client import Client
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from tests.support.relay import Relay
from workers.amqp import AmqpSettings, AmqpTransport
from workers.stage_worker import StageWorker

pytestmark = pytest.mark.rabbitmq


@pytest.mark.parametrize("pack", [True, False], ids=["packs", "one-message-each"])
async def test_requests_cut_short_by_a_lost_connection_are_answered(
    rabbitmq_url: str, tmp_path: Path, pack: bool
) -> None:
    plan = chain_plan(tmp_path, 2, name=f"loss-{uuid.uuid4().hex[:8]}")
    relay, via_relay = await Relay.before(rabbitmq_url)
    worker = StageWorker(plan, await AmqpTransport.connect(rabbitmq_url), plan.stage_names)
    await worker.start()
    client_transport = await AmqpTransport.connect(
        AmqpSettings.from_url(via_relay, reconnect_interval_s=0.2))
    try:
        async with Client(plan, client_transport, pack=pack, timeout=20) as client:
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            await client.infer({"x": x})  # the path works before the fault
            relay.hold()
            calls = [asyncio.ensure_future(client.infer({"x": x + i})) for i in range(6)]
            await until(lambda: relay.held > 0, 10, "the publishes to leave")
            await relay.drop()
            answers = await asyncio.gather(*calls)
    finally:
        await worker.stop(grace=0.5)
        with contextlib.suppress(Exception):
            await client_transport.close(grace=0.5)
        await relay.cut()
    for i, out in enumerate(answers):
        np.testing.assert_allclose(out["y"], chain_expected(x + i, 2), rtol=1e-6)
