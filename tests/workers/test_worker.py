"""The stage worker end to end on both brokers: answers, batching, errors, delivery promises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.envelope import RequestMeta
from conveyor.errors import (
    BackpressureError,
    CodecError,
    DeadlineExceeded,
    InferenceError,
    PlanError,
)
from conveyor.packs import encode_stage_message
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.transport import Consumer, Delivery, Handler, Message, Transport
from tests.support.pipeline import Harness, Pipeline, Result
from tests.support.plans import (
    branches_expected,
    branches_plan,
    chain_expected,
    chain_plan,
    gather_plan,
    join_expected,
    join_plan,
)
from tests.support.polling import until_depth
from workers.settings import WorkerSettings
from workers.stage_worker import StageWorker

RNG = np.random.default_rng(42)


def rand(rows: int = 1) -> np.ndarray:
    return RNG.random((rows, 4), dtype=np.float32) - 0.3


def stats_of(worker: StageWorker, stage: str):  # type: ignore[no-untyped-def]
    return next(s for s in worker.stats().stages if s.stage == stage)


PlanBuilder = Callable[..., Plan]
#: Checks one request's reply (a dict of tensors, or the error it was answered with).
Check = Callable[[Result], None]


def answered(want: np.ndarray | None = None, rtol: float = 1e-5) -> Check:
    """The request was answered with tensors ("y" equal to ``want`` if given)."""

    def check(result: Result) -> None:
        assert not isinstance(result, Exception), result
        if want is not None:
            assert result["y"].shape == want.shape
            np.testing.assert_allclose(result["y"], want, rtol=rtol)

    return check


def refused(kind: type[Exception], text: str = "", stage: str | None = None) -> Check:
    """The request was answered with a ``kind`` error naming ``text`` (and ``stage``)."""

    def check(result: Result) -> None:
        assert isinstance(result, kind), result
        assert text in str(result), result
        if stage is not None:
            assert getattr(result, "stage", None) == stage, result

    return check


async def send_all(
    client: Harness, requests: Sequence[Mapping[str, Any]], *, within: float = 20.0, dead: int = 0
) -> list[str]:
    """Send each request (``Harness.send`` keyword arguments), wait for every reply and
    ``dead`` dead letters; the request ids, in order."""
    ids = [await client.send(**r) for r in requests]
    await client.wait_for(ids, within=within, dead=dead)
    return ids


# -- every request answered right: layouts of the worker processes over each plan ---------


@dataclass(frozen=True)
class Answers:
    """A plan, its answer, the requests' rows and what else the case checks."""

    build: PlanBuilder
    expected: Callable[[np.ndarray], np.ndarray]
    rows: Sequence[int]
    options: Mapping[str, Any] = field(default_factory=dict)
    within: float = 20.0
    #: The join of this plan counts every request, and every worker settles every part.
    join: str | None = None


CHAIN = Answers(chain_plan, chain_expected, [1 + i % 3 for i in range(40)], {"max_delay_ms": 3})
JOIN = Answers(join_plan, join_expected, [1] * 30, join="join")
BRANCHES = Answers(branches_plan, branches_expected, [1] * 20)
# The default "idle" policy: a stage with nothing to do runs what it has at once, so a
# window far longer than the test never delays a request that arrives alone.
LONE = Answers(chain_plan, chain_expected, [1], {"max_batch": 8, "max_delay_ms": 60_000}, 10.0)


@pytest.mark.parametrize(
    ("case", "layout"),
    [
        pytest.param(CHAIN, [None], id="chain-one-worker"),
        pytest.param(CHAIN, [["s0"], ["s1", "s2"]], id="chain-two-workers"),
        pytest.param(CHAIN, [["s0"], ["s1"], ["s2"]], id="chain-three-workers"),
        # A join gathers all branches.
        pytest.param(JOIN, [None], id="join-one-worker"),
        pytest.param(JOIN, [["fork"], ["left"], ["right"], ["join"]], id="join-four-workers"),
        # Entry stages get model inputs forwarded by the first worker.
        pytest.param(BRANCHES, [None], id="entry-stages-one-worker"),
        pytest.param(BRANCHES, [["a"], ["b"], ["j"]], id="entry-stages-three-workers"),
        pytest.param(BRANCHES, [["a", "j"], ["b"]], id="entry-stages-two-workers"),
        # A lone request does not wait for the batching window.
        pytest.param(LONE, [None], id="lone-request-one-worker"),
        pytest.param(LONE, [["s0"], ["s1"], ["s2"]], id="lone-request-three-workers"),
    ],
)
async def test_every_request_is_answered_right(
    pipeline: Pipeline, tmp_path: Path, unique: str, case: Answers, layout: list[list[str] | None]
) -> None:
    plan = Plan.load(case.build(tmp_path, name=unique, **case.options).directory)
    client = await pipeline.start(plan, layout)
    xs = [rand(rows) for rows in case.rows]
    ids = await send_all(client, [{"tensors": {"x": x}} for x in xs], within=case.within)
    for rid, x in zip(ids, xs, strict=True):
        for result in client.replies[rid]:  # duplicates, if any, must be right too
            answered(case.expected(x))(result)
    assert client.dead == []
    if case.join is not None:
        assert stats_of(pipeline.workers[-1], case.join).requests >= len(ids)
        for w in pipeline.workers:  # every part acked once its request is answered
            assert await w.wait_settled(5.0)
            assert all(c.unsettled == 0 for c in w.stats().consumers)


async def test_batches_fill_to_max_batch_and_split_back_by_rows(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    # A window far beyond the test: batches leave only when they hold max_batch rows.
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_batch=4, max_delay_ms=60_000).directory)
    client = await pipeline.start(plan, [None], WorkerSettings(device="cpu", batch_wait="window"))
    xs = [rand(2), rand(1), rand(1), rand(3), rand(1)]  # 2+1+1 = 4, then 3+1 = 4
    ids = await send_all(client, [{"tensors": {"x": x}} for x in xs])
    for rid, x in zip(ids, xs, strict=True):
        answered(chain_expected(x))(client.one(rid))
    s0 = stats_of(pipeline.workers[0], "s0")
    assert (s0.batches, s0.requests, s0.rows) == (2, 5, 8)


# -- requests refused, each answered with its cause ---------------------------------------


@dataclass(frozen=True)
class Refusals:
    """A plan and requests, each with the check of its reply and whether it is dead-lettered."""

    build: PlanBuilder
    #: (plan) -> [(Harness.send keyword arguments, check, dead-lettered)]
    requests: Callable[[Plan], list[tuple[dict[str, Any], Check, bool]]]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Requests the first stage ran, when the case says.
    ran: int | None = None


def _bad_requests(plan: Plan) -> list[tuple[dict[str, Any], Check, bool]]:
    return [
        ({"tensors": {"x": rand()}}, answered(), False),
        ({"tensors": {"x": rand().astype(np.float64)}}, refused(CodecError, "float64"), True),
        ({"tensors": {"x": np.zeros((1, 5), np.float32)}}, refused(CodecError, "dimension 1"),
         True),
        ({"tensors": {}, "body": b"\x93not a wire body"}, refused(CodecError), True),
    ]


def _expired(plan: Plan) -> list[tuple[dict[str, Any], Check, bool]]:
    # Far from now, so that neither clock skew nor header precision can blur the outcome;
    # an expired request is answered and acked, not dead-lettered, and not run.
    return [
        ({"tensors": {"x": rand()}, "deadline": time.time() - 600}, refused(DeadlineExceeded),
         False),
        ({"tensors": {"x": rand()}, "deadline": time.time() + 600}, answered(), False),
    ]


def _plan_hash_mismatch(plan: Plan) -> list[tuple[dict[str, Any], Check, bool]]:
    return [
        ({"tensors": {"x": rand()}, "plan_hash": "ab" * 32}, refused(PlanError, "abab"), True),
        ({"tensors": {"x": rand()}, "plan_hash": plan.short_hash}, answered(), False),
    ]


def _inference_error(plan: Plan) -> list[tuple[dict[str, Any], Check, bool]]:
    # One batch of four; 9 is out of range for width 4: only that request fails.
    x = rand()
    cases: list[tuple[dict[str, Any], Check, bool]] = []
    for i in [0, 3, 9, 1]:
        check = refused(InferenceError, stage="g") if i == 9 else answered(x[:, [i]], rtol=1e-7)
        cases.append(({"tensors": {"x": x, "idx": np.array([[i]], np.int64)}}, check, i == 9))
    return cases


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Refusals(chain_plan, _bad_requests), id="bad-requests-dead-lettered"),
        pytest.param(Refusals(chain_plan, _expired, ran=1), id="expired-request-not-run"),
        pytest.param(Refusals(chain_plan, _plan_hash_mismatch), id="plan-hash-mismatch"),
        pytest.param(
            Refusals(gather_plan, _inference_error, {"max_batch": 4, "max_delay_ms": 60_000}),
            id="inference-error-fails-only-its-request",
        ),
    ],
)
async def test_refused_requests_are_answered_with_their_cause(
    pipeline: Pipeline, tmp_path: Path, unique: str, case: Refusals
) -> None:
    plan = Plan.load(case.build(tmp_path, name=unique, **case.options).directory)
    client = await pipeline.start(plan, [None])
    requests = case.requests(plan)
    dead = sum(d for _, _, d in requests)
    ids = await send_all(client, [r for r, _, _ in requests], dead=dead)
    for rid, (_, check, _) in zip(ids, requests, strict=True):
        check(client.one(rid))
    assert sorted(m.message_id or "" for m in client.dead) == sorted(
        rid for rid, (_, _, d) in zip(ids, requests, strict=True) if d
    )
    if case.ran is not None:
        assert stats_of(pipeline.workers[0], plan.stages[0].name).requests == case.ran


@pytest.mark.parametrize("packed_replies", [True, False])
async def test_a_request_pack_is_answered_request_by_request(
    pipeline: Pipeline, tmp_path: Path, unique: str, packed_replies: bool
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=3).directory)
    client = await pipeline.start(plan, [["s0"], ["s1", "s2"]])
    xs = [rand(1 + i % 3) for i in range(6)]
    ids = await client.send_pack([{"x": x} for x in xs], packed_replies=packed_replies)
    await client.wait_for(ids)
    for rid, x in zip(ids, xs, strict=True):
        answered(chain_expected(x))(client.one(rid))
    assert stats_of(pipeline.workers[0], "s0").requests == 6
    if packed_replies:  # the six answers come in fewer messages, at least one a pack
        assert "conveyor.replies" in client.reply_types and len(client.reply_types) < 6
    else:  # a client that does not read packs gets one reply per request
        assert client.reply_types == [None] * 6
    assert client.dead == []
    assert await pipeline.workers[0].wait_settled(5.0)


async def test_each_request_of_a_pack_gets_its_own_outcome(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    client = await pipeline.start(plan, [None])
    on_time, late = await client.send_pack(
        [{"x": rand()}, {"x": rand()}], deadlines=[time.time() + 600, time.time() - 600]
    )
    await client.wait_for([on_time, late])
    answered()(client.one(on_time))
    refused(DeadlineExceeded)(client.one(late))
    assert client.dead == []  # an expired request is answered and acked, not dead-lettered
    # A pack whose tensors do not fit the plan: every request is told why, the pack is
    # dead-lettered once.
    bad = await client.send_pack([{"x": rand().astype(np.float64)} for _ in range(3)])
    await client.wait_for(bad, dead=1)
    for rid in bad:
        refused(CodecError, "float64")(client.one(rid))
    assert len(client.dead) == 1 and client.dead[0].type == "conveyor.pack"
    assert stats_of(pipeline.workers[0], "s0").requests == 1


class FlakyPublish:
    """A transport whose first ``failures`` publishes to stage exchanges / replies fail."""

    def __init__(self, inner: Transport, failures: int) -> None:
        self._inner = inner
        self.failures = failures
        self.failed = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def publish(
        self,
        exchange: str,
        message: Message,
        routing_key: str = "",
        *,
        mandatory: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise BackpressureError("test: publish refused", queue=routing_key)
        await self._inner.publish(exchange, message, routing_key, mandatory=mandatory,
                                  timeout=timeout)


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
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=0).directory)
    flaky = FlakyPublish(await pipeline.broker.connect(), failures=3)
    client = await pipeline.start(plan, [None], transport=flaky)  # type: ignore[arg-type]
    x = rand()
    rid = await client.send({"x": x})
    await client.wait_for([rid])
    assert flaky.failed == 3  # three failed replies: requeued, redelivered, run again
    answered(chain_expected(x))(client.one(rid))
    assert stats_of(pipeline.workers[0], "s0").requests == 4
    assert client.dead == []


async def test_stop_finishes_in_flight_and_leaves_the_rest_queued(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique, max_delay_ms=1).directory)
    client = await pipeline.start(plan, [None])
    inputs = {await client.send({"x": x}): x for x in (rand() for _ in range(60))}
    await pipeline.workers[0].stop(grace=5.0)
    served_first = stats_of(pipeline.workers[0], "s0").requests
    # A second worker takes over whatever the first left unsettled or never received.
    await pipeline.add_worker(plan, None)
    await client.wait_for(list(inputs))
    for rid, x in inputs.items():
        answered(chain_expected(x))(client.one(rid))
    assert served_first + stats_of(pipeline.workers[1], "s0").requests >= len(inputs)


async def test_join_parts_stay_unacked_until_the_join_runs(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    topo = Topology.of(plan)
    spy = HandedOver(await pipeline.broker.connect())
    client = await pipeline.start(plan, [["join"]], transport=spy)  # type: ignore[arg-type]
    x = rand()
    h = np.maximum(2 * x + 1, 0)
    meta = RequestMeta("req-1", reply_to=client.reply_queue)
    left = encode_stage_message(plan.hash, "left", [(meta, 1)], {"l": np.maximum(3 * h + 1, 0)})
    right = encode_stage_message(plan.hash, "right", [(meta, 1)], {"r": np.maximum(4 * h + 1, 0)})
    await client.transport.publish(topo.stage_exchange("join"), left, "req-1")
    first = pipeline.workers[0]
    # One part alone: held unacknowledged by the join, nothing answered.
    await asyncio.wait_for(spy.handled.wait(), 10)
    assert first.stats().consumers[0].unsettled == 1
    assert "req-1" not in client.replies
    await first.stop(grace=0.1)  # dies holding the part: it goes back to the queue
    shard = topo.stage_queue("join", 0)
    # RabbitMQ requeues a closed channel's messages on its own time: wait for it.
    await until_depth(client.transport, shard, 1, 10.0, exact=True)
    await pipeline.add_worker(plan, ["join"])
    await client.transport.publish(topo.stage_exchange("join"), right, "req-1")
    await client.wait_for(["req-1"])
    answered(join_expected(x))(client.one("req-1"))


async def test_stage_message_from_a_stage_it_does_not_read_is_refused(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, name=unique).directory)
    client = await pipeline.start(plan, [["s1"]])
    meta = RequestMeta("stray", reply_to=client.reply_queue)
    stray = encode_stage_message(plan.hash, "s2", [(meta, 1)], {"h1": rand()})
    await client.transport.publish(Topology.of(plan).stage_exchange("s1"), stray, "s1")
    await client.wait_for(["stray"], dead=1)
    refused(PlanError, "does not read from 's2'")(client.one("stray"))


async def test_join_widens_its_window_when_it_fills_with_waiting_parts(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    exchange = Topology.of(plan).stage_exchange("join")
    settings = WorkerSettings(prefetch=8, max_batch=4)
    client = await pipeline.start(plan, [["join"]], settings=settings)
    window = pipeline.workers[0].stats().consumers[0].prefetch
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
        answered(join_expected(x))(client.one(meta.request_id))
    assert await pipeline.workers[0].wait_settled(5.0)


async def test_a_late_duplicate_part_of_a_joined_request_is_acked(
    pipeline: Pipeline, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(join_plan(tmp_path, name=unique).directory)
    exchange = Topology.of(plan).stage_exchange("join")
    spy = HandedOver(await pipeline.broker.connect())
    client = await pipeline.start(plan, [["join"]], transport=spy)  # type: ignore[arg-type]
    meta = RequestMeta("dup", reply_to=client.reply_queue)
    left = encode_stage_message(plan.hash, "left", [(meta, 1)], {"l": rand()})
    right = encode_stage_message(plan.hash, "right", [(meta, 1)], {"r": rand()})
    for message in (left, right):
        await client.transport.publish(exchange, message, "dup")
    await client.wait_for(["dup"])
    assert await pipeline.workers[0].wait_settled(5.0)
    spy.handled.clear()
    await client.transport.publish(exchange, left, "dup")  # as if redelivered upstream
    await asyncio.wait_for(spy.handled.wait(), 10)
    assert await pipeline.workers[0].wait_settled(5.0)  # acked at once, not held for a partner
    assert len(client.replies["dup"]) == 1 and client.dead == []
