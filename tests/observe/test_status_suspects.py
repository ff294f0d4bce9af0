"""``conveyor status`` shows what waits in each stage's suspect queues (messages whose
worker died, run one at a time: workers.redelivery), on both brokers."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from conveyor.app.cmd_status import render, sample
from conveyor.app.status import compare
from conveyor.app.transports import BrokerTarget
from conveyor.topology import Topology
from conveyor.topology_setup import declare_plan_topology, stage_queues
from conveyor.transport import Message
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_plan


async def test_suspects_waiting_are_counted_per_stage(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    first, second = plan.stages
    transport = await broker.connect()
    try:
        await declare_plan_topology(transport, plan)
        topology = Topology.of(plan)
        (queue,) = stage_queues(plan, second)
        for _ in range(3):  # what a worker's guard moves there after deaths
            await transport.publish("", Message(b"suspect"), topology.suspect_queue(queue))
        before = await sample(plan, transport, [])
        after = await sample(plan, transport, [])
    finally:
        await transport.close()
    assert before[second.name].suspects == 3 and before[first.name].suspects == 0
    rows = compare(plan, before, after, 1.0)
    assert [r.suspects for r in rows] == [0, 3]
    out = io.StringIO()
    Console(file=out, width=200).print(render(plan, BrokerTarget(None), rows))
    text = out.getvalue()
    assert "suspects" in text
    assert any(second.name in line and " 3 " in line for line in text.splitlines()), text
