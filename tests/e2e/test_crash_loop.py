"""A request that kills its worker process ends its loop (RabbitMQ, real processes).

The worker is restarted whenever it exits, as a supervisor would; the request holding the
marker makes it ``os._exit`` (tests/support/crashing_worker.py). It must be dead-lettered
after at most three runs with a ``CrashLoopError`` reply, and the 20 requests around it
answered: each neighbour dies with the killer once at most, the first time, and then runs on
its own from the suspect queue (workers/redelivery.py).
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
from conveyor.topology import Topology
from tests.support.crashing_worker import DIED
from tests.support.pipeline import REPO, Harness
from tests.support.plans import chain_expected, chain_plan
from tests.support.polling import until
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
                out.write(f"-- worker {self.proc.pid} exited with {code}\n".encode())
                out.flush()
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


@pytest.mark.timeout(180)  # a hang fails with a stack dump (pytest-timeout)
async def test_a_request_that_kills_its_worker_process_is_dead_lettered(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    plan = Plan.load(chain_plan(plan_dir, k=1, name=f"crash{os.getpid()}{id(tmp_path)}").directory)
    client = await Harness(await AmqpTransport.connect(rabbitmq_url), plan).open()
    workers = Restarting(plan, rabbitmq_url, tmp_path / "worker.log")
    workers.start()
    shard = Topology.of(plan).input_queue(0)
    queues = [shard, Topology.of(plan).suspect_queue(shard)]
    try:
        rng = np.random.default_rng(3)
        xs = [rng.random((1, 4), dtype=np.float32) for _ in range(20)]
        ids = [await client.send({"x": x}) for x in xs[:10]]
        killer = await client.send({"x": np.full((1, 4), MARKER, np.float32)})
        ids += [await client.send({"x": x}) for x in xs[10:]]
        await client.wait_for([*ids, killer], within=60, dead=1)
        # Nothing is left behind: no copy waits in the input or the suspect queue.
        await until(lambda: _empty(client, queues), 10, f"{queues} empty")
    finally:
        workers.stop()
        await client.close()
        await client.transport.close()
    error = client.one(killer)
    assert isinstance(error, CrashLoopError), error
    assert "delivered 3 times" in str(error) and killer in str(error), error
    assert workers.deaths == 3, f"{workers.deaths} deaths; see {workers.log}"
    assert {m.message_id for m in client.dead} == {killer}
    for rid, x in zip(ids, xs, strict=True):
        for got in client.replies[rid]:  # duplicates (a copy and what it replaced) agree
            assert not isinstance(got, Exception), f"neighbour {rid}: {got!r}"
            np.testing.assert_allclose(got["y"], chain_expected(x, 1), rtol=1e-5)


async def _empty(client: Harness, queues: list[str]) -> bool:
    return all([(await client.transport.queue_stats(q)).depth == 0 for q in queues])
