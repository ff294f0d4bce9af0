"""``conveyor status PLAN_DIR``: every stage's backlog, consumers, rates and service time.

Against RabbitMQ (``--broker`` or ``$CONVEYOR_AMQP_URL``) it reads each stage's queues and,
without ``--metrics``, the workers' heartbeats for rates, batches, errors and in flight
(``status_heartbeats``); ``--metrics URL`` (repeat it: one per worker, or a ``conveyor
run`` process's) gives those from the workers' metrics instead, with service times and dead
letters, and for a ``conveyor run`` on its embedded broker the queue figures too. Light at
import.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.app.cmd_serve import add_broker_options
from conveyor.app.transports import AMQP_URL_ENV, BrokerTarget
from conveyor.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from conveyor.app.status import Samples, StageSample, StageStatus
    from conveyor.app.status_heartbeats import HeartbeatTap
    from conveyor.plan import Plan


def add_parsers(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="a live table of every stage: depth, consumers, rates, service time, bottleneck",
        description="Samples the plan's queues (RabbitMQ) and the workers' metrics twice, "
        "--interval seconds apart, and shows per stage: queue depth, consumers, arrivals "
        "and completions per second now, p50 / p99 service time per batch, mean batch, "
        "errors and dead letters, with the bottleneck marked.",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    add_broker_options(p, embedded=False)
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="a metrics endpoint to read (http://host:port/metrics of a worker "
                   "or of `conveyor run`); repeat for each process")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between the two samples rates are measured over (2)")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from conveyor.plan import Plan

    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval}")
    target = BrokerTarget.resolve(args.broker)
    if target.url is None and not args.metrics:
        raise ConfigError(
            f"conveyor status needs a RabbitMQ URL (--broker or ${AMQP_URL_ENV}) or a "
            "metrics endpoint (--metrics http://HOST:PORT/metrics of `conveyor run "
            "--metrics-port PORT`)"
        )
    plan = Plan.load(args.plan)
    return asyncio.run(_status(plan, target, args.metrics, args.interval, args.watch))


async def _status(
    plan: Plan, target: BrokerTarget, urls: Sequence[str], interval: float, watch: bool
) -> int:
    from rich.console import Console
    from rich.live import Live

    transport = await target.connect() if target.url is not None else None
    console = Console()
    tap = None
    try:
        if transport is not None and not urls:
            tap = await _tap_heartbeats(plan, transport)
        before = await sample(plan, transport, urls, tap)
        started = time.monotonic()
        if not watch:
            await asyncio.sleep(interval)
            after = await sample(plan, transport, urls, tap)
            console.print(render(plan, target, _rows(plan, before, after, started), tap))
            return 0
        with Live(console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                after = await sample(plan, transport, urls, tap)
                live.update(render(plan, target, _rows(plan, before, after, started), tap))
                live.refresh()
                before, started = after, time.monotonic()
    finally:
        if tap is not None:
            await tap.close()
        if transport is not None:
            await transport.close(grace=0.5)


async def _tap_heartbeats(plan: Plan, transport: Any) -> HeartbeatTap:
    """Without metrics endpoints the rates come from the workers' heartbeats."""
    from conveyor.app.status_heartbeats import HeartbeatTap

    tap = HeartbeatTap(transport, plan)
    await tap.start()
    await tap.wait_first()
    return tap


def _rows(
    plan: Plan, before: dict[str, StageSample], after: dict[str, StageSample], started: float
) -> list[StageStatus]:
    from conveyor.app.status import compare

    return compare(plan, before, after, max(1e-3, time.monotonic() - started))


async def sample(
    plan: Plan, transport: Any, urls: Sequence[str], tap: HeartbeatTap | None = None
) -> dict[str, StageSample]:
    """One sample of every stage: metrics endpoints (or the workers' heartbeats) first, the
    broker's queues over them."""
    from conveyor.app.status import merge_broker, sample_from_metrics
    from conveyor.topology_setup import stage_queues

    scrapes = [await scrape(url) for url in urls]
    samples = sample_from_metrics(plan, scrapes)
    if tap is not None:
        tap.add_to(samples)
    if transport is not None:
        figures: dict[str, tuple[int, int]] = {}
        for spec in plan.stages:
            for queue in stage_queues(plan, spec):
                try:
                    stats = await transport.queue_stats(queue)
                except TransportError as exc:
                    raise ConfigError(
                        f"queue {queue} of plan {plan.name!r} does not exist on the broker "
                        f"({exc}); no worker or client of this plan has run there"
                    ) from exc
                figures[queue] = (stats.depth, stats.consumers)
        merge_broker(plan, samples, figures)
        await _suspects(plan, transport, samples)
    return samples


async def _suspects(plan: Plan, transport: Any, samples: dict[str, StageSample]) -> None:
    """Messages waiting in each stage's suspect queues (a topology declared before they
    existed has none: not counted)."""
    from conveyor.topology import Topology
    from conveyor.topology_setup import stage_queues

    topology = Topology.of(plan)
    for spec in plan.stages:
        waiting = 0
        for queue in stage_queues(plan, spec):
            try:
                waiting += (await transport.queue_stats(topology.suspect_queue(queue))).depth
            except TransportError:
                continue
        samples[spec.name].suspects = waiting


async def scrape(url: str) -> Samples:
    """The samples of one metrics endpoint; ``ConfigError`` naming it when it fails."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as reply:
            if reply.status != 200:
                raise ConfigError(f"metrics endpoint {url} answered HTTP {reply.status}")
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigError(f"cannot read metrics from {url}: {exc or type(exc).__name__}") from exc
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError as exc:
        raise ConfigError(f"{url} did not return Prometheus metrics: {exc}") from exc
    return out


def render(
    plan: Plan, target: BrokerTarget, rows: Sequence[StageStatus], tap: HeartbeatTap | None = None
) -> Any:
    from rich.table import Table

    where = target.describe() if target.url is not None else "metrics endpoints"
    caption = None
    if tap is not None:
        caption = (f"rates from the heartbeats of {tap.workers} worker(s); service times "
                   "need --metrics URL")
    table = Table(title=f"plan {plan.name} ({plan.short_hash}) on {where}", caption=caption)
    for column in ("stage", "depth", "consumers", "in/s", "done/s", "p50 ms", "p99 ms",
                   "batch", "errors", "dead", "suspects", ""):
        table.add_column(column, justify="left" if column in ("stage", "") else "right")
    for r in rows:
        consumers = "-" if r.consumers is None else str(r.consumers)
        if r.unserved:
            consumers = "[red]none[/red]"
        note = "[bold red]<< bottleneck[/bold red]" if r.bottleneck else ""
        if r.unserved:
            note = (note + " " if note else "") + (
                f"no consumer: start `conveyor worker {plan.directory or 'PLAN_DIR'} "
                f"--stage {r.stage}`"
            )
        table.add_row(
            r.stage, "-" if r.depth is None else str(r.depth), consumers,
            f"{r.arrival_rps:.1f}", f"{r.completion_rps:.1f}", _ms(r.p50_s), _ms(r.p99_s),
            "-" if r.mean_batch is None else f"{r.mean_batch:.1f}",
            f"{r.errors:.0f}", f"{r.dead:.0f}", "-" if r.suspects is None else str(r.suspects),
            note,
        )
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


__all__ = ["add_parsers", "cmd_status", "render", "sample", "scrape"]
