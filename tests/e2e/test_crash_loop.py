"""A request that kills its worker process ends its loop (RabbitMQ, real processes).

The worker is restarted whenever it exits, as a supervisor would; the request holding the
marker makes it ``os._exit`` (tests/support/crashing_worker.py). It must be dead-lettered
after at most three runs with a ``CrashLoopError`` reply, and the 20 requests around it
answered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conveyor.errors import CrashLoopError
from conveyor.plan import Plan
from tests.support.crashing_worker import DIED
from tests.support.pipeline import REPO, Harness
from tests.support.plans import chain_expected, chain_plan
from workers.amqp import AmqpTransport

pytestmark = pytest.mark.rabbitmq

MARKER = 777.0


class Restarting:
    """Keeps one crashing worker process running; counts the deaths the marker caused."""

    def __init__(self, plan: Plan, url: str, log: Path) -> None:
        self.args = [sys.executable, "-m", "tests.support.crashing_worker", str(MARKER),
                     "worker", str(plan.directory), "--stage", plan.stages[0].name,
                     "--broker", url, "--device", "cpu"]
        self.log = log
        self.deaths = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as out:
            while not self._stop.is_set():
                self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                             cwd=REPO, env=env)
                code = self.proc.wait()
                if code == DIED:
                    self.deaths += 1
                elif not self._stop.is_set():
                    raise AssertionError(f"worker exited with {code}; see {self.log}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self._thread.join(30)


async def test_a_request_that_kills_its_worker_process_is_dead_lettered(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    plan = Plan.load(chain_plan(plan_dir, k=1, name=f"crash{os.getpid()}{id(tmp_path)}").directory)
    client = await Harness(await AmqpTransport.connect(rabbitmq_url), plan).open()
    workers = Restarting(plan, rabbitmq_url, tmp_path / "worker.log")
    workers.start()
    try:
        rng = np.random.default_rng(3)
        xs = [rng.random((1, 4), dtype=np.float32) for _ in range(20)]
        ids = [await client.send({"x": x}) for x in xs[:10]]
        killer = await client.send({"x": np.full((1, 4), MARKER, np.float32)})
        ids += [await client.send({"x": x}) for x in xs[10:]]
        await client.wait_for([*ids, killer], within=60, dead=1)
    finally:
        workers.stop()
        await client.close()
        await client.transport.close()
    error = client.one(killer)
    assert isinstance(error, CrashLoopError) and "3 times" in str(error), error
    assert workers.deaths >= 3  # three runs of the killer, each killed its worker
    assert killer in [m.message_id for m in client.dead]
    refused = []
    for rid, x in zip(ids, xs, strict=True):
        got = client.one(rid)
        if isinstance(got, CrashLoopError):
            refused.append(rid)
            continue
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got["y"], chain_expected(x, 1), rtol=1e-5)
    if refused or workers.deaths != 3:
        # Known gap (docs/operations.md, "Limits"): a neighbour being re-published at the
        # moment the killer's run kills the process is redelivered and charged a death
        # next to its copy; that charged duplicate can reach the limit first.
        pytest.xfail(f"{len(refused)} of 20 neighbours refused as crash loops: {refused}; "
                     f"{workers.deaths} worker deaths")
