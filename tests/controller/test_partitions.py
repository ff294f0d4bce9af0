"""Skewed hash partitions: a hot key range is moved from the overloaded input shard to the
lighter one, and requests with the same key reach one shard at any moment."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from conveyor.plan import Partitioning, Plan
from conveyor.topology import PARTITIONS, hash_partition
from conveyor.topology_setup import declare_plan_topology
from tests.controller.rig import Rig
from tests.support.synthetic import synthetic_plan
from workers.control.policies import MovePartition


def keys_on(shard: int, count: int, shards: int = 2) -> list[str]:
    """``count`` keys in distinct partitions initially bound to ``shard``."""
    out: list[str] = []
    seen: set[int] = set()
    for i in itertools.count():
        k = f"user-{i}"
        p = hash_partition(k)
        if p % shards == shard and p not in seen:
            seen.add(p)
            out.append(k)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")


async def steady(rig: Rig, rates: dict[str, float], stop: asyncio.Event, ids: list[str]) -> None:
    """Publish each key at its rate (requests/s) until ``stop`` is set."""
    tick = 0.02
    owed = dict.fromkeys(rates, 0.0)
    while not stop.is_set():
        for key, r in rates.items():
            owed[key] += r * tick
            n = int(owed[key])
            owed[key] -= n
            if n:
                ids += await rig.publish(n, key=key)
        await asyncio.sleep(tick)  # load generation pace, not synchronisation


def shard_of(rig: Rig, rid: str) -> str:
    return rig.done[rid].workers[0]  # worker "a" serves shard 0, "b" shard 1


async def test_hot_partition_moves_to_the_lighter_shard(rigs: Callable[[Plan], Rig]) -> None:
    plan = synthetic_plan(["s"], partitioning=Partitioning(kind="hash", shards=2))
    rig = await rigs(plan).open()
    q0, q1 = rig.topology.input_queue(0), rig.topology.input_queue(1)
    await rig.add_worker("a", {"s": 0.01}, ("s",), queues=(q0,), prefetch=10)
    await rig.add_worker("b", {"s": 0.01}, ("s",), queues=(q1,), prefetch=10)
    c = await rig.controller("dynamic", period=0.25, confirm_periods=2, partition_dwell_s=30.0)
    hot = keys_on(0, 2)
    light = keys_on(1, 2)
    # shard 0 gets 2 x 60 req/s against a capacity of ~100; shard 1 gets 2 x 10
    rates = {hot[0]: 60.0, hot[1]: 60.0, light[0]: 10.0, light[1]: 10.0}
    stop = asyncio.Event()
    ids: list[str] = []
    load = asyncio.create_task(steady(rig, rates, stop, ids))
    try:
        await rig.wait_for(lambda: c.metrics["partition_moves"] >= 1, limit=30,
                           what="a partition move")
        moved_at = len(ids)
        await rig.wait_for(lambda: len(ids) >= moved_at + 100, limit=10,
                           what="traffic after the move")
    finally:
        stop.set()
        await load
    await rig.all_done(ids, limit=30)

    moves = [d.decision for d in c.decisions if isinstance(d.decision, MovePartition)]
    first = moves[0]
    hot_partitions = {f"p.{hash_partition(k)}" for k in hot}
    assert first.routing_key in hot_partitions
    assert (first.from_queue, first.to_queue) == (q0, q1)
    assert c.partitions[first.routing_key] == q1
    assert len(c.partitions) == PARTITIONS
    moved_key = next(k for k in hot if f"p.{hash_partition(k)}" == first.routing_key)

    # same key -> one shard at any moment: in publish order, each key's shard changes at
    # most once per move of its partition, and never goes back
    for key in rates:
        by_seq = sorted((rig.done[i] for i in ids if rig.published[i][1] == key),
                        key=lambda d: d.seq)
        shards = [d.workers[0] for d in by_seq]
        switches = sum(1 for x, y in itertools.pairwise(shards) if x != y)
        assert switches == (1 if key == moved_key else 0), (key, switches)
    assert shard_of(rig, max(
        (i for i in ids if rig.published[i][1] == moved_key), key=lambda i: rig.published[i][0]
    )) == "b"
    assert rig.duplicates == 0 and len(rig.done) == len(ids)
    print(f"\n[{rig.handle.kind}] {first.routing_key} moved: {first.reason}; "
          f"{rig.unroutable_retries} publishes retried in the move gap")


async def test_stray_binding_is_removed_when_a_worker_restarts(
    rigs: Callable[[Plan], Rig],
) -> None:
    """A topology setup run elsewhere (a restarted worker, an old client) binds a moved key
    back to its initial shard; the controller re-applies its map when it sees the new
    worker incarnation, so the key again reaches one shard only."""
    plan = synthetic_plan(["s"], partitioning=Partitioning(kind="hash", shards=2))
    rig = await rigs(plan).open()
    q0, q1 = rig.topology.input_queue(0), rig.topology.input_queue(1)
    await rig.add_worker("a", {"s": 0.001}, ("s",), queues=(q0,))
    await rig.add_worker("b", {"s": 0.001}, ("s",), queues=(q1,))
    c = await rig.controller("dynamic", period=0.2)
    (key,) = keys_on(0, 1)
    rk = f"p.{hash_partition(key)}"
    await c.move_partition(MovePartition(rk, q0, q1, "test: move by hand"), 0.0)
    ids = await rig.publish(10, key=key)
    await rig.all_done(ids, limit=10)
    assert {shard_of(rig, i) for i in ids} == {"b"}

    await rig.admin.bind_queue(q0, rig.topology.input_exchange, rk)  # the stray binding
    before = c.metrics["partition_reconciles"]
    await rig.add_worker("a2", {"s": 0.001}, ("s",), queues=(q0,))  # a new incarnation
    await rig.wait_for(lambda: c.metrics["partition_reconciles"] > before, limit=10,
                       what="the controller to re-apply its partition map")
    ids = await rig.publish(20, key=key)
    await rig.all_done(ids, limit=10)
    assert {shard_of(rig, i) for i in ids} == {"b"} and rig.duplicates == 0


async def test_topology_setup_does_not_undo_a_move(rigs: Callable[[Plan], Rig]) -> None:
    """Workers and clients re-run the topology setup at start; once the shard queues exist
    it leaves the hash keys' bindings to the controller."""
    plan = synthetic_plan(["s"], partitioning=Partitioning(kind="hash", shards=2))
    rig = await rigs(plan).open()
    q0, q1 = rig.topology.input_queue(0), rig.topology.input_queue(1)
    await rig.add_worker("a", {"s": 0.001}, ("s",), queues=(q0,))
    await rig.add_worker("b", {"s": 0.001}, ("s",), queues=(q1,))
    c = await rig.controller("static", period=0.2)
    (key,) = keys_on(0, 1)
    rk = f"p.{hash_partition(key)}"
    await c.move_partition(MovePartition(rk, q0, q1, "test: move by hand"), 0.0)
    await c.stop()
    await declare_plan_topology(rig.admin, plan)  # what a restarting worker does
    ids = await rig.publish(20, key=key)
    await rig.all_done(ids, limit=10)
    assert {shard_of(rig, i) for i in ids} == {"b"} and rig.duplicates == 0
