"""Checks a client makes before it waits on a broker: is anyone there to answer?

A request published to an input queue that no worker consumes waits until its timeout
and looks exactly like a slow pipeline. ``no_consumer_message`` says so at once, naming
the commands that start a consumer; the SDK warns once (``Client(on_no_consumer="warn")``,
the default), ``conveyor infer`` fails with ``NoConsumerError``.
"""

from __future__ import annotations

from typing import Literal

from conveyor.errors import TransportError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.transport import Transport

#: What a client does when no worker consumes the plan's input: warn once, fail, or nothing.
NoConsumerPolicy = Literal["warn", "fail", "off"]


async def no_consumer_message(transport: Transport, plan: Plan) -> str | None:
    """Why requests to ``plan`` would wait for nothing, or None when a worker consumes
    (or the broker cannot say)."""
    topo = Topology.of(plan)
    queues = [topo.input_queue(i) for i in range(plan.partitioning.shards)]
    try:
        consumers = [(await transport.queue_stats(q)).consumers for q in queues]
    except TransportError:
        return None  # cannot tell (no permission, say): do not stand in the way
    if any(consumers):
        return None
    where = plan.directory or "PLAN_DIR"
    return (
        f"no worker consumes the input queue(s) {queues} of plan {plan.name!r}: requests "
        f"would wait for their timeout. Start one: `conveyor worker {where} --stage "
        f"{plan.stages[0].name} --broker URL` (one per stage), or `conveyor run {where} "
        "--broker URL` (all stages in one process)"
    )
