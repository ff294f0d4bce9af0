"""A worker's command queue does not outlive it: the controller deletes the queue of a
worker it declares lost when nobody consumes it (a crash leaves it behind), and an agent
whose queue was deleted while it lived makes it again and obeys commands (both
transports)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import pytest

from conveyor.control import Command, CommandKind
from conveyor.errors import TransportError
from conveyor.plan import Plan
from tests.controller.rig import Rig
from tests.support.synthetic import synthetic_plan
from workers.control.agent import command_queue


async def crash(rig: Rig, worker_id: str) -> None:
    """Like a killed worker process: heartbeats stop and its connection drops; nothing
    is cleaned up in order."""
    agent = rig.agents.pop(worker_id)
    worker = rig.workers.pop(worker_id)
    assert agent._task is not None
    agent._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await agent._task
    await worker.transport.close(grace=0)


async def queue_exists(rig: Rig, queue: str) -> bool:
    try:
        await rig.admin.queue_stats(queue)
    except TransportError:
        return False
    return True


async def test_a_crashed_workers_command_queue_is_deleted(rigs: Callable[[Plan], Rig]) -> None:
    rig = await rigs(synthetic_plan(["s"], name=f"cq{uuid.uuid4().hex[:8]}")).open()
    await rig.add_worker("stays", {"s": 0.001}, ("s",))
    await rig.add_worker("dies", {"s": 0.001}, ("s",))
    c = await rig.controller("dynamic", period=0.25)
    await rig.wait_for(lambda: set(c.workers) == {"stays", "dies"}, limit=10,
                       what="both workers' heartbeats")
    dead_q = command_queue(rig.topology, "dies")
    assert (await rig.admin.queue_stats(dead_q)).consumers == 1

    await crash(rig, "dies")
    assert await queue_exists(rig, dead_q)  # left behind by the crash
    await rig.wait_for(lambda: c.metrics["command_queues_deleted"] >= 1, limit=10,
                       what="the lost worker's command queue to be deleted")
    assert not await queue_exists(rig, dead_q)
    assert set(c.workers) == {"stays"} and c.metrics["workers_lost"] == 1
    assert await queue_exists(rig, command_queue(rig.topology, "stays"))


async def test_agent_makes_its_deleted_command_queue_again(
    rigs: Callable[[Plan], Rig],
) -> None:
    rig = await rigs(synthetic_plan(["s"], name=f"cq{uuid.uuid4().hex[:8]}")).open()
    worker = await rig.add_worker("w", {"s": 0.001}, ("s",), period=0.1)
    agent = rig.agents["w"]
    c = await rig.controller("static", period=0.25)
    queue = next(iter(worker.consumers))
    # the static baseline (the plan's prefetch 32) reaches the worker first
    await rig.wait_for(lambda: worker.consumers[queue][1].prefetch == 32 and not c.pending,
                       limit=10, what="the static baseline to be applied")
    acked = c.metrics["commands_acked"]

    await rig.admin.delete_queue(agent.queue)  # what a controller does to a lost worker
    await rig.wait_for(lambda: agent.queue_recreated >= 1, limit=10,
                       what="the agent to declare its command queue again")
    await c.send(Command(uuid.uuid4().hex[:16], "w", CommandKind.SET_PREFETCH,
                         queue=queue, prefetch=7))
    await rig.wait_for(lambda: not c.pending, limit=10, what="the command to be acknowledged")
    assert c.metrics["commands_acked"] == acked + 1
    assert worker.consumers[queue][1].prefetch == 7


@pytest.mark.parametrize("every", [0, -1])
def test_queue_check_interval_is_validated(every: int) -> None:
    from conveyor.errors import ConfigError
    from conveyor.topology import Topology
    from workers.control.agent import ControlAgent

    plan = synthetic_plan(["s"])
    with pytest.raises(ConfigError, match="queue_check_every"):
        ControlAgent(None, Topology.of(plan), None, "w", queue_check_every=every)  # type: ignore[arg-type]
