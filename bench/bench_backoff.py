"""CPU of a stage-0 worker whose next-stage queue is full (RabbitMQ), with and without back-off.

    PYTHONPATH=. python -m bench.bench_backoff [--seconds 8] [--url amqp://...]

``--old`` replays the behaviour before the back-off: a refused publish requeues the input
(``Outcome.RETRY``), which comes straight back. Prints CPU seconds of this process (the
worker's side; the broker's CPU is not counted) and refused publishes over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from conveyor.errors import BackpressureError, TransportError
from conveyor.plan import Plan, PlanLimits
from conveyor.topology_setup import delete_plan_topology
from conveyor.transport import Message
from tests.support.pipeline import Harness
from tests.support.plans import chain_plan
from workers import serve
from workers.amqp import AmqpTransport
from workers.outbox import Outbox
from workers.runner import Request
from workers.settlement import Outcome


def old_publish() -> list[int]:
    refused = [0]

    async def publish(
        self: Outbox, exchange: str, message: Message, routing_key: str, requests: list[Request]
    ) -> Outcome:
        try:
            await self.transport.publish(exchange, message, routing_key)
        except BackpressureError:
            refused[0] += 1
            return Outcome.RETRY
        except TransportError:
            return Outcome.RETRY
        return Outcome.OK

    Outbox._publish = publish  # type: ignore[method-assign]
    return refused


async def main(url: str, seconds: float, old: bool) -> None:
    refused = old_publish() if old else None
    with tempfile.TemporaryDirectory() as tmp:
        plan = chain_plan(Path(tmp), k=2, name=f"bo{time.time_ns()}", max_batch=1, max_delay_ms=0)
        bounded = plan.with_settings(limits=PlanLimits(max_queued_batches=2)).save(tmp)
        plan = Plan.load(bounded.directory)
        client = await Harness(await AmqpTransport.connect(url), plan).open()
        worker = await serve(plan, await AmqpTransport.connect(url), ["s0"], "cpu")
        for _ in range(100):
            await client.send({"x": np.ones((1, 4), np.float32)})
        await asyncio.sleep(1.0)
        cpu, wall = time.process_time(), time.monotonic()
        before = worker.outbox.backoffs
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        tries = refused[0] if refused is not None else worker.outbox.backoffs - before
        print(f"{'old (requeue)' if old else 'back-off'}: {cpu:.2f} CPU s in {wall:.1f} s, "
              f"{tries} refused publishes")
        await worker.stop(grace=0.5)
        await delete_plan_topology(client.transport, plan)
        await client.transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--old", action="store_true")
    a = parser.parse_args()
    asyncio.run(main(a.url, a.seconds, a.old))
