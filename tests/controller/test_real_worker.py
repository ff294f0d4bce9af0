"""The real stage worker under the controller: heartbeats carry its real figures, the
controller's prefetch and stop/start commands reach its consumers, and every request is
still answered correctly (both transports)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from conveyor.control import Command, CommandKind, Controllable
from conveyor.errors import ConveyorError
from conveyor.topology import Topology
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
from workers.control.agent import ControlAgent
from workers.control.controller import Controller
from workers.control.policies import PolicyConfig
from workers.stage_worker import StageWorker


async def test_real_workers_obey_the_controller(broker: BrokerHandle, tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, 3, name=f"ctl{broker.prefix.replace('.', '')}")
    topo = Topology.of(plan)
    workers: list[StageWorker] = []
    agents: list[ControlAgent] = []
    client = await Harness(await broker.connect(), plan).open()
    controller: Controller | None = None
    try:
        for stage in ("s0", "s1", "s2"):
            t = await broker.connect()
            w = StageWorker(plan, t, [stage], worker_id=f"real-{stage}")
            await w.start()
            assert isinstance(w, Controllable)  # the worker implements the control contract
            agent = ControlAgent(t, topo, w, w.worker_id, period=0.2)
            await agent.start()
            workers.append(w)
            agents.append(agent)
        controller = Controller(await broker.connect(), plan,
                                # a long horizon: any rate this machine reaches, loaded
                                # or not, is worth the upper bound
                                PolicyConfig.from_plan(plan, "dynamic", prefetch_max=48,
                                                       horizon_s=10.0),
                                period=0.25, report_every=0)
        await controller.start()

        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(200)]
        ids = [await client.send({"x": x}) for x in xs]
        await client.wait_for(ids, within=30)
        for rid, x in zip(ids, xs, strict=True):
            got = client.one(rid)
            assert not isinstance(got, ConveyorError), got
            np.testing.assert_allclose(got["y"], chain_expected(x), rtol=1e-5)

        # heartbeats carry the real worker's figures
        c = controller
        await until(lambda: len(c.workers) == 3 and all(
            st.requests > 0 for hb in c.workers.values() for st in hb.stats.stages),
            timeout=10, what="heartbeats with figures from all three workers")
        hb0 = c.workers["real-s0"]
        assert hb0.stats.consuming[0].queue == topo.input_queue(0)
        assert hb0.stats.consuming[0].stage == "s0"
        assert "ExecutionProvider" in hb0.stats.provider
        assert hb0.stats.stages[0].service_s_per_request > 0

        # prefetch: sub-millisecond stages are worth the upper bound (48) from 32
        def prefetches() -> list[int]:
            return [cs.prefetch for w in workers for cs in w.stats().consumers]

        await until(lambda: prefetches() == [48, 48, 48], timeout=20,
                    what=f"prefetch 48 on every consumer (have {prefetches()})")
        assert c.metrics["prefetch_changes"] >= 3

        # stop / start consuming through commands, answered in heartbeats
        w1 = workers[1]
        stop = Command("stop-1", "real-s1", CommandKind.STOP_CONSUMING, stage="s1")
        await c.send(stop)
        await until(lambda: not w1.stats().consumers[0].consuming, timeout=10,
                    what="s1 to stop consuming")
        held = [await client.send({"x": x}) for x in xs[:20]]
        await until(lambda: "stop-1" not in c.pending, timeout=10, what="the stop to be acked")
        assert not any(rid in client.replies for rid in held)  # s1 holds them in its queue
        await c.send(Command("start-1", "real-s1", CommandKind.START_CONSUMING, stage="s1"))
        await client.wait_for(held, within=30)
        bad = Command("bad-1", "real-s1", CommandKind.START_CONSUMING, stage="s0")
        await c.send(bad)
        await until(lambda: "bad-1" not in c.pending, timeout=10, what="the refusal")
        assert c.metrics["commands_failed"] == 1
    finally:
        if controller is not None:
            await controller.stop()
        for agent in agents:
            await agent.stop()
        for w in workers:
            await w.stop(grace=1.0)
        await client.close()


@pytest.mark.rabbitmq
async def test_conveyor_worker_process_reports_and_obeys(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    """``conveyor worker`` runs a control agent: its heartbeats reach the controller and
    the controller's prefetch reaches its consumer (a separate process on RabbitMQ)."""
    from workers.amqp import AmqpTransport

    plan = chain_plan(tmp_path, 1, name=f"ctlproc{uuid.uuid4().hex[:8]}")
    transport = await AmqpTransport.connect(rabbitmq_url)
    client = await Harness(transport, plan).open()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "worker", str(tmp_path), "--stage", "s0",
        "--broker", rabbitmq_url, "--device", "cpu", env=env,
    )
    controller = Controller(transport, plan,
                            PolicyConfig.from_plan(plan, "dynamic", prefetch_max=40),
                            period=0.25, report_every=0)
    await controller.start()
    try:
        await until(lambda: len(controller.workers) == 1, timeout=30,
                    what="a heartbeat from the worker process")
        x = np.ones((1, 4), np.float32)
        ids = [await client.send({"x": x}) for _ in range(50)]
        await client.wait_for(ids, within=30)

        def prefetch() -> list[int]:
            hb = next(iter(controller.workers.values()))
            return [c.prefetch for c in hb.stats.consuming]

        await until(lambda: prefetch() == [40], timeout=15,
                    what=f"the worker's prefetch to reach 40 (has {prefetch()})")
        await until(lambda: controller.metrics["commands_acked"] >= 1, timeout=10,
                    what="the worker's acknowledgement")
    finally:
        await controller.stop()
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        await client.close()
        await transport.close(grace=1.0)
