"""The controller killed mid-run: no request is lost, the pipeline keeps the last settings
(prefetch, moved partitions); a restarted controller rebuilds its view from heartbeats and
the retained partition map, and resumes deciding.

On RabbitMQ the first controller is a real ``conveyor controller`` process killed with
SIGKILL; on brokerless (one process by nature) its task is cancelled and its connection
dropped without any orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from conveyor.plan import Partitioning, Plan
from conveyor.topology import hash_partition
from tests.controller.rig import Rig
from tests.controller.test_partitions import keys_on, steady
from tests.support.synthetic import synthetic_plan


def saved_plan(directory: Path) -> Plan:
    plan = synthetic_plan(["s"], partitioning=Partitioning(kind="hash", shards=2),
                          name=f"t{uuid.uuid4().hex[:10]}")
    (directory / "s.onnx").write_bytes(b"not a model: the controller never opens it")
    return plan.save(directory)


async def test_controller_killed_and_restarted(
    rigs: Callable[[Plan], Rig], tmp_path: Path
) -> None:
    plan = saved_plan(tmp_path)
    rig = await rigs(plan).open()
    q0, q1 = rig.topology.input_queue(0), rig.topology.input_queue(1)
    a = await rig.add_worker("a", {"s": 0.01}, ("s",), queues=(q0,), prefetch=50)
    await rig.add_worker("b", {"s": 0.01}, ("s",), queues=(q1,), prefetch=50)
    await rig.add_worker("slow", {"s": 0.04}, ("s",), queues=(q1,), prefetch=50)
    hot, light = keys_on(0, 2), keys_on(1, 2)
    rates = {hot[0]: 60.0, hot[1]: 60.0, light[0]: 10.0, light[1]: 10.0}
    hot_rks = {f"p.{hash_partition(k)}": k for k in hot}

    proc: asyncio.subprocess.Process | None = None
    if rig.handle.kind == "rabbitmq":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor", "controller", str(tmp_path), "--broker",
            str(rig.handle.url), "--policy", "dynamic", "--period", "0.25",
        )
    else:
        first = await rig.controller("dynamic", period=0.25)

    stop = asyncio.Event()
    ids: list[str] = []
    load = asyncio.create_task(steady(rig, rates, stop, ids))

    def prefetch() -> dict[str, int]:
        return {w: next(iter(x.consumers.values()))[1].prefetch for w, x in rig.workers.items()}

    def moved_key() -> str | None:
        """A hot key whose latest three results came from shard 1."""
        for key in hot:
            mine = sorted((rig.done[i] for i in ids if i in rig.done
                           and rig.published[i][1] == key), key=lambda d: d.seq)[-3:]
            if len(mine) == 3 and all(d.workers[0] in ("b", "slow") for d in mine):
                return key
        return None

    try:
        await rig.wait_for(lambda: prefetch()["slow"] <= 10 and moved_key() is not None,
                           limit=30, what="the first controller's prefetch and partition move")
        # kill it
        if proc is not None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        else:
            await rig.kill_controller(first)
        settings = prefetch()
        key = moved_key()
        assert key is not None
        killed_at = len(ids)
        await rig.wait_for(lambda: len(ids) >= killed_at + 150, limit=15,
                           what="traffic after the kill")
        await rig.all_done(ids[: killed_at + 150], limit=30)
        # the pipeline kept the last settings while no controller ran
        assert prefetch() == settings
        after = [rig.done[i] for i in ids[killed_at: killed_at + 150]
                 if rig.published[i][1] == key]
        assert after and all(d.workers[0] in ("b", "slow") for d in after)

        # restart: the view comes from heartbeats and the retained map, not from memory
        second = await rig.controller("dynamic", period=0.25)
        await rig.wait_for(lambda: set(second.workers) == {"a", "b", "slow"}, limit=10,
                           what="the restarted controller to see the workers")
        assert second.metrics["partition_map_loaded"] == 1 and second.epoch >= 1
        moved_rk = next(rk for rk, k in hot_rks.items() if k == key)
        assert second.partitions[moved_rk] == q1
        # ... and it resumes: worker "a" slows down 3x, its prefetch follows
        # (the target is ceil(33 x 0.2) = 7; the deadband may stop it a step or two above)
        before = prefetch()["a"]
        a.slowdown = 3.0
        await rig.wait_for(lambda: prefetch()["a"] <= 0.6 * before, limit=15,
                           what=f"the restarted controller to lower a's prefetch from {before}")
    finally:
        stop.set()
        await load
        if proc is not None and proc.returncode is None:
            proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
    await rig.all_done(ids, limit=60)
    assert len(rig.done) == len(ids) and rig.duplicates == 0  # no request lost
    print(f"\n[{rig.handle.kind}] key {key} stayed on shard 1 after the kill; restarted "
          f"controller resumed at epoch {second.epoch}; metrics {second.metrics_line()}")
