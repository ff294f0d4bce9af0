"""Data partitioning of requests over the input shards, on both brokers.

``declare_plan_topology`` binds the input exchange to the shard queues; the publisher picks
the routing key (``partition_routing_key``). These tests publish through the real exchange
types (x-random, direct) and read back which shard queue each message reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from conveyor.envelope import RequestMeta
from conveyor.plan import Partitioning, Plan
from conveyor.topology import Topology, partition_routing_key
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology
from conveyor.transport import Delivery, Transport
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from workers import serve
from workers.settings import WorkerSettings


class ShardReader:
    """Consumes every input shard queue of a plan and records which shard got which id."""

    def __init__(self, transport: Transport, plan: Plan) -> None:
        self.transport = transport
        self.plan = plan
        self.shard_of: dict[str, list[int]] = {}

    async def start(self) -> None:
        topo = Topology.of(self.plan)
        for shard in range(self.plan.partitioning.shards):
            queue = topo.input_queue(shard)
            await self.transport.consume(queue, self._handler(shard), prefetch=500)

    def _handler(self, shard: int):  # type: ignore[no-untyped-def]
        async def handle(delivery: Delivery) -> None:
            self.shard_of.setdefault(delivery.message.message_id or "?", []).append(shard)
            await delivery.ack()

        return handle

    async def publish(self, request_id: str, key: str | None) -> None:
        topo = Topology.of(self.plan)
        message = RequestMeta(request_id, key=key).to_message(b"")
        routing_key = partition_routing_key(self.plan.partitioning, key)
        await self.transport.publish(topo.input_exchange, message, routing_key)

    def received(self) -> int:
        return sum(map(len, self.shard_of.values()))

    async def wait(self, count: int) -> None:
        await until(lambda: self.received() >= count, 20,
                    lambda: f"{count} requests on the shards ({self.received()} in)")


@pytest.fixture
async def reader_for(broker: BrokerHandle) -> AsyncIterator[list[ShardReader]]:
    made: list[ShardReader] = []
    yield made
    for r in made:
        with contextlib.suppress(Exception):
            await delete_plan_topology(r.transport, r.plan)


async def _reader(broker: BrokerHandle, made: list[ShardReader], plan: Plan) -> ShardReader:
    transport = await broker.connect()
    await declare_plan_topology(transport, plan)
    reader = ShardReader(transport, plan)
    made.append(reader)
    await reader.start()
    return reader


async def test_random_partitioning_spreads_over_every_shard(
    broker: BrokerHandle, reader_for: list[ShardReader], tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, k=1, name=unique, partitioning=Partitioning("random", shards=4))
    reader = await _reader(broker, reader_for, plan)
    for i in range(200):
        await reader.publish(f"r{i}", None)
    await reader.wait(200)
    counts = np.bincount([s for shards in reader.shard_of.values() for s in shards], minlength=4)
    # (3/4)^200: the chance that a fair random exchange leaves a shard empty is ~1e-25.
    assert (counts > 0).all(), counts
    assert all(len(s) == 1 for s in reader.shard_of.values())


async def test_hash_partitioning_keeps_a_key_on_one_shard(
    broker: BrokerHandle, reader_for: list[ShardReader], tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, k=1, name=unique, partitioning=Partitioning("hash", shards=3))
    reader = await _reader(broker, reader_for, plan)
    keys = [f"user-{i}" for i in range(60)]
    for round_ in range(3):
        for key in keys:
            await reader.publish(f"{key}/{round_}", key)
    await reader.wait(3 * len(keys))
    by_key: dict[str, set[int]] = {}
    for rid, shards in reader.shard_of.items():
        by_key.setdefault(rid.split("/")[0], set()).update(shards)
    assert all(len(s) == 1 for s in by_key.values()), "a key reached two shards"
    used = {next(iter(s)) for s in by_key.values()}
    assert used == {0, 1, 2}, "60 keys should land on every one of 3 shards"


async def test_range_partitioning_respects_the_boundaries(
    broker: BrokerHandle, reader_for: list[ShardReader], tmp_path: Path, unique: str
) -> None:
    part = Partitioning("range", shards=3, boundaries=(10.0, 20.0))
    plan = chain_plan(tmp_path, k=1, name=unique, partitioning=part)
    reader = await _reader(broker, reader_for, plan)
    # shard i takes boundaries[i-1] <= v < boundaries[i]
    cases = {"-5": 0, "0": 0, "9.99": 0, "10": 1, "15": 1, "19.999": 1, "20": 2, "1e9": 2}
    for value in cases:
        await reader.publish(f"v{value}", value)
    await reader.wait(len(cases))
    assert {rid[1:]: shards for rid, shards in reader.shard_of.items()} == {
        v: [s] for v, s in cases.items()
    }


async def test_a_worker_with_a_shard_serves_only_that_shard(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(
        chain_plan(
            tmp_path, k=2, name=unique, partitioning=Partitioning("hash", shards=2)
        ).directory
    )
    client = await Harness(await broker.connect(), plan).open()
    worker = await serve(plan, await broker.connect(), None, "cpu", WorkerSettings(shard=1))
    try:
        topo = Topology.of(plan)
        assert topo.input_queue(1) in worker.queues and topo.input_queue(0) not in worker.queues
        keys = [f"k{i}" for i in range(40)]
        x = np.ones((1, 4), np.float32)
        sent = {key: await client.send({"x": x}, key=key) for key in keys}
        on_one = [
            sent[k]
            for k in keys
            if partition_routing_key(plan.partitioning, k) in {f"p.{p}" for p in range(1, 64, 2)}
        ]
        await client.wait_for(on_one)
        for rid in on_one:
            result = client.one(rid)
            assert not isinstance(result, Exception)
            np.testing.assert_allclose(result["y"], chain_expected(x, 2), rtol=1e-6)
        assert worker.stats().stages[0].requests == len(on_one)
        stats = await client.transport.queue_stats(topo.input_queue(0))
        assert stats.depth == len(keys) - len(on_one)
    finally:
        await worker.stop(grace=1.0)
        await client.close()
