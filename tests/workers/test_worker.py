"""The stage worker end to end on both brokers: answers, batching, errors, delivery promises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from conveyor.errors import (
    BackpressureError,
    CodecError,
    DeadlineExceeded,
    InferenceError,
    PlanError,
)
from conveyor.plan import Plan
from conveyor.transport import Consumer, Delivery, Handler, Message, Transport
from tests.transport.conftest import BrokerHandle
from tests.workers.harness import Harness
from tests.workers.plans import (
    branches_expected,
    branches_plan,
    chain_expected,
    chain_plan,
    gather_plan,
    join_expected,
    join_plan,
)
from workers import serve
from workers.settings import WorkerSettings
from workers.stage_worker import StageWorker

RNG = np.random.default_rng(42)


def rand(rows: int = 1) -> np.ndarray:
    return RNG.random((rows, 4), dtype=np.float32) - 0.3


class Pipeline:
    """Workers for a plan, each on its own connection, plus a test client."""

    def __init__(self, broker: BrokerHandle, plan: Plan) -> None:
        self.broker = broker
        self.plan = plan
        self.workers: list[StageWorker] = []
        self.client: Harness | None = None

    async def start(
        self,
        layout: Sequence[Sequence[str] | None],
        settings: WorkerSettings | None = None,
        transport: Transport | None = None,
    ) -> Harness:
        self.client = await Harness(await self.broker.connect(), self.plan).open()
        for stages in layout:
            t = transport or await self.broker.connect()
            self.workers.append(await serve(self.plan, t, stages, "cpu", settings))
        return self.client

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop(grace=2.0)
        if self.client is not None:
            await self.client.close()


@pytest.fixture
async def pipeline_of(broker: BrokerHandle) -> AsyncIterator[list[Pipeline]]:
    made: list[Pipeline] = []
    yield made
    for p in made:
        await p.stop()


def stats_of(worker: StageWorker, stage: str):  # type: ignore[no-untyped-def]
    return next(s for s in worker.stats().stages if s.stage == stage)


@pytest.mark.parametrize("layout", [[None], [["s0"], ["s1", "s2"]], [["s0"], ["s1"], ["s2"]]])
async def test_chain_answers_every_request(
    broker: BrokerHandle,
    pipeline_of: list[Pipeline],
    tmp_path: Path,
    unique: str,
    layout: list[list[str] | None],
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=3).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start(layout)
    inputs = {await client.send({"x": x}): x for x in (rand(1 + i % 3) for i in range(40))}
    await client.wait_for(list(inputs))
    for rid, x in inputs.items():
        for result in client.replies[rid]:
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
    assert client.dead == []


@pytest.mark.parametrize("layout", [[None], [["fork"], ["left"], ["right"], ["join"]]])
async def test_join_gathers_all_branches(
    broker: BrokerHandle,
    pipeline_of: list[Pipeline],
    tmp_path: Path,
    unique: str,
    layout: list[list[str] | None],
) -> None:
    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start(layout)
    inputs = {await client.send({"x": x}): x for x in (rand() for _ in range(30))}
    await client.wait_for(list(inputs))
    for rid, x in inputs.items():
        result = client.one(rid)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], join_expected(x), rtol=1e-5)
    join = p.workers[-1]
    assert stats_of(join, "join").requests >= len(inputs)
    for w in p.workers:  # every part acked once its request is answered
        assert await w.wait_settled(5.0)
        assert all(c.unsettled == 0 for c in w.stats().consumers)


@pytest.mark.parametrize("layout", [[None], [["a"], ["b"], ["j"]], [["a", "j"], ["b"]]])
async def test_entry_stages_get_model_inputs_forwarded_by_the_first_worker(
    broker: BrokerHandle,
    pipeline_of: list[Pipeline],
    tmp_path: Path,
    unique: str,
    layout: list[list[str] | None],
) -> None:
    plan = Plan.load(branches_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start(layout)
    inputs = {await client.send({"x": x}): x for x in (rand() for _ in range(20))}
    await client.wait_for(list(inputs))
    for rid, x in inputs.items():
        result = client.one(rid)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], branches_expected(x), rtol=1e-5)


async def test_batches_fill_to_max_batch_and_split_back_by_rows(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    # A window far beyond the test: batches leave only when they hold max_batch rows.
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_batch=4, max_delay_ms=60_000).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None], WorkerSettings(device="cpu", batch_wait="window"))
    xs = [rand(2), rand(1), rand(1), rand(3), rand(1)]  # 2+1+1 = 4, then 3+1 = 4
    ids = [await client.send({"x": x}) for x in xs]
    await client.wait_for(ids)
    for rid, x in zip(ids, xs, strict=True):
        result = client.one(rid)
        assert not isinstance(result, Exception)
        assert result["y"].shape == x.shape
        np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
    s0 = stats_of(p.workers[0], "s0")
    assert (s0.batches, s0.requests, s0.rows) == (2, 5, 8)


@pytest.mark.parametrize("layout", [[None], [["s0"], ["s1"], ["s2"]]])
async def test_a_lone_request_does_not_wait_for_the_batching_window(
    broker: BrokerHandle,
    pipeline_of: list[Pipeline],
    tmp_path: Path,
    unique: str,
    layout: list[list[str] | None],
) -> None:
    # The default "idle" policy: a stage with nothing to do runs what it has at once, so a
    # window far longer than the test never delays a request that arrives alone.
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_batch=8, max_delay_ms=60_000).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start(layout)
    x = rand()
    rid = await client.send({"x": x})
    await client.wait_for([rid], within=10.0)
    result = client.one(rid)
    assert not isinstance(result, Exception), result
    np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)


async def test_bad_requests_are_dead_lettered_and_answered(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    good = await client.send({"x": rand()})
    wrong_dtype = await client.send({"x": rand().astype(np.float64)})
    wrong_width = await client.send({"x": np.zeros((1, 5), np.float32)})
    garbage = await client.send({}, body=b"\x93not a wire body")
    await client.wait_for([good, wrong_dtype, wrong_width, garbage], dead=3)
    assert not isinstance(client.one(good), Exception)
    for rid, text in [(wrong_dtype, "float64"), (wrong_width, "dimension 1"), (garbage, "")]:
        error = client.one(rid)
        assert isinstance(error, CodecError), error
        assert text in str(error)
    assert sorted(m.message_id or "" for m in client.dead) == sorted(
        [wrong_dtype, wrong_width, garbage]
    )


async def test_expired_request_is_answered_and_not_run(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    # Far from now, so that neither clock skew nor header precision can blur the outcome.
    late = await client.send({"x": rand()}, deadline=time.time() - 600)
    on_time = await client.send({"x": rand()}, deadline=time.time() + 600)
    await client.wait_for([late, on_time])
    assert isinstance(client.one(late), DeadlineExceeded)
    assert not isinstance(client.one(on_time), Exception)
    assert stats_of(p.workers[0], "s0").requests == 1
    assert client.dead == []


@pytest.mark.parametrize("packed_replies", [True, False])
async def test_a_request_pack_is_answered_request_by_request(
    broker: BrokerHandle,
    pipeline_of: list[Pipeline],
    tmp_path: Path,
    unique: str,
    packed_replies: bool,
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=3).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([["s0"], ["s1", "s2"]])
    xs = [rand(1 + i % 3) for i in range(6)]
    ids = await client.send_pack([{"x": x} for x in xs], packed_replies=packed_replies)
    await client.wait_for(ids)
    for rid, x in zip(ids, xs, strict=True):
        result = client.one(rid)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
    assert stats_of(p.workers[0], "s0").requests == 6
    if packed_replies:  # the six answers come in fewer messages, at least one a pack
        assert "conveyor.replies" in client.reply_types and len(client.reply_types) < 6
    else:  # a client that does not read packs gets one reply per request
        assert client.reply_types == [None] * 6
    assert client.dead == []
    assert await p.workers[0].wait_settled(5.0)


async def test_each_request_of_a_pack_gets_its_own_outcome(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    on_time, late = await client.send_pack(
        [{"x": rand()}, {"x": rand()}], deadlines=[time.time() + 600, time.time() - 600]
    )
    await client.wait_for([on_time, late])
    assert not isinstance(client.one(on_time), Exception)
    assert isinstance(client.one(late), DeadlineExceeded)
    assert client.dead == []  # an expired request is answered and acked, not dead-lettered
    # A pack whose tensors do not fit the plan: every request is told why, the pack is
    # dead-lettered once.
    bad = await client.send_pack([{"x": rand().astype(np.float64)} for _ in range(3)])
    await client.wait_for(bad, dead=1)
    for rid in bad:
        error = client.one(rid)
        assert isinstance(error, CodecError) and "float64" in str(error), error
    assert len(client.dead) == 1 and client.dead[0].type == "conveyor.pack"
    assert stats_of(p.workers[0], "s0").requests == 1


async def test_plan_hash_mismatch_is_refused(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    rid = await client.send({"x": rand()}, plan_hash="ab" * 32)
    short = await client.send({"x": rand()}, plan_hash=plan.short_hash)
    await client.wait_for([rid, short], dead=1)
    error = client.one(rid)
    assert isinstance(error, PlanError) and "abab" in str(error)
    assert not isinstance(client.one(short), Exception)
    assert [m.message_id for m in client.dead] == [rid]


async def test_inference_error_fails_only_the_bad_request_of_a_batch(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(gather_plan(tmp_path, name=unique, max_batch=4, max_delay_ms=60_000).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    x = rand()
    indices = [0, 3, 9, 1]  # 9 is out of range for width 4
    ids = [await client.send({"x": x, "idx": np.array([[i]], np.int64)}) for i in indices]
    await client.wait_for(ids, dead=1)
    for rid, i in zip(ids, indices, strict=True):
        result = client.one(rid)
        if i == 9:
            assert isinstance(result, InferenceError) and result.stage == "g", result
        else:
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result["y"], x[:, [i]])
    assert [m.message_id for m in client.dead] == [ids[2]]


class FlakyPublish:
    """A transport whose first ``failures`` publishes to stage exchanges / replies fail."""

    def __init__(self, inner: Transport, failures: int) -> None:
        self._inner = inner
        self.failures = failures
        self.failed = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def publish(
        self, exchange: str, message: Message, routing_key: str = "", *, mandatory: bool = True
    ) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise BackpressureError("test: publish refused", queue=routing_key)
        await self._inner.publish(exchange, message, routing_key, mandatory=mandatory)


class HandedOver:
    """A transport that sets ``handled`` once a consumer's handler has returned."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.handled = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Consumer:
        async def spy(delivery: Delivery) -> None:
            await handler(delivery)
            self.handled.set()

        return await self._inner.consume(queue, spy, prefetch=prefetch)


async def test_input_is_acked_only_after_the_output_publish_is_confirmed(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=0).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    flaky = FlakyPublish(await broker.connect(), failures=3)
    client = await p.start([None], transport=flaky)  # type: ignore[arg-type]
    x = rand()
    rid = await client.send({"x": x})
    await client.wait_for([rid])
    assert flaky.failed == 3  # three failed replies: requeued, redelivered, run again
    result = client.one(rid)
    assert not isinstance(result, Exception)
    np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
    assert stats_of(p.workers[0], "s0").requests == 4
    assert client.dead == []


async def test_stop_finishes_in_flight_and_leaves_the_rest_queued(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=1).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([None])
    inputs = {await client.send({"x": x}): x for x in (rand() for _ in range(60))}
    await p.workers[0].stop(grace=5.0)
    served_first = stats_of(p.workers[0], "s0").requests
    # A second worker takes over whatever the first left unsettled or never received.
    p.workers.append(await serve(plan, await broker.connect(), None, "cpu"))
    await client.wait_for(list(inputs))
    for rid, x in inputs.items():
        result = client.one(rid)
        assert not isinstance(result, Exception)
        np.testing.assert_allclose(result["y"], chain_expected(x), rtol=1e-5)
    assert served_first + stats_of(p.workers[1], "s0").requests >= len(inputs)


async def test_join_parts_stay_unacked_until_the_join_runs(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    from conveyor.envelope import RequestMeta
    from conveyor.packs import encode_stage_message
    from conveyor.topology import Topology

    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    topo = Topology.of(plan)
    pipeline_of.append(p := Pipeline(broker, plan))
    spy = HandedOver(await broker.connect())
    client = await p.start([["join"]], transport=spy)  # type: ignore[arg-type]
    x = rand()
    h = np.maximum(2 * x + 1, 0)
    meta = RequestMeta("req-1", reply_to=client.reply_queue)
    left = encode_stage_message(plan.hash, "left", [(meta, 1)], {"l": np.maximum(3 * h + 1, 0)})
    right = encode_stage_message(plan.hash, "right", [(meta, 1)], {"r": np.maximum(4 * h + 1, 0)})
    await client.transport.publish(topo.stage_exchange("join"), left, "req-1")
    first = p.workers[0]
    # One part alone: held unacknowledged by the join, nothing answered.
    await asyncio.wait_for(spy.handled.wait(), 10)
    assert first.stats().consumers[0].unsettled == 1
    assert "req-1" not in client.replies
    await first.stop(grace=0.1)  # dies holding the part: it goes back to the queue
    shard = topo.stage_queue("join", 0)
    # RabbitMQ requeues a closed channel's messages on its own time: wait for it.
    for _ in range(200):
        if (await client.transport.queue_stats(shard)).depth == 1:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the dead join's part did not return to its queue within 10 s")
    p.workers.append(await serve(plan, await broker.connect(), ["join"], "cpu"))
    await client.transport.publish(topo.stage_exchange("join"), right, "req-1")
    await client.wait_for(["req-1"])
    result = client.one("req-1")
    assert not isinstance(result, Exception), result
    np.testing.assert_allclose(result["y"], join_expected(x), rtol=1e-5)


async def test_stage_message_from_a_stage_it_does_not_read_is_refused(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    from conveyor.envelope import RequestMeta
    from conveyor.packs import encode_stage_message
    from conveyor.topology import Topology

    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([["s1"]])
    meta = RequestMeta("stray", reply_to=client.reply_queue)
    stray = encode_stage_message(plan.hash, "s2", [(meta, 1)], {"h1": rand()})
    await client.transport.publish(Topology.of(plan).stage_exchange("s1"), stray, "s1")
    await client.wait_for(["stray"], dead=1)
    error = client.one("stray")
    assert isinstance(error, PlanError) and "does not read from 's2'" in str(error)


async def test_join_widens_its_window_when_it_fills_with_waiting_parts(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    from conveyor.envelope import RequestMeta
    from conveyor.packs import encode_stage_message
    from conveyor.topology import Topology

    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    exchange = Topology.of(plan).stage_exchange("join")
    pipeline_of.append(p := Pipeline(broker, plan))
    client = await p.start([["join"]], settings=WorkerSettings(prefetch=8, max_batch=4))
    window = p.workers[0].stats().consumers[0].prefetch
    n = 3 * window  # every left part first: more than the window can hold
    metas = [RequestMeta(f"q{i}", reply_to=client.reply_queue) for i in range(n)]
    xs = [rand() for _ in range(n)]
    for side, scale in (("left", 3), ("right", 4)):
        for meta, x in zip(metas, xs, strict=True):
            h = np.maximum(2 * x + 1, 0)
            part = {side[0]: np.maximum(scale * h + 1, 0)}
            message = encode_stage_message(plan.hash, side, [(meta, 1)], part)
            await client.transport.publish(exchange, message, meta.request_id)
    await client.wait_for([m.request_id for m in metas])
    for meta, x in zip(metas, xs, strict=True):
        result = client.one(meta.request_id)
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result["y"], join_expected(x), rtol=1e-5)
    assert await p.workers[0].wait_settled(5.0)


async def test_a_late_duplicate_part_of_a_joined_request_is_acked(
    broker: BrokerHandle, pipeline_of: list[Pipeline], tmp_path: Path, unique: str
) -> None:
    from conveyor.envelope import RequestMeta
    from conveyor.packs import encode_stage_message
    from conveyor.topology import Topology

    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    exchange = Topology.of(plan).stage_exchange("join")
    pipeline_of.append(p := Pipeline(broker, plan))
    spy = HandedOver(await broker.connect())
    client = await p.start([["join"]], transport=spy)  # type: ignore[arg-type]
    meta = RequestMeta("dup", reply_to=client.reply_queue)
    left = encode_stage_message(plan.hash, "left", [(meta, 1)], {"l": rand()})
    right = encode_stage_message(plan.hash, "right", [(meta, 1)], {"r": rand()})
    for message in (left, right):
        await client.transport.publish(exchange, message, "dup")
    await client.wait_for(["dup"])
    assert await p.workers[0].wait_settled(5.0)
    spy.handled.clear()
    await client.transport.publish(exchange, left, "dup")  # as if redelivered upstream
    await asyncio.wait_for(spy.handled.wait(), 10)
    assert await p.workers[0].wait_settled(5.0)  # acked at once, not held for a partner
    assert len(client.replies["dup"]) == 1 and client.dead == []
