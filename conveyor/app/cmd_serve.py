"""``conveyor worker`` and ``conveyor run``: serve a plan's stages (docs/operations.md).

Light at import: onnxruntime, aio-pika and the brokerless broker load inside the commands.
Where they connect is ``conveyor.app.transports.BrokerTarget``'s choice.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.app.observe import METRICS_PORT_ENV, ObserveServer, broker_check, metrics_port
from conveyor.app.transports import AMQP_URL_ENV, BrokerTarget

if TYPE_CHECKING:
    from conveyor.plan import Plan
    from conveyor.transport import Transport
    from workers.settings import WorkerSettings
    from workers.stage_worker import StageWorker


def add_parsers(sub: Any) -> None:
    add_worker_parser(sub)
    add_run_parser(sub)


def add_broker_options(p: argparse.ArgumentParser, *, embedded: bool) -> None:
    """``--broker URL`` (default ``$CONVEYOR_AMQP_URL``) and, where a command can run on
    the embedded broker, ``--embedded`` to force it."""
    default = f"${AMQP_URL_ENV}" + (", else the embedded broker" if embedded else "")
    p.add_argument("--broker", metavar="URL", default=None,
                   help=f"RabbitMQ URL (amqp://...); default {default}")
    if embedded:
        p.add_argument("--embedded", action="store_true",
                       help=f"run on the embedded broker in this process even if "
                       f"${AMQP_URL_ENV} is set")


def add_persistent_option(p: argparse.ArgumentParser) -> None:
    """``--persistent`` / ``--no-persistent``: wins over the URL, the environment and the
    plan (default: theirs, else persistent)."""
    p.add_argument(
        "--persistent", action=argparse.BooleanOptionalAction, default=None,
        help="persistent messages (delivery mode 2: what the broker confirmed survives its "
        "restart); --no-persistent for transient, faster ones. Wins over ?persistent= in "
        "the URL, $CONVEYOR_AMQP_PERSISTENT and the plan's queues.persistent (default: "
        "theirs, else persistent)",
    )


def broker_target(args: argparse.Namespace) -> BrokerTarget:
    """The target a command's ``--broker`` / ``--embedded`` / environment name, with its
    ``--[no-]persistent`` choice."""
    target = BrokerTarget.resolve(args.broker, embedded=getattr(args, "embedded", False))
    target.persistent = getattr(args, "persistent", None)
    return target


def add_metrics_option(p: argparse.ArgumentParser) -> None:
    """``--metrics-port PORT``: serve /metrics and the health paths (docs/operations.md)."""
    p.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help=f"serve /metrics, /v2/health/live and /v2/health/ready on PORT (default "
        f"${METRICS_PORT_ENV}; none when unset)",
    )


def _add_serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_metrics_option(p)
    p.add_argument("--no-timings", action="store_true",
                   help="do not measure durations and batch sizes (to benchmark what "
                   "measuring costs; counts are still kept)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="onnxruntime intra-op threads per stage (cores / stages hosted)",
    )
    _add_batching_options(p)
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
        action=argparse.BooleanOptionalAction,
        default=True,
        help="durable queues and exchanges (default; --no-durable for throw-away ones: "
        "all processes of a deployment must agree)",
    )
    add_persistent_option(p)


def _add_batching_options(p: argparse.ArgumentParser) -> None:
    """The micro-batching options: each, when given, wins over the plan's schedule."""
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
    add_broker_options(p, embedded=False)
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="I",
        help="consume only input (or join) shard I; default all shards",
    )
    p.add_argument(
        "--no-declare",
        dest="declare",
        action="store_false",
        help="do not declare the plan's topology (an admin step did: `conveyor topology`); "
        "a least-privilege worker user may not",
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
    add_broker_options(p, embedded=True)
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
        metrics=not args.no_timings,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    target = BrokerTarget.required(args.broker, "worker")
    target.persistent = args.persistent
    settings = _settings(args)
    port = metrics_port(args.metrics_port)
    plan = Plan.load(args.plan)  # PlanError (exit 2) when the files do not match the hash
    return asyncio.run(
        _serve(plan, target, args.stage, settings, port, declare=args.declare)
    )


def cmd_run(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    settings = _settings(args)
    port = metrics_port(args.metrics_port)
    plan = Plan.load(args.plan)
    return asyncio.run(_serve(plan, broker_target(args), None, settings, port))


async def _serve(
    plan: Plan,
    target: BrokerTarget,
    stages: list[str] | None,
    settings: WorkerSettings,
    port: int | None = None,
    *,
    declare: bool = True,
) -> int:
    from conveyor.topology import Topology
    from workers.control.agent import ControlAgent
    from workers.stage_worker import StageWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Up before the sessions load: live at once, ready (200) only once consuming.
    server = ObserveServer(port) if port is not None else None
    if server is not None:
        await server.start()
    transport = await target.connect(plan=plan)
    try:
        worker = StageWorker(plan, transport, stages, settings, declare=declare)
        if server is not None:
            _observe(server, plan, target, worker, transport)
        await worker.start()
        _announce(plan, worker, target)
        # heartbeats out, controller commands in (docs/scheduling.md)
        agent = ControlAgent(
            transport, Topology.of(plan), worker, worker.worker_id, durable=settings.durable
        )
        await agent.start()
        code = await _until_stopped_or_failed(stop, worker)
        print(f"conveyor: stopping (grace {settings.grace:g} s)", file=sys.stderr, flush=True)
        await agent.stop()
        await worker.stop(settings.grace)
        _report_stages(worker)
    finally:
        await transport.close(grace=1.0)
        if server is not None:
            await server.stop()
    return code


def _observe(server: ObserveServer, plan: Plan, target: BrokerTarget, worker: StageWorker,
             transport: Transport) -> None:
    """Serve the worker's metrics and health checks on ``server`` (and the embedded
    broker's queue depths where the worker runs on one)."""
    server.add_registry(worker.metrics.registry)
    server.add_check("worker", lambda: None if worker.ready else f"{worker.state.value}")
    server.add_check("broker", broker_check(transport))
    if target.broker is not None:
        server.add_registry(_embedded_queues(plan, target.broker))
    print(f"conveyor: metrics on http://localhost:{server.bound_port}/metrics", flush=True)


async def _until_stopped_or_failed(stop: asyncio.Event, worker: StageWorker) -> int:
    """Wait for a stop signal or for the worker to fail; the exit code (1: failed)."""
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(worker.failed.wait())
    await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    failing.cancel()
    if worker.failed.is_set():
        print("conveyor: a queue this worker consumes is gone and could not be declared "
              "again; exiting", file=sys.stderr, flush=True)
        return 1
    return 0


def _report_stages(worker: StageWorker) -> None:
    for st in worker.stats().stages:
        print(
            f"conveyor: stage {st.stage}: {st.requests} requests in {st.batches} batches "
            f"(mean {st.mean_batch:.2f})",
            file=sys.stderr,
            flush=True,
        )


def _embedded_queues(plan: Plan, broker: Any) -> Any:
    """A registry exporting the embedded broker's queue depths (``conveyor status``)."""
    from prometheus_client import CollectorRegistry

    from conveyor.app.observe import QueueCollector
    from conveyor.topology_setup import stage_queues

    def stats(queue: str) -> tuple[int, int]:
        s = broker.queue_statistics(queue)
        return int(s.ready), int(s.consumers)

    queues = {q: spec.name for spec in plan.stages for q in stage_queues(plan, spec)}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queues, stats))
    return registry


def _announce(plan: Plan, worker: Any, target: BrokerTarget) -> None:
    from conveyor.topology import Topology

    topo = Topology.of(plan)
    providers = ", ".join(f"{s}={p}" for s, p in worker.providers.items())
    print(
        f"conveyor: serving plan {plan.name!r} ({plan.short_hash}) stages {list(worker.hosted)} "
        f"[{providers}] as worker {worker.worker_id} on {target.describe()}",
        flush=True,
    )
    print(f"conveyor: consuming {', '.join(worker.queues)}", flush=True)
    if worker.hosts_ingress:
        p = plan.partitioning
        where = target.describe()
        print(
            f"conveyor: publish requests to exchange {topo.input_exchange!r} on {where}; "
            f"partitioning {p.kind} over {p.shards} shard(s) (docs/wire.md); "
            "Ctrl-C or SIGTERM to stop",
            flush=True,
        )
    print("conveyor: ready", flush=True)
