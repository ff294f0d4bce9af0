"""``conveyor dead PLAN_DIR`` (list, replay, purge dead letters) and ``conveyor clean
PLAN_DIR`` (remove a plan's exchanges and queues). RabbitMQ only: the embedded broker's
queues end with its process. Light at import."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from conveyor.app.cmd_serve import add_broker_options
from conveyor.app.transports import BrokerTarget
from conveyor.errors import ConfigError


def add_parsers(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "dead",
        help="list a plan's dead-lettered messages with their cause; replay or purge them",
        description="Dead letters are requests a worker refused (each carries the error code "
        "and message), expired ones and ones a full queue dropped. Without --replay or "
        "--purge it lists them (they stay in the queue).",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=False)
    p.add_argument("--show", type=int, default=20, metavar="N", help="list at most N (20)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--replay", action="store_true",
                        help="publish each back to the stage it died at, then drop it")
    action.add_argument("--purge", action="store_true", help="drop them all")
    p.set_defaults(func=cmd_dead)

    c: argparse.ArgumentParser = sub.add_parser(
        "clean",
        help="delete a plan's exchanges and queues from the broker (messages are lost)",
        description="Refuses while any consumer is attached to the plan's queues (running "
        "workers) unless --force.",
    )
    c.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(c, embedded=False)
    c.add_argument("--force", action="store_true", help="delete even with consumers attached")
    c.set_defaults(func=cmd_clean)


def cmd_dead(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    target = BrokerTarget.required(args.broker, "dead")
    if args.show < 0:
        raise ConfigError(f"--show must be >= 0, got {args.show}")
    plan = Plan.load(args.plan)
    return asyncio.run(_dead(plan, target, args))


async def _dead(plan: Any, target: BrokerTarget, args: argparse.Namespace) -> int:
    from conveyor.app import dead

    transport = await target.connect()
    try:
        if args.replay:
            done, problems = await dead.replay(transport, plan)
            for line in problems:
                print(f"conveyor dead: {line}")
            print(f"conveyor dead: replayed {done} message(s) of plan {plan.name!r}")
            return 1 if problems else 0
        if args.purge:
            print(f"conveyor dead: purged {await dead.purge(transport, plan)} message(s)")
            return 0
        letters, depth = await dead.show(transport, plan, args.show)
        print(f"{depth} dead-lettered message(s) in plan {plan.name!r} ({plan.short_hash})")
        for d in letters:
            for line in dead.render(d):
                print(line)
        if letters:
            print("`conveyor dead PLAN_DIR --replay` sends them back to their stage")
        return 0
    finally:
        await transport.close(grace=0.5)


def cmd_clean(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    target = BrokerTarget.required(args.broker, "clean")
    plan = Plan.load(args.plan)
    return asyncio.run(_clean(plan, target, args.force))


async def _clean(plan: Any, target: BrokerTarget, force: bool) -> int:
    from conveyor.errors import TransportError
    from conveyor.topology import Topology
    from conveyor.topology_setup import delete_plan_topology, stage_queues

    transport = await target.connect()
    try:
        attached = []
        queues = [q for s in plan.stages for q in stage_queues(plan, s)]
        for queue in [*queues, Topology.of(plan).dead_letter_queue]:
            try:
                stats = await transport.queue_stats(queue)
            except TransportError:
                continue  # already gone
            if stats.consumers:
                attached.append(f"{queue} ({stats.consumers})")
        if attached and not force:
            raise ConfigError(
                f"plan {plan.name!r} still has consumers on {', '.join(attached)}; stop its "
                "workers first, or pass --force"
            )
        await delete_plan_topology(transport, plan)
        print(f"conveyor clean: removed the exchanges and queues of plan {plan.name!r} "
              f"({plan.short_hash})")
        return 0
    finally:
        await transport.close(grace=0.5)
