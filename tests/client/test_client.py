"""The client SDK against the real embedded broker, with a hand-written responder.

The responder plays the worker's part of docs/wire.md (consume the input shard, answer
with ``envelope.reply_ok`` / ``reply_error``) so these tests pin the client's own
behaviour: routing by request id, de-duplication, deadlines, cancellation, typed errors,
validation and ordering, independently of the real workers (tests/e2e covers those).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from conveyor.app.connect import connect
from conveyor.client import Client
from conveyor.envelope import RequestMeta, reply_error, reply_ok
from conveyor.errors import (
    CodecError,
    ConfigError,
    DeadlineExceeded,
    InferenceError,
    TransportClosed,
)
from conveyor.packs import unpack_requests
from conveyor.plan import MODEL_INPUT, Plan, StageInput, StageOutput, StageSpec, TensorSpec
from conveyor.transport import Delivery, Message, Transport
from conveyor.wire import encode
from tests.support.polling import until

X = TensorSpec("x", "float32", ("batch", 4))
Y = TensorSpec("y", "float32", ("batch", 4))


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    directory: Path = tmp_path_factory.mktemp("plan")
    (directory / "s0.onnx").write_bytes(b"the client never reads stage files")
    stage = StageSpec(
        name="s0",
        file="s0.onnx",
        inputs=(StageInput(X, MODEL_INPUT),),
        outputs=(StageOutput(Y, (), model_output=True),),
    )
    return Plan(name="double", opset=17, inputs=(X,), outputs=(Y,), stages=(stage,)).save(
        directory
    )


Reply = Callable[[RequestMeta, dict[str, np.ndarray]], list[Message]]


def doubled(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
    return [reply_ok(meta, encode({"y": inputs["x"] * 2}))]


class Responder:
    """Consumes the plan's input shard and answers each request with ``reply``."""

    def __init__(self, transport: Transport, reply: Reply) -> None:
        self.transport = transport
        self.reply = reply
        self.seen: list[RequestMeta] = []
        self.raw: list[Message] = []
        self.held: list[tuple[RequestMeta, dict[str, np.ndarray]]] = []
        self.max_outstanding = 0
        self.client: Client | None = None

    async def handle(self, delivery: Delivery) -> None:
        self.raw.append(delivery.message)
        if self.client is not None:
            self.max_outstanding = max(self.max_outstanding, self.client.stats().in_flight)
        # One request, or a pack of those sent in the same loop turn (conveyor.packs).
        for meta, views in unpack_requests(delivery.message):
            inputs = {k: np.array(v) for k, v in views.items()}
            for message in self.reply(meta, inputs):
                await self.transport.publish("", message, meta.reply_to or "")
            self.seen.append(meta)
            self.held.append((meta, inputs))
        await delivery.ack()

    async def wait_for(self, count: int) -> None:
        await until(lambda: len(self.seen) >= count, 10,
                    lambda: f"{count} requests at the responder ({len(self.seen)} in)")


@pytest.fixture
async def client(plan: Plan) -> AsyncIterator[Client]:
    async with connect(None, plan=plan, local_workers=False, timeout=5.0) as c:
        yield c


async def attach(client: Client, reply: Reply) -> Responder:
    assert client.broker is not None
    transport = client.broker.connect()
    responder = Responder(transport, reply)
    responder.client = client
    await transport.consume(client.topology.input_queue(0), responder.handle, prefetch=64)
    return responder


def row(i: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), i, dtype=np.float32)}


async def test_infer_returns_outputs_by_name(client: Client) -> None:
    await attach(client, doubled)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = await client.infer({"x": x})
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], x * 2)
    out["y"][0, 0] = -1  # the caller owns its arrays
    assert client.stats().in_flight == 0


async def test_request_carries_the_envelope(client: Client, plan: Plan) -> None:
    responder = await attach(client, doubled)
    before = time.time()
    await client.infer(row(1), timeout=7.0, trace_id="trace-1")
    meta = responder.seen[0]
    assert meta.reply_to == client.reply_queue
    assert meta.plan_hash == plan.hash
    assert meta.trace_id == "trace-1"
    assert meta.deadline is not None and before + 7.0 <= meta.deadline <= time.time() + 7.0
    # A decimal string: AMQP clients turn float headers into 32-bit floats (+-64 s).
    assert isinstance(responder.raw[0].headers["x-conveyor-deadline"], str)


async def test_duplicate_replies_are_dropped(client: Client) -> None:
    def twice(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
        return doubled(meta, inputs) * 2

    await attach(client, twice)
    first = await client.infer(row(1))
    # Replies arrive in order on the one reply queue: once the second request is
    # answered, the first one's duplicate has been handled.
    second = await client.infer(row(2))
    assert first["y"][0, 0] == 2 and second["y"][0, 0] == 4
    assert client.stats().answered == 2
    assert client.stats().dropped_replies >= 1


async def test_timeout_raises_deadline_exceeded_and_late_reply_is_dropped(
    client: Client,
) -> None:
    responder = await attach(client, lambda meta, inputs: [])
    with pytest.raises(DeadlineExceeded, match=r"no reply within 0\.2 s"):
        await client.infer(row(1), timeout=0.2)
    assert client.stats().in_flight == 0
    meta, inputs = responder.held[0]
    assert meta.expired()
    # The late answer reaches the reply queue and is dropped, not delivered anywhere.
    await responder.transport.publish("", doubled(meta, inputs)[0], client.reply_queue)
    responder.reply = doubled
    await client.infer(row(2))
    assert client.stats().dropped_replies == 1


async def test_cancelling_abandons_the_request(client: Client) -> None:
    responder = await attach(client, lambda meta, inputs: [])
    task = asyncio.create_task(client.infer(row(1)))
    await responder.wait_for(1)
    assert client.stats().in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.stats().in_flight == 0
    meta, inputs = responder.held[0]
    await responder.transport.publish("", doubled(meta, inputs)[0], client.reply_queue)
    responder.reply = doubled
    out = await client.infer(row(3))
    assert out["y"][0, 0] == 6
    assert client.stats().dropped_replies == 1


async def test_requests_of_one_loop_turn_travel_as_one_pack(client: Client) -> None:
    responder = await attach(client, doubled)
    outs = await asyncio.gather(*(client.infer(row(i)) for i in range(5)))
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(5)]
    assert [m.type for m in responder.raw] == ["conveyor.pack"]
    assert all(meta.packed_replies for meta in responder.seen)
    stats = client.stats()
    assert (stats.sent, stats.messages_sent, stats.answered) == (5, 1, 5)
    # A request made alone goes as a plain request (what any AMQP client sends).
    await client.infer(row(9))
    assert responder.raw[-1].type is None
    assert RequestMeta.from_message(responder.raw[-1]).packed_replies


async def test_pack_off_sends_one_plain_message_per_request(plan: Plan) -> None:
    async with connect(None, plan=plan, local_workers=False, timeout=5.0, pack=False) as c:
        responder = await attach(c, doubled)
        outs = await asyncio.gather(*(c.infer(row(i)) for i in range(5)))
        assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(5)]
        assert [m.type for m in responder.raw] == [None] * 5
        assert not any(meta.packed_replies for meta in responder.seen)
        assert c.stats().messages_sent == 5


async def test_a_reply_pack_answers_each_request_and_drops_duplicates(client: Client) -> None:
    from conveyor.packs import pack_replies

    responder = await attach(client, lambda meta, inputs: [])
    tasks = [asyncio.create_task(client.infer(row(i))) for i in range(3)]
    await responder.wait_for(3)
    held = responder.held
    # One pack answers all three; the first one is in it twice (a duplicate on the wire).
    order = [held[0], *held]
    reply = pack_replies(
        [(meta.request_id, 1) for meta, _ in order],
        {"y": np.concatenate([inputs["x"] * 2 for _, inputs in order])},
    )
    await responder.transport.publish("", reply, client.reply_queue)
    outs = await asyncio.gather(*tasks)
    assert [o["y"][0, 0] for o in outs] == [0.0, 2.0, 4.0]
    outs[0]["y"][0, 0] = -1  # the caller owns its arrays
    stats = client.stats()
    assert (stats.answered, stats.dropped_replies, stats.reply_messages) == (3, 1, 1)


async def test_a_request_abandoned_before_its_pack_leaves_is_not_sent(client: Client) -> None:
    responder = await attach(client, doubled)
    task = asyncio.create_task(client.infer(row(1)))
    await asyncio.sleep(0)  # it is queued for this turn's pack ...
    task.cancel()  # ... and abandoned before the pack is published
    with pytest.raises(asyncio.CancelledError):
        await task
    out = await client.infer(row(2))
    assert out["y"][0, 0] == 4
    assert [meta.request_id for meta in responder.seen] == [
        m.message_id for m in responder.raw
    ] and len(responder.seen) == 1
    assert client.stats().sent == 1


async def test_error_reply_raises_the_typed_error(client: Client) -> None:
    def fail(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
        return [reply_error(meta, InferenceError("Gemm: shapes do not match", stage="s0"))]

    await attach(client, fail)
    with pytest.raises(InferenceError, match="Gemm: shapes do not match") as info:
        await client.infer(row(1))
    assert info.value.stage == "s0"
    assert client.stats().failed == 1


async def test_deadline_error_reply_raises_deadline_exceeded(client: Client) -> None:
    def late(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
        return [reply_error(meta, DeadlineExceeded("request expired before stage s0"))]

    await attach(client, late)
    with pytest.raises(DeadlineExceeded, match="expired before stage s0"):
        await client.infer(row(1))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((1, 4), np.float64)}, "'x': dtype float64"),
        ({"x": np.zeros((1, 5), np.float32)}, "'x': dimension 1 is 5"),
        ({"x": np.zeros(4, np.float32)}, "'x'.*dimensions"),
        ({}, "'x' is missing"),
        ({"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)}, r"unknown input.*'z'"),
        ({"x": [[0.0] * 4]}, "'x' must be a numpy array"),
    ],
)
async def test_invalid_inputs_raise_codec_error_before_publishing(
    client: Client, inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        await client.infer(inputs)
    assert client.broker is not None
    stats = await client.broker.connect().queue_stats(client.topology.input_queue(0))
    assert stats.depth == 0
    assert client.stats().sent == 0


async def test_infer_many_yields_in_input_order_with_bounded_concurrency(
    client: Client,
) -> None:
    # Answer in reverse order of arrival, four at a time, so order must be restored.
    def reverse_fours(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
        return []

    responder = await attach(client, reverse_fours)

    async def answer_in_fours() -> None:
        answered = 0
        while answered < 20:
            await responder.wait_for(answered + 4)
            group = responder.held[answered : answered + 4]
            for meta, inputs in reversed(group):
                await responder.transport.publish("", doubled(meta, inputs)[0], client.reply_queue)
            answered += 4

    answering = asyncio.create_task(answer_in_fours())
    results = [out["y"][0, 0] async for out in client.infer_many(
        (row(i) for i in range(20)), concurrency=8
    )]
    await answering
    assert results == [2.0 * i for i in range(20)]
    assert responder.max_outstanding <= 8


async def test_infer_many_return_exceptions(client: Client) -> None:
    def odd_fails(meta: RequestMeta, inputs: dict[str, np.ndarray]) -> list[Message]:
        if int(inputs["x"][0, 0]) % 2:
            return [reply_error(meta, InferenceError("odd input"))]
        return doubled(meta, inputs)

    await attach(client, odd_fails)
    got = [r async for r in client.infer_many(
        [row(i) for i in range(6)], concurrency=3, return_exceptions=True
    )]
    assert [isinstance(r, InferenceError) for r in got] == [i % 2 == 1 for i in range(6)]
    with pytest.raises(InferenceError, match="odd input"):
        async for _ in client.infer_many([row(i) for i in range(6)], concurrency=3):
            pass
    assert client.stats().in_flight == 0


async def test_leaving_infer_many_early_cancels_the_rest(client: Client) -> None:
    await attach(client, doubled)
    stream = client.infer_many((row(i) for i in range(100)), concurrency=4)
    async for _ in stream:
        break
    await stream.aclose()
    assert client.stats().in_flight == 0


async def test_client_used_outside_its_context_raises(plan: Plan) -> None:
    c = connect(None, plan=plan, local_workers=False)
    with pytest.raises(ConfigError, match="inside 'async with'"):
        await c.infer(row(1))
    async with c:
        pass
    with pytest.raises(TransportClosed, match="closed"):
        await c.infer(row(1))


async def test_closing_fails_requests_still_awaited(client: Client) -> None:
    responder = await attach(client, lambda meta, inputs: [])
    task = asyncio.create_task(client.infer(row(1)))
    await responder.wait_for(1)
    await client.close()
    with pytest.raises(TransportClosed, match="closed before the reply"):
        await task


async def test_hash_partitioning_needs_a_key(tmp_path: Path, plan: Plan) -> None:
    from conveyor.plan import Partitioning

    hashed = plan.with_settings(partitioning=Partitioning(kind="hash", shards=2))
    (tmp_path / "s0.onnx").write_bytes(b"the client never reads stage files")
    hashed = hashed.save(tmp_path)
    async with connect(None, plan=hashed, local_workers=False) as c:
        with pytest.raises(ConfigError, match="needs a request key"):
            await c.infer(row(1))


async def test_full_queue_raises_backpressure_error(tmp_path: Path, plan: Plan) -> None:
    """A queue on the request's route that is full (reject-publish) refuses the publish."""
    from conveyor.errors import BackpressureError
    from conveyor.plan import Partitioning
    from conveyor.topology import partition_routing_key
    from conveyor.transport import QueueSpec

    (tmp_path / "s0.onnx").write_bytes(b"the client never reads stage files")
    hashed = plan.with_settings(partitioning=Partitioning(kind="hash", shards=1)).save(tmp_path)
    async with connect(None, plan=hashed, local_workers=False, timeout=5.0) as c:
        assert c.broker is not None
        admin = c.broker.connect()
        await admin.declare_queue(QueueSpec("full", max_length=1, overflow="reject-publish"))
        await admin.bind_queue("full", c.topology.input_exchange,
                               partition_routing_key(hashed.partitioning, "k"))
        first = asyncio.create_task(c.infer(row(1), key="k"))  # fills "full"
        # Only the event loop runs in between: no wall-clock wait.
        await until(lambda: c.stats().sent == 1, 10, "the first request to be sent", every=0)
        with pytest.raises(BackpressureError):
            await c.infer(row(2), key="k")
        assert c.stats().in_flight == 1  # only the first one still waits
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert c.stats().in_flight == 0


async def test_unreachable_broker_raises_a_transport_error(plan: Plan) -> None:
    from conveyor.errors import TransportError

    client = connect("amqp://guest:guest@127.0.0.1:1/", plan=plan)
    with pytest.raises(TransportError):
        async with client:
            pass
    assert client.state.value == "closed"


def test_packs_are_cut_by_count_and_bytes_and_unstackable_requests_go_alone() -> None:
    from conveyor.client_packs import (
        PACK_MAX_BYTES,
        PACK_MAX_REQUESTS,
        Outgoing,
        chunks,
        packable,
    )

    loop = asyncio.new_event_loop()
    try:
        def item(nbytes: int) -> Outgoing:
            return Outgoing(RequestMeta("r"), {}, loop.create_future(), nbytes)

        sizes = [len(c) for c in chunks([item(10) for _ in range(PACK_MAX_REQUESTS + 5)])]
        assert sizes == [PACK_MAX_REQUESTS, 5]
        big = PACK_MAX_BYTES // 2 + 1
        assert [len(c) for c in chunks([item(big) for _ in range(3)])] == [1, 1, 1]
        # A request over the limit still goes (alone); one that cannot be stacked too.
        mixed = [item(10), item(-1), item(10), item(PACK_MAX_BYTES * 2), item(10)]
        assert [len(c) for c in chunks(mixed)] == [1, 2, 1, 1]
    finally:
        loop.close()
    assert packable({"a": np.zeros((2, 3), np.float32), "b": np.zeros((2,), np.int64)}) == 40
    assert packable({"a": np.zeros((2, 3)), "b": np.zeros((3,))}) == -1
