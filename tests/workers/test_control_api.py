"""The worker's control surface (what the controller's agent drives): snapshot and commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brokerless import Broker
from conveyor.control import Controllable
from conveyor.errors import ConfigError
from conveyor.plan import Plan
from conveyor.topology import Topology
from tests.support.pipeline import Harness
from tests.support.plans import chain_plan
from workers.stage_worker import StageWorker


async def test_snapshot_commands_and_a_flexible_stage(tmp_path: Path) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=2, max_delay_ms=0).directory)
    topo = Topology.of(plan)
    broker = Broker()
    client = await Harness(broker.connect(), plan).open()
    # Hosts s1 too but consumes only s0's input at first (a flexible worker).
    worker = StageWorker(plan, broker.connect(), ["s0", "s1"], home=["s0"])
    assert isinstance(worker, Controllable)
    async with worker:
        snap = worker.snapshot()
        assert snap.stages_available == ("s0", "s1") and snap.home_stages == ("s0",)
        assert [c.queue for c in snap.consuming] == [topo.input_queue(0)]
        assert snap.provider == "CPUExecutionProvider"

        rid = await client.send({"x": np.ones((1, 4), np.float32)})
        await client.wait_for([rid])  # s1 is local: the in-memory path needs no consumer
        assert worker.snapshot().stage("s0").requests == 1  # type: ignore[union-attr]
        assert worker.snapshot().routing_keys == {"": 1}

        await worker.start_consuming("s1")
        assert {c.queue for c in worker.snapshot().consuming} == {
            topo.input_queue(0),
            topo.stage_queue("s1"),
        }
        await worker.set_prefetch(topo.stage_queue("s1"), 3)
        assert {c.queue: c.prefetch for c in worker.snapshot().consuming}[
            topo.stage_queue("s1")
        ] == 3
        await worker.stop_consuming("s1")
        assert [c.queue for c in worker.snapshot().consuming] == [topo.input_queue(0)]

        with pytest.raises(ConfigError, match="not loaded"):
            await worker.start_consuming("nope")
        with pytest.raises(ConfigError, match="not a queue"):
            await worker.start_consuming("s1", topo.input_queue(0))
    assert worker.state.value == "stopped"
    await client.close()
