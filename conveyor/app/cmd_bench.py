"""``conveyor bench``: a perf_analyzer-like load tool for any plan.

Light at import: numpy, the client, aiohttp and matplotlib load inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from conveyor.app.cmd_gateway import add_local_worker_options, local_worker_options
from conveyor.app.cmd_serve import add_broker_options, add_persistent_option, broker_target
from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from conveyor.app.bench_split import Sums
    from conveyor.app.bench_tool import InferFn, OnDone, Point
    from conveyor.plan import Plan


def add_parsers(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="measure a served plan: req/s and p50/p90/p99 per load level",
        description="Sends random requests made from the plan's input specs (or --inputs) "
        "for --seconds per level: a closed-loop sweep over --concurrency, or an open loop at "
        "--rate requests/s. Through the SDK on the embedded broker (the plan's workers in "
        "this process), on RabbitMQ (--broker / $CONVEYOR_AMQP_URL: start the workers "
        "first), or over HTTP to a `conveyor gateway` (--gateway URL).",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=True)
    p.add_argument("--gateway", metavar="URL", default=None,
                   help="measure the Open Inference Protocol gateway at URL instead")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1,4,16,64", metavar="N,N,...",
                      help="closed-loop levels: requests in flight (1,4,16,64)")
    load.add_argument("--rate", type=float, default=None, metavar="R",
                      help="open loop: R requests/s on a fixed schedule")
    p.add_argument("--seconds", type=float, default=5.0, metavar="S",
                   help="measured seconds per level (5)")
    p.add_argument("--warmup", type=float, default=0.5, metavar="S",
                   help="unmeasured seconds before each level (0.5)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="rows per request (1)")
    p.add_argument("--inputs", type=Path, default=None, metavar="FILE.npz",
                   help="send this request (named arrays) instead of random ones")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds per request (30)")
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="a worker's metrics endpoint (http://host:port/metrics) to read the "
                   "per-stage split from; repeat for each worker process (in-process "
                   "workers are read directly)")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                   help="save the throughput-latency curve (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="durable queues (default; --no-durable as the workers were started)")
    add_persistent_option(p)
    add_local_worker_options(p)
    p.set_defaults(func=cmd_bench)


class Progress:
    """One line per level: ``c16 [#####.....] 2.5/5.0 s  1,234 answers``; TTY only."""

    def __init__(self, seconds: float, stream: TextIO, enabled: bool) -> None:
        self.seconds, self.stream = seconds, stream
        self.enabled = enabled and stream.isatty()
        self._label = ""
        self._start = 0.0
        self._shown = -1.0

    def start(self, mode: str, level: float) -> OnDone | None:
        if not self.enabled:
            return None
        if self._label:
            self.stream.write("\n")
        from conveyor.app.bench_tool import level_label

        self._label = level_label(mode, level)
        self._start = time.perf_counter()
        self._shown = -1.0
        return self.update

    def update(self, answers: int) -> None:
        elapsed = min(time.perf_counter() - self._start, self.seconds)
        if elapsed - self._shown < 0.1 and elapsed < self.seconds:
            return
        self._shown = elapsed
        filled = int(30 * elapsed / self.seconds)
        self.stream.write(f"\r  {self._label:>8} [{'#' * filled}{'.' * (30 - filled)}] "
                          f"{elapsed:4.1f}/{self.seconds:g} s  {answers:,} answers")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._label:
            self.stream.write("\n")
            self.stream.flush()


def cmd_bench(args: argparse.Namespace) -> int:
    from conveyor.app.bench_split import StageSplit, split_table
    from conveyor.app.bench_tool import format_table, parse_levels, plot, random_inputs
    from conveyor.app.cmd_client import load_inputs
    from conveyor.plan import Plan

    plan = Plan.load(args.plan)
    if args.seconds <= 0:
        raise ConfigError(f"--seconds must be positive, got {args.seconds}")
    levels = [] if args.rate is not None else parse_levels(args.concurrency)
    requests: list[Any]
    if args.inputs is not None:
        requests = [load_inputs(args.inputs, [t.name for t in plan.inputs])]
    else:
        requests = random_inputs(plan, args.batch)
    progress = Progress(args.seconds, sys.stderr, not args.no_progress)
    points, where, stages = asyncio.run(_measure(plan, args, requests, levels, progress))
    if args.json:
        print(json.dumps({"plan": plan.name, "where": where, "points": [p.to_dict() for p in
                          points], "stages": stages}, indent=2))
    else:
        print(f"plan {plan.name!r} ({plan.short_hash}) via {where}, {args.seconds:g} s per "
              "level")
        print(format_table(points))
        for point in points:
            if point.stages:
                print(split_table(point.label, [StageSplit(**row) for row in point.stages]))
        if stages:
            print(stage_table(stages))
    if args.plot is not None:
        plot(points, str(args.plot), f"{plan.name} via {where}")
        print(f"saved the throughput-latency curve to {args.plot}", file=sys.stderr)
    return 0


async def _measure(
    plan: Plan, args: argparse.Namespace, requests: list[Any], levels: list[int],
    progress: Progress,
) -> tuple[list[Point], str, list[dict[str, Any]]]:
    if args.gateway is not None:
        from conveyor.app.oip_client import OipClient

        async with OipClient(args.gateway, plan, connections=max(levels or [64]),
                             timeout=args.timeout) as http:
            points = await _levels(plan, args, requests, levels, progress, http.infer, [])
            return points, f"HTTP {args.gateway}", []
    from conveyor.app.connect import connect

    target = broker_target(args)
    options = local_worker_options(args) if target.embedded else None
    client = connect(target.url, plan=plan, timeout=args.timeout, worker_options=options,
                     durable=args.durable, persistent=target.persistent)
    async with client:
        where = ("the SDK, in-process workers on " if target.embedded else "the SDK on ") + \
            target.describe()

        async def infer(inputs: Any) -> Any:
            return await client.infer(inputs)

        workers = client.workers
        registries = [] if workers is None else [workers.metrics.registry]
        points = await _levels(plan, args, requests, levels, progress, infer, registries)
        return points, where, stage_figures(workers)


async def _levels(
    plan: Plan, args: argparse.Namespace, requests: list[Any], levels: list[int],
    progress: Progress, infer: InferFn, registries: list[Any],
) -> list[Point]:
    """Each level in turn, with the per-stage split of the metrics read around it."""
    from dataclasses import replace

    from conveyor.app.bench_split import split
    from conveyor.app.bench_tool import sweep

    points: list[Point] = []
    try:
        each: list[int | None] = list(levels) if levels else [None]  # None: the --rate point
        for level in each:
            before = await _sample(plan, registries, args.metrics)
            measured = await sweep(
                infer, requests, concurrencies=[] if level is None else [level],
                rate=args.rate, seconds=args.seconds, warmup=args.warmup,
                on_point=progress.start,
            )
            after = await _sample(plan, registries, args.metrics)
            rows = [] if before is None or after is None else [
                r.to_dict() for r in split(before, after)]
            points += [replace(p, stages=rows) for p in measured]
    finally:
        progress.close()
    return points


async def _sample(plan: Plan, registries: list[Any], urls: list[str]) -> Sums | None:
    """The split's counters now (None when there is nothing to read them from)."""
    from conveyor.app.bench_split import registry_samples, sums
    from conveyor.app.cmd_status import scrape

    if not registries and not urls:
        return None
    scrapes = [registry_samples(r) for r in registries] + [await scrape(u) for u in urls]
    return sums(plan, scrapes)



def stage_figures(workers: Any) -> list[dict[str, Any]]:
    """Per-stage figures of in-process workers (none on RabbitMQ: they live elsewhere)."""
    if workers is None:
        return []
    return [{"stage": s.stage, "requests": s.requests, "batches": s.batches,
             "mean_batch": round(s.mean_batch, 2),
             "ms_per_batch": round(s.service_ms_per_batch, 3),
             "ms_per_request": round(s.service_ms_per_request, 3),
             "errors": s.errors, "provider": s.provider}
            for s in workers.stats().stages if s.provider]


def stage_table(stages: list[dict[str, Any]]) -> str:
    head = ["stage", "requests", "batches", "mean batch", "ms/batch", "ms/request", "errors"]
    rows = [[str(s["stage"]), f"{s['requests']:,}", f"{s['batches']:,}",
             f"{s['mean_batch']:.2f}", f"{s['ms_per_batch']:.3f}", f"{s['ms_per_request']:.3f}",
             str(s["errors"])] for s in stages]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    return "per stage (in-process workers; session time is a moving average):\n" + \
        "\n".join(lines)
