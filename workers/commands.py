"""``conveyor worker`` and ``conveyor run``: serve a plan's stages (docs/operations.md).

Light at import: onnxruntime, aio-pika and the brokerless broker load inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from conveyor.plan import Plan
    from conveyor.transport import Transport
    from workers.settings import WorkerSettings

#: Read when ``--broker`` is not given.
BROKER_ENV = "CONVEYOR_AMQP_URL"


def add_parsers(sub: Any) -> None:
    from conveyor.commands_client import add_demo_parser, add_infer_parser

    add_worker_parser(sub)
    add_run_parser(sub)
    # The client side of the pipeline (conveyor/commands_client.py).
    add_infer_parser(sub)
    add_demo_parser(sub)


def _add_serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="onnxruntime intra-op threads per stage (cores / stages hosted)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="micro-batch size limit (the plan's schedule)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=None,
        metavar="MS",
        help="longest wait to fill a batch (the plan's schedule)",
    )
    p.add_argument(
        "--batch-wait",
        choices=["idle", "window"],
        default="idle",
        help="when a partial batch runs: as soon as the stage is free, waiting up to "
        "--max-delay-ms only while a burst is still arriving (idle, default); or always "
        "after --max-delay-ms (window)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="unacknowledged deliveries per queue (the plan's schedule, >= max batch)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a shutdown lets batches in flight finish (10)",
    )
    p.add_argument(
        "--join-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a join waits for a request's missing parts (60)",
    )
    p.add_argument(
        "--durable",
        action="store_true",
        help="declare durable queues and exchanges (all processes must agree)",
    )


def add_worker_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "worker",
        help="serve stages of a plan on RabbitMQ (start as many as you like per stage)",
        description="One worker process hosting one or more stages of a plan. Stages hosted "
        "together hand tensors over in memory; the others are reached through the broker. "
        "SIGTERM / SIGINT stop it gracefully.",
    )
    _add_serving_options(p)
    p.add_argument(
        "--stage",
        action="append",
        required=True,
        metavar="NAME",
        help="a stage to host (repeat for several)",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        default=None,
        help=f"RabbitMQ URL (amqp://...); default ${BROKER_ENV}",
    )
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="I",
        help="consume only input (or join) shard I; default all shards",
    )
    p.set_defaults(func=cmd_worker)


def add_run_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="serve the whole plan in one process (embedded broker unless --broker)",
        description="All stages of the plan in this process, handing tensors over in memory. "
        "Without --broker it runs on the embedded brokerless broker (useful with clients in "
        "the same process); with --broker requests can be published from anywhere. Runs "
        "until SIGTERM / SIGINT.",
    )
    _add_serving_options(p)
    p.add_argument(
        "--broker",
        metavar="URL",
        default=None,
        help="RabbitMQ URL (amqp://...); default: the embedded broker",
    )
    p.set_defaults(func=cmd_run)


def _settings(args: argparse.Namespace) -> WorkerSettings:
    from workers.settings import WorkerSettings

    return WorkerSettings(
        device=args.device,
        intra_op_threads=args.threads,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        prefetch=args.prefetch,
        shard=getattr(args, "shard", None),
        grace=args.grace,
        join_timeout=args.join_timeout,
        durable=args.durable,
        batch_wait=args.batch_wait,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    url = args.broker or os.environ.get(BROKER_ENV)
    if not url:
        raise ConfigError(
            f"conveyor worker needs a RabbitMQ URL: --broker amqp://... or ${BROKER_ENV} "
            "(for one process on the embedded broker use `conveyor run`)"
        )
    settings = _settings(args)
    plan = Plan.load(args.plan)  # PlanError (exit 2) when the files do not match the hash
    return asyncio.run(_serve(plan, url, args.stage, settings))


def cmd_run(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    settings = _settings(args)
    plan = Plan.load(args.plan)
    return asyncio.run(_serve(plan, args.broker, None, settings))


async def _connect(url: str | None) -> Transport:
    if url is None:
        from brokerless import Broker

        return Broker().connect()
    from workers.amqp import AmqpTransport

    return await AmqpTransport.connect(url)


async def _serve(
    plan: Plan, url: str | None, stages: list[str] | None, settings: WorkerSettings
) -> int:
    from conveyor.topology import Topology
    from workers.control.agent import ControlAgent
    from workers.stage_worker import StageWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    transport = await _connect(url)
    try:
        worker = StageWorker(plan, transport, stages, settings)
        await worker.start()
        _announce(plan, worker, url)
        # heartbeats out, controller commands in (docs/scheduling.md)
        agent = ControlAgent(
            transport, Topology.of(plan), worker, worker.worker_id, durable=settings.durable
        )
        await agent.start()
        await stop.wait()
        print(f"conveyor: stopping (grace {settings.grace:g} s)", file=sys.stderr, flush=True)
        await agent.stop()
        await worker.stop(settings.grace)
        for st in worker.stats().stages:
            print(
                f"conveyor: stage {st.stage}: {st.requests} requests in {st.batches} batches "
                f"(mean {st.mean_batch:.2f})",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await transport.close(grace=1.0)
    return 0


def _announce(plan: Plan, worker: Any, url: str | None) -> None:
    from conveyor.topology import Topology

    topo = Topology.of(plan)
    providers = ", ".join(f"{s}={p}" for s, p in worker.providers.items())
    print(
        f"conveyor: serving plan {plan.name!r} ({plan.short_hash}) stages {list(worker.hosted)} "
        f"[{providers}] as worker {worker.worker_id}",
        flush=True,
    )
    print(f"conveyor: consuming {', '.join(worker.queues)}", flush=True)
    if worker.hosts_ingress:
        p = plan.partitioning
        where = "the embedded broker (this process only)" if url is None else "the broker"
        print(
            f"conveyor: publish requests to exchange {topo.input_exchange!r} on {where}; "
            f"partitioning {p.kind} over {p.shards} shard(s) (docs/wire.md); "
            "Ctrl-C or SIGTERM to stop",
            flush=True,
        )
    print("conveyor: ready", flush=True)
