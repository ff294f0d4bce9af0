"""Scheduling benchmark: static vs dynamic vs hybrid under a shifting load.

    python -m bench.bench_scheduling [--broker URL | --no-rabbitmq] [--scale 1.0] [--png PATH]

A two-stage pipeline of synthetic workers (``tests.support.synthetic``: the service time is an
injected delay, so rates are known and the machine's CPU is not the bottleneck):

* stage ``a``: worker ``a1`` (3 ms) and the flexible worker ``flex`` (home ``a``, 3 ms
  there, 10 ms on ``b``);
* stage ``b`` (the heterogeneous one): ``b1`` and ``b2`` at 10 ms, ``b3`` at 40 ms
  (4x slower): capacity 225 requests/s.

Open-loop arrivals (requests published at a fixed rate whatever the replies do):
phase 1, 30% of ``b``'s capacity; phase 2, 90%; phase 3, still 90%, but ``b1`` slows
down 4x (``b``'s own capacity drops to 150/s: only a moved flexible worker can carry the
load). Then arrivals stop and the backlog drains.

Each policy gets a fresh pipeline (same plan schedule: prefetch 50; hybrid bounds
[2, 32], at most one flexible worker moved). Printed: throughput (requests / time from the
first publish to the last reply), p50 / p99 end-to-end latency overall and in phase 3, and
the controller's decisions. The PNG shows ``b``'s queue depth and each worker's rate on
``b`` over time for every policy and transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conveyor.errors import ConveyorError
from conveyor.plan import Plan, Scheduling, StageSchedule
from conveyor.topology import Topology
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from tests.support.synthetic import Route, SyntheticWorker, synthetic_plan
from workers.control.agent import ControlAgent, command_queue
from workers.control.controller import Controller, heartbeat_queue, state_queue
from workers.control.policies import POLICIES, PolicyConfig, PolicyKind

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"  # the local test broker (guest only)
CAPACITY_B = 225.0
WORKERS: dict[str, tuple[dict[str, float], tuple[str, ...]]] = {
    "a1": ({"a": 0.003}, ("a",)),
    "flex": ({"a": 0.003, "b": 0.010}, ("a",)),
    "b1": ({"b": 0.010}, ("b",)),
    "b2": ({"b": 0.010}, ("b",)),
    "b3": ({"b": 0.040}, ("b",)),
}
SAMPLE_S = 0.25


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    load: float  # fraction of CAPACITY_B
    slow_b1: bool = False


@dataclass
class Outcome:
    transport: str
    policy: str
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p99_phase3_ms: float = 0.0
    sent: int = 0
    answered: int = 0
    metrics: dict[str, int] = field(default_factory=dict)
    #: (t, depth of b's queue)
    depth: list[tuple[float, int]] = field(default_factory=list)
    #: worker -> (t, requests/s on stage b)
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def make_plan() -> Plan:
    sched = Scheduling(
        default=StageSchedule(prefetch=50, prefetch_min=2, prefetch_max=32, max_batch=1),
        max_moves=1,
    )
    return synthetic_plan(["a", "b"], scheduling=sched, name=f"bench{uuid.uuid4().hex[:8]}")


async def connect(url: str | None, broker: object | None) -> Transport:
    if url is None:
        from brokerless import Broker

        assert isinstance(broker, Broker)
        return broker.connect()
    from workers.amqp import AmqpTransport

    return await AmqpTransport.connect(url)


async def run_policy(kind: str, url: str | None, policy: PolicyKind, phases: list[Phase],
                     period: float) -> Outcome:
    from brokerless import Broker

    broker = Broker() if url is None else None
    plan = make_plan()
    topo = Topology.of(plan)
    admin = await connect(url, broker)
    await declare_plan_topology(admin, plan)
    results = f"{topo.base}.results"
    await admin.declare_queue(QueueSpec(results))
    latencies: list[tuple[float, float]] = []  # (sent, latency)
    done_b: list[tuple[float, str]] = []  # (time, worker on b)

    async def on_result(d: Delivery) -> None:
        now = time.perf_counter()
        h = d.message.headers
        sent = float(h.get("x-sent") or now)
        latencies.append((sent, now - sent))
        path = str(h.get("x-path") or "")
        for hop in path.split(","):
            if hop.startswith("b@"):
                done_b.append((now, hop[2:]))
        await d.ack()

    results_consumer = await admin.consume(results, on_result, prefetch=2000)
    workers: dict[str, SyntheticWorker] = {}
    agents: list[ControlAgent] = []
    transports: list[Transport] = [admin]
    for wid, (service, home) in WORKERS.items():
        t = await connect(url, broker)
        transports.append(t)
        w = SyntheticWorker(t, plan, wid, service, home, prefetch=50,
                            result_route=Route("", results))
        await w.start()
        agent = ControlAgent(t, topo, w, wid, period=period / 2)
        await agent.start()
        workers[wid] = w
        agents.append(agent)
    ct = await connect(url, broker)
    transports.append(ct)
    controller = Controller(ct, plan, PolicyConfig.from_plan(plan, policy), period=period,
                            report_every=0)
    await controller.start()
    out = Outcome(kind, policy)
    b_queue = topo.stage_queue("b")
    t0 = time.perf_counter()
    sampling = True

    async def sample() -> None:
        while sampling:
            with contextlib.suppress(ConveyorError):
                depth = (await admin.queue_stats(b_queue)).depth
                out.depth.append((time.perf_counter() - t0, depth))
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    sent = 0
    phase3_start = phase3_end = 0.0
    pending: set[asyncio.Task[None]] = set()
    for ph in phases:
        if ph.slow_b1:
            workers["b1"].slowdown = 4.0
            phase3_start = time.perf_counter()
        rate = ph.load * CAPACITY_B
        start = time.perf_counter()
        owed = 0.0
        last = start
        while (now := time.perf_counter()) - start < ph.seconds:
            owed += rate * (now - last)
            last = now
            while owed >= 1:
                owed -= 1
                sent += 1
                msg = Message(body=b"x" * 64, message_id=f"r{sent}",
                              headers={"x-sent": time.perf_counter()})
                task = asyncio.create_task(admin.publish(topo.input_exchange, msg, ""))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(0.005)
        if ph.slow_b1:
            phase3_end = time.perf_counter()
    await asyncio.gather(*pending)
    out.sent = sent
    deadline = time.perf_counter() + 120
    while len(latencies) < sent and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # the drain: polled, a benchmark has no event for it
    sampling = False
    await sampler
    out.answered = len(latencies)
    end = max((s + lat for s, lat in latencies), default=t0)
    first = min((s for s, _ in latencies), default=t0)
    lat = np.array([x for _, x in latencies]) * 1000
    out.throughput = len(latencies) / (end - first) if latencies else 0.0
    out.p50_ms = float(np.percentile(lat, 50)) if len(lat) else 0.0
    out.p99_ms = float(np.percentile(lat, 99)) if len(lat) else 0.0
    p3 = np.array([x for s, x in latencies if phase3_start <= s < phase3_end]) * 1000
    out.p99_phase3_ms = float(np.percentile(p3, 99)) if len(p3) else 0.0
    out.metrics = dict(controller.metrics)
    # per-worker rate on b, per SAMPLE_S bucket
    horizon = end - t0
    edges = np.arange(0, horizon + SAMPLE_S, SAMPLE_S)
    for wid in ("b1", "b2", "b3", "flex"):
        ts = np.array([t - t0 for t, w in done_b if w == wid])
        counts, _ = np.histogram(ts, bins=edges)
        out.rates[wid] = [(float(edges[i]), float(c) / SAMPLE_S) for i, c in enumerate(counts)]

    await controller.stop()
    for agent in agents:
        await agent.stop()
    for w in workers.values():
        await w.stop()
    await results_consumer.cancel()
    with contextlib.suppress(ConveyorError):
        await delete_plan_topology(admin, plan)
        for q in [results, heartbeat_queue(topo), state_queue(topo),
                  *(command_queue(topo, w) for w in workers)]:
            await admin.delete_queue(q)
    for t in transports:
        with contextlib.suppress(ConveyorError):
            await t.close(grace=0.5)
    return out


def plot(outcomes: list[Outcome], phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(o.transport for o in outcomes))
    fig, axes = plt.subplots(2 * len(kinds), len(POLICIES), figsize=(13, 3.2 * 2 * len(kinds)),
                             sharex=True, squeeze=False)
    bounds = np.cumsum([0.0] + [p.seconds for p in phases])
    for o in outcomes:
        row = 2 * kinds.index(o.transport)
        col = POLICIES.index(o.policy)  # type: ignore[arg-type]
        ax = axes[row][col]
        ax.plot([t for t, _ in o.depth], [d for _, d in o.depth], color="tab:red")
        ax.set_title(f"{o.transport} / {o.policy}: queue depth of stage b")
        ax2 = axes[row + 1][col]
        for wid, series in o.rates.items():
            ax2.plot([t for t, _ in series], [r for _, r in series], label=wid)
        ax2.set_title(f"{o.transport} / {o.policy}: rate on stage b (req/s)")
        ax2.legend(fontsize=7, loc="upper left")
        for a in (ax, ax2):
            for b in bounds[1:-1]:
                a.axvline(b, color="grey", linestyle=":", linewidth=0.8)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| transport | policy | throughput req/s | p50 ms | p99 ms | p99 ms in phase 3 | "
        "answered | prefetch changes | worker moves / returns |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        m = Counter(o.metrics)
        lines.append(
            f"| {o.transport} | {o.policy} | {o.throughput:.1f} | {o.p50_ms:.1f} | "
            f"{o.p99_ms:.1f} | {o.p99_phase3_ms:.1f} | {o.answered}/{o.sent} | "
            f"{m['prefetch_changes']} | {m['worker_moves']} / {m['worker_returns']} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    s = args.scale
    phases = [Phase("30%", 5 * s, 0.30), Phase("90%", 8 * s, 0.90),
              Phase("90%, b1 4x slower", 10 * s, 0.90, slow_b1=True)]
    targets: list[tuple[str, str | None]] = [("brokerless", None)]
    if not args.no_rabbitmq:
        targets.append(("rabbitmq", args.broker or os.environ.get("CONVEYOR_AMQP_URL",
                                                                  DEFAULT_URL)))
    outcomes = []
    for kind, url in targets:
        for policy in POLICIES:
            o = await run_policy(kind, url, policy, phases, args.period)
            print(f"{kind:10s} {policy:8s} {o.throughput:7.1f} req/s  p50 {o.p50_ms:7.1f} ms  "
                  f"p99 {o.p99_ms:7.1f} ms  p99(phase 3) {o.p99_phase3_ms:7.1f} ms  "
                  f"answered {o.answered}/{o.sent}  {dict(sorted(o.metrics.items()))}",
                  flush=True)
            outcomes.append(o)
    print()
    print(table(outcomes))
    plot(outcomes, phases, Path(args.png))
    print(f"\nplot: {args.png}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default=None, help="RabbitMQ URL (default: the local one)")
    p.add_argument("--no-rabbitmq", action="store_true")
    p.add_argument("--scale", type=float, default=1.0, help="multiply phase lengths")
    p.add_argument("--period", type=float, default=0.5, help="controller period (s)")
    p.add_argument("--png", default=str(Path(__file__).parent / "scheduling.png"))
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
