"""A message a worker refuses reaches the dead queue carrying its cause (error code and
text, stage, worker, request id, trace id, time), and `conveyor dead` shows it; a failed
dead-letter publish falls back to a plain reject (nothing lost); a worker's dead letter
replays to an answer. Both brokers."""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conveyor import wire
from conveyor.app import dead
from conveyor.app.cmd_dead import _dead
from conveyor.app.transports import BrokerTarget
from conveyor.client import Client
from conveyor.deaths import HEADER_PREFIX, MAX_MESSAGE_TEXT, Death
from conveyor.envelope import RequestMeta, read_reply
from conveyor.errors import BackpressureError, CodecError, ConveyorError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.tracing import new_traceparent, trace_of
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until, until_depth
from workers.dead_letters import DeadLetters
from workers.settlement import Cause
from workers.stage_worker import StageWorker


class RefusingDeadLetters:
    """A transport whose publishes to the plan's dead-letter exchange are refused, as a
    full or unwilling broker would refuse them."""

    def __init__(self, inner: Transport, exchange: str) -> None:
        self._inner = inner
        self._exchange = exchange
        self.refused = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def publish(
        self, exchange: str, message: Message, routing_key: str = "", *,
        mandatory: bool = True, timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        if exchange == self._exchange:
            self.refused += 1
            raise BackpressureError("dead-letter publish refused (test)", queue=exchange)
        await self._inner.publish(exchange, message, routing_key, mandatory=mandatory,
                                  timeout=timeout)


@dataclass
class Rig:
    """One worker for every stage of a 2-stage chain, and a client speaking the wire
    protocol; the dead queue is left alone (``dead.show`` reads it)."""

    plan: Plan
    admin: Transport
    worker: StageWorker
    reply_queue: str
    replies: dict[str, Message]

    async def send(self, body: bytes, trace: str) -> str:
        rid = uuid.uuid4().hex
        meta = RequestMeta(rid, reply_to=self.reply_queue, plan_hash=self.plan.hash,
                           trace_id=trace)
        await self.admin.publish(Topology.of(self.plan).input_exchange, meta.to_message(body))
        return rid

    def error_of(self, rid: str) -> ConveyorError:
        try:
            read_reply(self.replies[rid])
        except ConveyorError as exc:
            return exc
        raise AssertionError(f"request {rid} was answered, not refused")


async def _rig(broker: BrokerHandle, plan: Plan, worker_transport: Transport | None = None) -> Rig:
    admin = await broker.connect()
    worker = StageWorker(plan, worker_transport or await broker.connect())
    await worker.start()
    reply_queue = Topology.of(plan).reply_queue(uuid.uuid4().hex[:8])
    await admin.declare_queue(QueueSpec(reply_queue, auto_delete=True))
    replies: dict[str, Message] = {}

    async def on_reply(delivery: Delivery) -> None:
        replies[delivery.message.correlation_id or "?"] = delivery.message
        await delivery.ack()

    await admin.consume(reply_queue, on_reply, prefetch=100)
    return Rig(plan, admin, worker, reply_queue, replies)


@pytest.fixture
async def rig(broker: BrokerHandle, tmp_path: Path, unique: str) -> AsyncIterator[Rig]:
    made = await _rig(broker, chain_plan(tmp_path, 2, name=unique))
    try:
        yield made
    finally:
        await made.worker.stop(grace=0.5)


#: (body, what the error's text says): an unreadable body; a tensor of the wrong shape.
REFUSALS = {
    "malformed": (b"\x93not a tensor message", "expected a map"),
    "wrong-shape": (wire.encode({"x": np.ones((1, 5), np.float32)}), "dimension 1 is 5"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
async def test_a_refused_request_is_dead_lettered_with_its_cause(
    rig: Rig, broker: BrokerHandle, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body, says = REFUSALS[kind]
    trace = new_traceparent()
    before = time.time()
    rid = await rig.send(body, trace)
    await until_depth(rig.admin, Topology.of(rig.plan).dead_letter_queue, 1)
    await until(lambda: rid in rig.replies, 10.0, "the error reply")
    letters, depth = await dead.show(rig.admin, rig.plan, 10)
    assert depth == 1 and len(letters) == 1
    letter = letters[0]
    death = letter.death
    assert death is not None, letter.message.headers
    error = rig.error_of(rid)
    assert isinstance(error, CodecError)
    # The same cause the client was told, with where, who and when.
    assert (death.code, death.message) == (error.code, str(error)) and says in death.message
    assert (letter.request_id, death.request_ids, death.failed) == (rid, (rid,), 1)
    assert (letter.stage, death.stage, death.worker) == ("s0", "s0", rig.worker.worker_id)
    assert letter.trace == death.trace == trace_of(trace)
    assert letter.queue == Topology.of(rig.plan).input_queue(0)
    assert letter.exchange == Topology.of(rig.plan).input_exchange
    assert before <= death.at <= time.time()
    assert rig.worker.dead_letters.published == 1 and rig.worker.dead_letters.fallbacks == 0
    assert letter.message.body == body  # the message as it was sent: replayable
    text = "\n".join(dead.render(letter))
    assert f"{error.code}: {error}" in text and rid in text and rig.worker.worker_id in text
    if broker.kind == "rabbitmq":  # the command itself (RabbitMQ only)
        assert broker.url is not None
        args = argparse.Namespace(replay=False, purge=False, show=10)
        assert await _dead(rig.plan, BrokerTarget(broker.url), args) == 0
        out = capsys.readouterr().out
        assert "1 dead-lettered message(s)" in out and f"{error.code}: {error}" in out
    await until_depth(rig.admin, Topology.of(rig.plan).dead_letter_queue, 1)  # still there


async def test_a_failed_dead_letter_publish_falls_back_to_reject(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    refusing = RefusingDeadLetters(await broker.connect(), Topology.of(plan).dead_letter_exchange)
    rig = await _rig(broker, plan, refusing)  # type: ignore[arg-type]
    try:
        body, _ = REFUSALS["malformed"]
        ids = [await rig.send(body, new_traceparent()) for _ in range(3)]
        dead_queue = Topology.of(rig.plan).dead_letter_queue
        await until_depth(rig.admin, dead_queue, 3)
        await until(lambda: all(i in rig.replies for i in ids), 10.0, "the error replies")
        assert await rig.worker.wait_settled(5.0)
        letters, depth = await dead.show(rig.admin, rig.plan, 10)
    finally:
        await rig.worker.stop(grace=0.5)
    # Nothing lost: every refused message is in the dead queue, dead-lettered by the broker.
    assert depth == 3 and sorted(d.request_id or "" for d in letters) == sorted(ids)
    assert all(d.death is None and d.reason == "rejected" and d.stage == "s0" for d in letters)
    assert refusing.refused == 3 and rig.worker.dead_letters.fallbacks == 3
    assert "not recorded" in "\n".join(dead.render(letters[0]))


async def test_a_workers_dead_letter_replays_to_an_answer(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    s0, s1 = plan.stage_names
    topo = Topology.of(plan)
    first = StageWorker(plan, await broker.connect(), [s0])
    admin = await broker.connect()
    broken = DeadLetters(await broker.connect(), topo, "broken-worker")
    second: StageWorker | None = None

    async def refuse(delivery: Delivery) -> None:  # a stage-1 worker that fails everything
        await broken.send(delivery, [Cause("inference_error", "CUDA out of memory (test)",
                                           stage=s1)], stage=s1, queue=topo.stage_queue(s1))

    try:
        await first.start()
        consumer = await admin.consume(topo.stage_queue(s1), refuse, prefetch=4)
        async with Client(plan, await broker.connect()) as client:
            x = np.full((1, 4), 0.25, np.float32)
            call = asyncio.ensure_future(client.infer({"x": x}, timeout=60))
            await until_depth(admin, topo.dead_letter_queue, 1)
            letters, _ = await dead.show(admin, plan, 10)
            assert letters[0].death is not None and letters[0].death.code == "inference_error"
            assert (letters[0].stage, letters[0].exchange) == (s1, topo.stage_exchange(s1))
            await consumer.cancel()
            second = StageWorker(plan, await broker.connect(), [s1])
            await second.start()
            assert await dead.replay(admin, plan) == (1, [])
            outputs = await asyncio.wait_for(call, 20)
        np.testing.assert_allclose(outputs["y"], chain_expected(x, 2), rtol=1e-5)
        assert await until_depth(admin, topo.dead_letter_queue, 0, exact=True) == 0
    finally:
        await first.stop(grace=0.5)
        if second is not None:
            await second.stop(grace=0.5)


def test_death_headers_round_trip_and_read_leniently() -> None:
    death = Death("codec_error", "x" * (MAX_MESSAGE_TEXT + 10), "s0", "w-1", "ex", 1795733439.25,
                  tuple(f"r,{i}" for i in range(40)), 40, "ab" * 16, "q")
    headers = death.to_headers()
    assert all(k.startswith(HEADER_PREFIX) for k in headers)
    assert all(isinstance(v, str | int) for v in headers.values())
    back = Death.from_headers({k: v.encode() if isinstance(v, str) else v
                               for k, v in headers.items()})  # AMQP clients may send bytes
    assert back is not None
    assert back.message.endswith("(truncated)") and len(back.request_ids) == 32
    assert (back.code, back.at, back.request_ids[1], back.failed) == (
        "codec_error", 1795733439.25, "r,1", 40)
    assert Death.from_headers({"x-first-death-reason": "expired"}) is None
    sloppy = Death.from_headers({"x-conveyor-death-code": "c", "x-conveyor-death-at": "soon",
                                 "x-conveyor-death-requests": "[1, 2"})
    assert sloppy is not None and math.isnan(sloppy.at) and sloppy.request_ids == ()
