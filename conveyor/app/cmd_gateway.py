"""``conveyor gateway``: serve a plan over the Open Inference Protocol (KServe v2) REST API.

Light at import: aiohttp, onnxruntime and aio-pika load inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from conveyor.app.cmd_serve import add_broker_options, add_persistent_option, broker_target


def add_parsers(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "gateway",
        help="serve a plan over the Open Inference Protocol v2 (Triton / KServe clients)",
        description="An HTTP server speaking the Open Inference Protocol v2 REST API (JSON "
        "tensors and the binary tensor data extension) for the plan as one model named as "
        "the plan. Without --broker or $CONVEYOR_AMQP_URL the plan's workers run in this "
        "process on the embedded broker; with one the gateway is a client of the workers on "
        "RabbitMQ. /metrics and /v2/health/* on the same port. docs/gateway.md.",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0: any)")
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                   help="also serve the KServe v2 gRPC service here (needs tritonclient[grpc])")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request may take unless it says (30)")
    p.add_argument("--max-body-mb", type=float, default=64.0, metavar="MB",
                   help="largest request body accepted, MiB (64); larger ones get 413")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="durable queues (default; --no-durable as the workers were started)")
    add_persistent_option(p)
    p.add_argument("--no-declare", dest="declare", action="store_false",
                   help="do not declare the plan's topology (an admin step did: `conveyor "
                   "topology`); a least-privilege client user may not")
    add_local_worker_options(p)
    p.set_defaults(func=cmd_gateway)


def add_local_worker_options(p: argparse.ArgumentParser) -> None:
    """Options of the in-process workers (embedded broker only)."""
    g = p.add_argument_group("in-process workers (embedded broker only)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads per stage (cores / stages)")
    g.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="micro-batch size limit (the plan's schedule)")
    g.add_argument("--max-delay-ms", type=float, default=None, metavar="MS",
                   help="longest wait to fill a batch (the plan's schedule)")


def local_worker_options(args: argparse.Namespace) -> dict[str, Any]:
    from workers.settings import WorkerSettings

    return {"settings": WorkerSettings(
        device=args.device, intra_op_threads=args.threads, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
    )}


def cmd_gateway(args: argparse.Namespace) -> int:
    from conveyor.app.gateway import GatewaySettings
    from conveyor.plan import Plan

    settings = GatewaySettings(host=args.host, port=args.port, timeout=args.timeout,
                               grpc_port=args.grpc_port,
                               max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    plan = Plan.load(args.plan)
    return asyncio.run(_serve(plan, args, settings))


async def _serve(plan: Any, args: argparse.Namespace, settings: Any) -> int:
    from conveyor.app.gateway import serve_gateway

    target = broker_target(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    options = local_worker_options(args) if target.embedded else None
    async with serve_gateway(plan, target, settings, worker_options=options,
                             durable=args.durable,
                             declare_topology=args.declare) as running:
        where = "in-process workers on " if target.embedded else ""
        print(f"conveyor gateway: model {plan.name!r} ({plan.short_hash}) at "
              f"{running.url}/v2/models/{plan.name} on {where}{target.describe()}; "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
        if running.grpc_address is not None:
            print(f"conveyor gateway: gRPC (KServe v2) at {running.grpc_address}",
                  file=sys.stderr, flush=True)
        await stop.wait()
    print("conveyor gateway: stopped", file=sys.stderr, flush=True)
    return 0
