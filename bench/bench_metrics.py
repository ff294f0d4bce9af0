"""Metrics on vs off, both sides up at once and driven in turn (issue 13).

    python -m bench.bench_metrics [--workload W1] [--seconds 2] [--rounds 20] [--rabbitmq]

Two pipelines of the same plan run side by side: one whose workers measure
(``WorkerSettings(metrics=True)``) and serve ``/metrics``, scraped every
``--scrape-every`` seconds (5, as the compose stack's Prometheus does) from a process of
its own, and one that does not (``metrics=False`` / ``--no-timings``, no server). Without
``--rabbitmq`` both are brokerless, in this process; with ``--rabbitmq`` each is a set of
``conveyor worker`` processes (one per stage) on its own copy of the plan, and both
clients live in this process. The benchmark drives the two in turn, ``--seconds`` each,
``--rounds`` times ("on" first in every other round), so a swing of the shared machine's
load hits both sides alike; legs in processes of their own (``bench.bench_pipeline
--metrics alternate``) swung by +-25% between legs even on an idle machine. Reported: the
median of the per-round on/off ratios of throughput and of CPU milliseconds per request
(every process the side uses: this one, its workers and RabbitMQ's), with their quartiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_pipeline import (
    broker_pid,
    delete_topology,
    drive,
    isolated_copy,
    make_requests,
    pipeline_batch,
    run_leg,
    scraping,
    start_workers,
)


async def _sides(plan: Any, batch: int, stack: contextlib.AsyncExitStack,
                 scrape_every: float) -> dict[str, Any]:
    """The two brokerless clients ("on", "off"), each with its in-process workers; the "on"
    side's metrics served and scraped."""
    from conveyor.app.connect import connect
    from conveyor.app.observe import ObserveServer
    from workers.settings import WorkerSettings

    clients: dict[str, Any] = {}
    for side in ("on", "off"):
        settings = WorkerSettings(device="cpu", max_batch=batch, metrics=side == "on")
        clients[side] = await stack.enter_async_context(
            connect(None, plan=plan, timeout=60.0, worker_options={"settings": settings})
        )
    server = ObserveServer(0, host="127.0.0.1")
    server.add_registry(clients["on"].workers.metrics.registry)
    await server.start()
    stack.push_async_callback(server.stop)
    stack.enter_context(scraping([server.bound_port], scrape_every))
    return clients


async def _rabbitmq_sides(plan: Any, batch: int, url: str, tmp: Path,
                          stack: contextlib.AsyncExitStack, scrape_every: float,
                          ) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """The two clients on RabbitMQ, each with worker processes on its own copy of the plan,
    and the processes whose CPU each side uses."""
    from conveyor.app.connect import connect

    clients: dict[str, Any] = {}
    pids: dict[str, dict[str, int]] = {}
    broker = broker_pid()
    threads = max(1, (os.cpu_count() or 1) // len(plan.stages))
    for side in ("on", "off"):
        copy = isolated_copy(plan, tmp / side)
        groups = {stage: [stage] for stage in copy.stage_names}
        procs, ports = start_workers(copy, groups, url, tmp, metrics=side == "on",
                                     threads=threads, batch=batch)
        stack.push_async_callback(delete_topology, url, copy)
        stack.callback(_stop, procs)
        if ports:
            stack.enter_context(scraping(ports, scrape_every))
        pids[side] = {f"worker {k}": p.pid for k, p in procs.items()}
        if broker is not None:
            pids[side]["rabbitmq"] = broker
        clients[side] = await stack.enter_async_context(connect(url, plan=copy, timeout=60.0))
    return clients, pids


def _stop(procs: dict[str, Any]) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(30)


async def interleaved(plan: Any, batch: int, seconds: float, rounds: int, warmup: int,
                      broker: str | None = None, scrape_every: float = 5.0) -> dict[str, Any]:
    requests = make_requests(plan)
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            pids: dict[str, dict[str, int]] = {"on": {}, "off": {}}
            if broker is None:
                clients = await _sides(plan, batch, stack, scrape_every)
            else:
                clients, pids = await _rabbitmq_sides(plan, batch, broker, Path(tmp), stack,
                                                      scrape_every)
            for side in ("on", "off"):  # warm both before the first measured round
                await drive(clients[side], requests, 0.5, warmup=warmup)
            for i in range(rounds):
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for side in order:
                    runs[side].append(await drive(clients[side], requests, seconds, warmup=0,
                                                  pids=pids[side]))
                _report_round(i, runs)
    return summary(runs)


def _report_round(i: int, runs: dict[str, list[dict[str, Any]]]) -> None:
    on, off = runs["on"][-1], runs["off"][-1]
    print(f"  round {i + 1}: on {on['throughput']:,.0f} req/s {_cpu(on):.4f} ms/req, "
          f"off {off['throughput']:,.0f} req/s {_cpu(off):.4f} ms/req", flush=True)


def _cpu(run: dict[str, Any]) -> float:
    """CPU milliseconds per request of every process the side uses."""
    return float(sum(run["cpu_ms_per_request"].values()))


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    pairs = list(zip(runs["on"], runs["off"], strict=True))
    throughput = [on["throughput"] / off["throughput"] for on, off in pairs]
    cpu = [_cpu(on) / _cpu(off) for on, off in pairs]

    def spread(values: list[float]) -> dict[str, float]:
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return {"median": round(float(median), 4), "q1": round(float(q1), 4),
                "q3": round(float(q3), 4)}

    return {
        "rounds": len(pairs),
        "throughput_on_over_off": spread(throughput),
        "cpu_per_request_on_over_off": spread(cpu),
        "throughput_median": {s: round(float(np.median([r["throughput"] for r in rs])))
                              for s, rs in runs.items()},
        "cpu_ms_per_request_median": {s: round(float(np.median([_cpu(r) for r in rs])), 4)
                                      for s, rs in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.bench_pipeline import WORKLOADS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    p.add_argument("--seconds", type=float, default=2.0, help="each side, each round (2)")
    p.add_argument("--scrape-every", type=float, default=5.0,
                   help="seconds between scrapes of the 'on' side (5: the compose stack's "
                   "Prometheus scrape_interval)")
    p.add_argument("--rabbitmq", action="store_true",
                   help="worker processes on the RabbitMQ of CONVEYOR_AMQP_URL (default: "
                   "brokerless, in this process)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--cache", type=Path,
                   default=Path(tempfile.gettempdir()) / "conveyor-bench" / "profile")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from conveyor.plan import Plan

    # TensorFlow builds the models in a process of its own (never in the measured one).
    run_leg(["--leg", "prepare", "--cache", str(args.cache), "--only", args.workload])
    plan = Plan.load(args.cache / args.workload / "plan")
    batch = pipeline_batch(plan, args.max_batch, args.workload)
    warmup = 200 if args.workload == "W1" else 32
    broker = None
    if args.rabbitmq:
        broker = os.environ.get("CONVEYOR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    result = asyncio.run(interleaved(plan, batch, args.seconds, args.rounds, warmup, broker,
                                     args.scrape_every))
    t, c = result["throughput_on_over_off"], result["cpu_per_request_on_over_off"]
    path = "brokerless" if broker is None else "RabbitMQ"
    print(f"{args.workload} {path}, metrics on (scraped every {args.scrape_every:g} s) / off "
          f"over {result['rounds']} rounds: "
          f"throughput {t['median']:.3f} (quartiles {t['q1']:.3f}-{t['q3']:.3f}), "
          f"CPU per request {c['median']:.3f} (quartiles {c['q1']:.3f}-{c['q3']:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
