"""Skewed hash partitions with real stage-0 workers (onnxruntime) on two input shards: the
controller moves a hot partition to the lighter shard; requests with one key reach one
shard at any moment, and every request is answered once, correctly (both transports)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np

from conveyor.plan import Partitioning
from conveyor.topology import hash_partition
from tests.controller.real_rig import RealPool, assert_answered_once
from tests.controller.test_partitions import keys_on
from tests.support.brokers import BrokerHandle
from tests.support.plans import WholeModel, weighted_chain_plan
from tests.support.polling import until
from workers.control.policies import MovePartition

#: One stage that lifts each row to 1024 columns and multiplies it 200 times by an identity:
#: about 35 ms a request, so a shard serves ~30 req/s, a load the test's one event loop
#: generates and serves with room to spare on a busy machine. Batches of one, so a
#: request costs the same on a busy shard (full batches) and on a quiet one, and the
#: measured capacities compare.
HEAVY = {0: (1024, 200)}


async def steady(pool: RealPool, rates: dict[str, float], stop: asyncio.Event,
                 xs: dict[str, np.ndarray], seed: int) -> None:
    """Publish each key at its rate (requests/s), one confirmed publish at a time (so the
    publish order is the order the broker routed them in), until ``stop`` is set."""
    rng = np.random.default_rng(seed)
    tick = 0.02
    owed = dict.fromkeys(rates, 0.0)
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        for key, r in rates.items():
            owed[key] += r * tick
            while owed[key] >= 1:
                owed[key] -= 1
                x = rng.standard_normal((1, 4)).astype(np.float32)
                xs[await pool.send(x, key=key)] = x
        # load generation pace, not synchronisation
        await asyncio.sleep(max(0.0, tick - (loop.time() - started)))


async def test_real_hot_partition_moves_to_the_lighter_shard(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    plan = weighted_chain_plan(tmp_path, 1, HEAVY, name=f"rp{broker.prefix.replace('.', '')}",
                               max_batch=1, partitioning=Partitioning(kind="hash", shards=2))
    pool = await RealPool(broker, plan).open()
    assert pool.client is not None
    q0, q1 = pool.topology.input_queue(0), pool.topology.input_queue(1)
    whole = WholeModel(plan)
    xs: dict[str, np.ndarray] = {}
    hot, light = keys_on(0, 2), keys_on(1, 2)
    try:
        await pool.add_worker("a", ["s0"], shard=0)
        await pool.add_worker("b", ["s0"], shard=1)
        c = await pool.start_controller("dynamic", period=0.25, confirm_periods=2,
                                        partition_dwell_s=60.0)
        # measure both workers first: the load below is set from their capacity
        stop = asyncio.Event()
        warm = asyncio.create_task(steady(pool, dict.fromkeys(hot + light, 5.0), stop, xs, 1))

        def capacities() -> list[float]:
            out = []
            for w in ("a", "b"):
                hb = c.workers.get(w)
                st = hb.stats.stage("s0") if hb is not None else None
                out.append(st.capacity_rps if st is not None else 0.0)
            return out

        try:
            await until(lambda: min(capacities()) > 0 and len(xs) >= 40, 20,
                        lambda: f"both workers measured (capacities {capacities()})")
        finally:
            stop.set()
            await warm
        await pool.client.wait_for(list(xs), within=30)
        cap = min(capacities())
        assert [c.partitions[f"p.{hash_partition(k)}"] for k in hot + light] == [q0, q0, q1, q1]

        # shard 0 gets two keys at 0.7 x its capacity each (1.4 x in all), shard 1 two at
        # 0.1; a worker's measured capacity drifts with the machine's load, so the hot keys
        # grow by a fifth every half second until the shard is seen overloaded
        rates = {hot[0]: 0.7 * cap, hot[1]: 0.7 * cap, light[0]: 0.1 * cap,
                 light[1]: 0.1 * cap}
        stop = asyncio.Event()
        load = asyncio.create_task(steady(pool, rates, stop, xs, 2))

        async def ramp() -> None:
            while c.metrics["partition_moves"] == 0 and rates[hot[0]] < 2 * max(capacities()):
                await asyncio.sleep(0.5)  # load generation pace, not synchronisation
                for k in hot:
                    rates[k] *= 1.2

        ramping = asyncio.create_task(ramp())
        try:
            await until(lambda: c.metrics["partition_moves"] >= 1, 20,
                        lambda: f"a partition move (metrics {c.metrics_line()}, capacities "
                                f"{capacities()}, rates {rates})")
            moved_at = len(xs)
            await until(lambda: len(xs) >= moved_at + 60, 20, "traffic after the move")
        finally:
            stop.set()
            await load
            await ramping
        ids = list(xs)
        await pool.client.wait_for(ids, within=60)

        moves = [d.decision for d in c.decisions if isinstance(d.decision, MovePartition)]
        first = moves[0]
        assert first.routing_key in {f"p.{hash_partition(k)}" for k in hot}
        assert (first.from_queue, first.to_queue) == (q0, q1)
        assert c.partitions[first.routing_key] == q1

        # every request answered once, with what the whole model computes
        assert_answered_once(pool, ids, whole(np.concatenate([xs[i] for i in ids])))
        assert pool.client.dead == []

        # same key -> one shard at any moment: in publish order, a key's shard changes
        # once per move of its partition and never goes back (a move made after the key's
        # last request shows in no path: a prefix of the moves is what a key can show)
        shard_of: dict[str, str] = {}
        for s in pool.seen:
            if s.queue in (q0, q1):
                shard_of.setdefault(s.request_id, s.queue)
        assert set(ids) <= set(shard_of)
        for key in rates:
            rk = f"p.{hash_partition(key)}"
            in_order = sorted((i for i in ids if pool.sent[i][0] == key),
                              key=lambda i: pool.sent[i][1])
            shards = [shard_of[i] for i in in_order]
            path = [q for q, _ in itertools.groupby(shards)]
            planned = [q0 if key in hot else q1] + [m.to_queue for m in moves
                                                     if m.routing_key == rk]
            assert path == planned[: len(path)], (key, path, planned)
            if rk == first.routing_key:  # 60 requests went out after the first move
                assert path[-1] == q1, (key, path)
        print(f"\n[{broker.kind}] real shards: capacity {cap:.0f} req/s; {first.routing_key} "
              f"moved: {first.reason}; {len(ids)} requests, {pool.unroutable_retries} "
              f"publishes retried in the move gap; {c.metrics_line()}")
    finally:
        await pool.close()
