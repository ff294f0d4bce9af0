"""Worker processes and queue checks of the fault suite (used by its tests and fixtures).

``Workers`` runs ``python -m conveyor worker`` subprocesses that find the broker in
``CONVEYOR_AMQP_URL`` (never on their command line).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.topology_setup import stage_queues
from tests.support.pipeline import REPO


class Workers:
    """``python -m conveyor worker`` processes for a plan, the URL in their environment."""

    def __init__(self, plan: Plan, url: str, log_dir: Path, *extra: str) -> None:
        self.plan = plan
        self.url = url
        self.log_dir = log_dir
        self.extra = extra
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._started = 0

    def start(self, stage: str) -> subprocess.Popen[bytes]:
        self._started += 1
        log = (self.log_dir / f"worker-{stage}-{self._started}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "CONVEYOR_AMQP_URL": self.url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", str(self.plan.directory),
             "--stage", stage, "--device", "cpu", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        log.close()
        self.procs.setdefault(stage, []).append(proc)
        return proc

    def start_all(self) -> None:
        for stage in self.plan.stage_names:
            self.start(stage)

    def live(self, stage: str) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs.get(stage, []) if p.poll() is None]

    def logs(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.log_dir.glob("worker-*.log")))

    def logs_of(self, stage: str) -> str:
        """Everything the workers of ``stage`` have logged so far."""
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob(f"worker-{stage}-*.log")))

    def stop_all(self, timeout: float = 20.0) -> None:
        live = [p for ps in self.procs.values() for p in ps if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def plan_queues(plan: Plan) -> list[str]:
    return [q for s in plan.stages for q in stage_queues(plan, s)]


async def wait_consumed(url: str, plan: Plan, workers: Workers, *, at_least: int = 1,
                        timeout: float = 120.0) -> None:  # noqa: ASYNC109
    """Until every queue of the plan has ``at_least`` consumers (workers up), or fail."""
    from conveyor.errors import TransportError
    from workers.amqp import AmqpTransport

    admin = await AmqpTransport.connect(url)
    give_up = time.monotonic() + timeout
    try:
        while True:
            idle = []
            for q in plan_queues(plan):
                try:
                    if (await admin.queue_stats(q)).consumers < at_least:
                        idle.append(q)
                except TransportError:
                    idle.append(q)
            if not idle:
                return
            if time.monotonic() > give_up:
                raise AssertionError(f"no consumers on {idle}\n{workers.logs()}")
            await asyncio.sleep(0.1)  # polling the broker's consumer counts
    finally:
        await admin.close(grace=0.5)


async def queue_depths(url: str, plan: Plan) -> dict[str, int]:
    """Messages ready in every queue of the plan, its suspect queues and its dead-letter
    queue included."""
    from workers.amqp import AmqpTransport

    admin = await AmqpTransport.connect(url)
    try:
        topo = Topology.of(plan)
        work = plan_queues(plan)
        names = [*work, *map(topo.suspect_queue, work), topo.dead_letter_queue]
        return {q: (await admin.queue_stats(q)).depth for q in names}
    finally:
        await admin.close(grace=0.5)
