"""The demo's two ways to serve a plan, each with the controller running beside it.

``serve_in_process``: the client, every stage and the controller in this process on the
embedded broker (the workers' control agent sends heartbeats as a worker process's does).
``serve_on_rabbitmq``: one ``conveyor worker`` process per stage on RabbitMQ, started
and stopped here (the URL reaches them through ``$CONVEYOR_AMQP_URL``, never argv), the
controller and the client in this process. Both return what was answered and the
per-stage figures (in-process: the workers' own statistics; RabbitMQ: each worker's
exit line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from conveyor.app.transports import AMQP_URL_ENV, BrokerTarget
from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from conveyor.client import Client
    from conveyor.plan import Plan
    from conveyor.transport import Transport

#: How often the demo's controller decides and the workers send heartbeats (seconds).
PERIOD = 0.5
POLICY: Literal["static", "dynamic", "hybrid"] = "hybrid"
#: Seconds a worker process may take to say it is ready.
WORKER_START_S = 60.0

Requests = list[dict[str, np.ndarray]]
SendAll = Callable[["Client"], Any]


@dataclass
class Served:
    outputs: Requests
    latencies: list[float]
    seconds: float
    providers: tuple[str, ...] = ()
    stages: list[dict[str, Any]] = field(default_factory=list)
    controller: str = ""


@contextlib.asynccontextmanager
async def controller_on(transport: Transport, plan: Plan) -> AsyncIterator[list[str]]:
    """The plan's controller for the block; yields a list that gets its summary line."""
    from workers.control import Controller, PolicyConfig

    summary: list[str] = []
    controller = Controller(transport, plan, PolicyConfig.from_plan(plan, POLICY),
                            period=PERIOD, report_every=0)
    async with controller:
        yield summary
        kinds = Counter(type(d.decision).__name__ for d in controller.decisions)
        m = controller.metrics
        summary.append(
            f"controller: policy {POLICY}, every {PERIOD:g} s: {m['steps']} steps, "
            f"{m['heartbeats']} heartbeats from {len(controller.workers)} worker(s), "
            f"{len(controller.decisions)} decision(s)"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else "")
        )


async def serve_in_process(
    plan: Plan, send: Callable[[Client, bool], Any]
) -> Served:
    """Client, stages and controller in this process; ``send(client, measured)`` runs the
    requests (a warm-up when not ``measured``) and returns (outputs, latencies)."""
    from conveyor.app.connect import connect
    from conveyor.topology import Topology
    from workers.control import ControlAgent

    client = connect(None, plan=plan)
    async with client:
        assert client.broker is not None and client.workers is not None
        workers = client.workers
        agent_transport, control_transport = client.broker.connect(), client.broker.connect()
        agent = ControlAgent(agent_transport, Topology.of(plan), workers, workers.worker_id,
                             period=PERIOD)
        await agent.start()
        try:
            async with controller_on(control_transport, plan) as summary:
                await send(client, False)
                start = time.perf_counter()
                outputs, latencies = await send(client, True)
                seconds = time.perf_counter() - start
                await asyncio.sleep(PERIOD * 1.5)  # one more decision sees the last load
        finally:
            await agent.stop()
            await agent_transport.close(grace=0.5)
            await control_transport.close(grace=0.5)
        stages = [{"stage": s.stage, "requests": s.requests, "batches": s.batches,
                   "mean_batch": s.mean_batch, "ms_per_request": s.service_ms_per_request}
                  for s in workers.stats().stages if s.provider]
        providers = tuple(dict.fromkeys(p for p in workers.providers.values() if p))
    return Served(outputs, latencies, seconds, providers, stages, summary[0] if summary else "")


async def serve_on_rabbitmq(
    plan: Plan, url: str, send: Callable[[Client, bool], Any], out: Any
) -> Served:
    """One ``conveyor worker`` process per stage on RabbitMQ; client and controller here."""
    from conveyor.app.connect import connect

    target = BrokerTarget(url)
    # The demo's plan has the same name every run: its queues are the demo's own, deleted
    # before (leftovers of an earlier run, perhaps declared with other flags) and after.
    await _delete_topology(target, plan)
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-logs-") as logs:
        procs = await start_workers(plan, url, Path(logs))
        print(f"started {len(procs)} worker process(es) on {target.describe()}: "
              + ", ".join(f"{s} (pid {p.pid})" for s, p in procs.items()), file=out, flush=True)
        try:
            control_transport = await target.connect()
            try:
                async with controller_on(control_transport, plan) as summary, \
                        connect(url, plan=plan) as client:
                    await send(client, False)
                    start = time.perf_counter()
                    outputs, latencies = await send(client, True)
                    seconds = time.perf_counter() - start
                    await asyncio.sleep(PERIOD * 1.5)
            finally:
                await control_transport.close(grace=0.5)
        finally:
            await stop_workers(procs)
            await _delete_topology(target, plan)
        stages = [exit_figures(Path(logs) / f"{s}.log", s) for s in procs]
    return Served(outputs, latencies, seconds, ("CPUExecutionProvider (worker processes)",),
                  stages, summary[0] if summary else "")


async def _delete_topology(target: BrokerTarget, plan: Plan) -> None:
    from conveyor.topology import Topology
    from conveyor.topology_setup import delete_plan_topology
    from workers.control import heartbeat_queue, state_queue

    transport = await target.connect()
    try:
        topo = Topology.of(plan)
        for queue in (heartbeat_queue(topo), state_queue(topo)):
            await transport.delete_queue(queue)
        await delete_plan_topology(transport, plan)
    finally:
        await transport.close(grace=0.5)


async def start_workers(
    plan: Plan, url: str, logs: Path
) -> dict[str, asyncio.subprocess.Process]:
    env = {**os.environ, AMQP_URL_ENV: url}
    threads = str(max(1, (os.cpu_count() or 1) // len(plan.stages)))
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for stage in plan.stage_names:
            with (logs / f"{stage}.log").open("wb") as log:
                procs[stage] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "conveyor", "worker", str(plan.directory),
                    "--stage", stage, "--device", "cpu", "--threads", threads,
                    env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
                )
        for stage, proc in procs.items():
            await asyncio.wait_for(_ready(proc, logs / f"{stage}.log"), WORKER_START_S)
    except BaseException:
        await stop_workers(procs)
        raise
    return procs


async def _ready(proc: asyncio.subprocess.Process, log: Path) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        if line.strip() == b"conveyor: ready":
            return
    raise ConfigError(f"a worker exited before it was ready: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-800:] if log.exists() else "(no log)"


async def stop_workers(procs: dict[str, asyncio.subprocess.Process]) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def exit_figures(log: Path, stage: str) -> dict[str, Any]:
    """A worker's ``conveyor: stage S: N requests in B batches (mean M)`` exit line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(rf"conveyor: stage {re.escape(stage)}: (\d+) requests in (\d+) batches", text)
    requests, batches = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return {"stage": stage, "requests": requests, "batches": batches,
            "mean_batch": requests / batches if batches else 0.0, "ms_per_request": None}
