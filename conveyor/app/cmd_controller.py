"""``conveyor controller``: run the scheduler of a plan against a RabbitMQ broker.

Light at import: aio-pika loads inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from conveyor.app.cmd_serve import add_broker_options, add_metrics_option, add_persistent_option
from conveyor.app.observe import ObserveServer, broker_check, metrics_port
from conveyor.app.transports import BrokerTarget
from conveyor.errors import ConfigError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "controller",
        help="schedule a running pipeline: prefetch, flexible workers, partitions",
        description=(
            "Reads worker heartbeats and queue depths every period and applies the chosen "
            "policy (docs/scheduling.md). static: the plan's prefetch once, then reports; "
            "dynamic: prefetch by measured rate, flexible workers to backlogged stages, hot "
            "partitions to lighter shards; hybrid: dynamic within the plan's bounds. Stopping "
            "it (or losing it) keeps the last settings."
        ),
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=False)
    p.add_argument("--policy", choices=("static", "dynamic", "hybrid"), default="hybrid")
    p.add_argument("--period", type=float, default=1.0, metavar="S",
                   help="seconds between decisions (1.0)")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="durable control queues (default; --no-durable as the workers)")
    add_persistent_option(p)
    p.add_argument("--report-every", type=int, default=10, metavar="N",
                   help="log a report every N periods (10; 0: never)")
    add_metrics_option(p)
    p.set_defaults(func=cmd_controller)


def cmd_controller(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    target = BrokerTarget.required(args.broker, "controller")
    target.persistent = args.persistent
    if args.period <= 0:
        raise ConfigError(f"--period must be > 0, got {args.period}")
    port = metrics_port(args.metrics_port)
    plan = Plan.load(args.plan)
    return asyncio.run(_run(plan, target, args, port))


async def _run(
    plan: Any, target: BrokerTarget, args: argparse.Namespace, port: int | None = None
) -> int:
    from workers.control.controller import Controller, ControllerState
    from workers.control.metrics import controller_registry
    from workers.control.policies import PolicyConfig

    transport = await target.connect(plan=plan)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    controller = Controller(
        transport, plan, PolicyConfig.from_plan(plan, args.policy), period=args.period,
        durable=args.durable, report_every=args.report_every,
    )
    server = ObserveServer(port) if port is not None else None
    if server is not None:
        server.add_registry(controller_registry(controller))
        server.add_check("controller", lambda: None if controller.state is
                         ControllerState.RUNNING else controller.state.value)
        server.add_check("broker", broker_check(transport))
        await server.start()
    try:
        async with controller:
            print(f"controller: plan {plan.name} ({plan.short_hash}) on {target.describe()}, "
                  f"policy {args.policy}, "
                  f"period {args.period:g} s; Ctrl-C to stop (settings stay)", flush=True)
            await stop.wait()
    finally:
        print(f"controller: metrics {controller.metrics_line()}", flush=True)
        await transport.close(grace=1.0)
        if server is not None:
            await server.stop()
    return 0
