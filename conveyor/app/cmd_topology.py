"""``conveyor topology``: the admin step that declares a plan's exchanges, queues and
bindings, so that clients (and workers run with ``--no-declare``) need no configure rights."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from conveyor.app.cmd_serve import add_broker_options
from conveyor.app.transports import BrokerTarget


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "topology",
        help="declare (or --delete) a plan's exchanges, queues and bindings on RabbitMQ",
        description="Declare every exchange, queue and binding of the plan (idempotent; "
        "partition bindings the controller moved are kept). Run it as a user with configure "
        "rights (the admin of `conveyor users`) before the workers and clients start.",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=False)
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="durable exchanges and queues (default; all processes must agree)")
    p.add_argument("--queue-type", choices=("classic", "quorum"), default=None,
                   help="input and stage queues (default: the plan's queues.type, else "
                   "classic); quorum implies --durable")
    p.add_argument("--delete", action="store_true",
                   help="delete the plan's queues and exchanges instead (messages are lost)")
    p.set_defaults(func=cmd_topology)


def cmd_topology(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    target = BrokerTarget.required(args.broker, "topology")
    plan = Plan.load(args.plan)
    return asyncio.run(_run(plan, target, args))


async def _run(plan: Any, target: BrokerTarget, args: argparse.Namespace) -> int:
    from conveyor.topology import Topology
    from conveyor.topology_setup import declare_plan_topology, delete_plan_topology

    transport = await target.connect()
    try:
        if args.delete:
            await delete_plan_topology(transport, plan)
            done = "deleted"
        else:
            await declare_plan_topology(
                transport, plan, durable=args.durable, queue_type=args.queue_type
            )
            done = "declared"
    finally:
        await transport.close(grace=1.0)
    kind = args.queue_type or plan.queues.type or "classic"
    print(f"topology: {done} {Topology.of(plan).base}.* of plan {plan.name} "
          f"({kind} queues) on {target.describe()}", flush=True)
    return 0
