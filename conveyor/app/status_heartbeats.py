"""Workers' heartbeats as the source of ``conveyor status`` rates when no metrics endpoint
is given.

Every worker's control agent publishes a heartbeat each period (1 s by default) on the
plan's control exchange, routing key ``heartbeat.<worker>`` (docs/scheduling.md). It
carries, per stage the worker runs, cumulative requests, batches and errors, what is in
flight, and the recent service time per batch. ``HeartbeatTap`` binds a queue of its own
(exclusive, auto-delete: it goes with the status command's connection) to those keys and
keeps each worker's latest heartbeat; ``add_to`` sums them into the per-stage samples that
``conveyor.app.status.compare`` turns into rates. A heartbeat older than ``max_age_s``
(a worker that stopped) no longer counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import MutableMapping

from conveyor.app.status import StageSample
from conveyor.control import Heartbeat, decode_heartbeat
from conveyor.errors import ConveyorError
from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.transport import Consumer, Delivery, QueueSpec, Transport

log = logging.getLogger(__name__)

#: How long ``wait_first`` waits for a heartbeat: a little over two default periods.
FIRST_HEARTBEAT_S = 2.5


class HeartbeatTap:
    """The latest heartbeat of every worker of a plan, read from its control exchange."""

    def __init__(self, transport: Transport, plan: Plan, *, max_age_s: float = 5.0) -> None:
        self._transport = transport
        self._plan = plan
        self._topology = Topology.of(plan)
        self._queue = f"{self._topology.control_exchange}.status.{uuid.uuid4().hex[:12]}"
        self._max_age_s = max_age_s
        self._latest: dict[str, tuple[float, Heartbeat]] = {}
        self._first = asyncio.Event()
        self._consumer: Consumer | None = None

    async def start(self) -> None:
        await self._transport.declare_queue(
            QueueSpec(self._queue, exclusive=True, auto_delete=True))
        await self._transport.bind_queue(
            self._queue, self._topology.control_exchange, Topology.heartbeat_key("*"))
        self._consumer = await self._transport.consume(self._queue, self._on_heartbeat,
                                                       prefetch=256)

    async def wait_first(self, timeout: float = FIRST_HEARTBEAT_S) -> bool:  # noqa: ASYNC109
        """True once a heartbeat came; False after ``timeout`` seconds without one."""
        try:
            await asyncio.wait_for(self._first.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def workers(self) -> int:
        """Workers heard from within ``max_age_s``."""
        return len(self._fresh())

    def add_to(self, samples: MutableMapping[str, StageSample]) -> None:
        """Add every fresh heartbeat's per-stage counters to ``samples``."""
        for hb in self._fresh():
            for st in hb.stats.stages:
                s = samples.get(st.stage)
                if s is None:  # the worker's entry step (@input) or another plan's stage
                    continue
                s.ok += st.requests - st.errors
                s.errors += st.errors
                s.in_flight += st.in_flight
                s.batches += st.batches
                s.batch_requests += st.requests

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.cancel()
        try:
            await self._transport.delete_queue(self._queue)
        except ConveyorError as exc:  # auto-delete took it with the consumer
            log.debug("status heartbeat queue %s: %s", self._queue, exc)

    def _fresh(self) -> list[Heartbeat]:
        now = time.monotonic()
        return [hb for at, hb in self._latest.values() if now - at <= self._max_age_s]

    async def _on_heartbeat(self, delivery: Delivery) -> None:
        try:
            hb = decode_heartbeat(delivery.message.body)
        except ConveyorError as exc:
            log.debug("status: an unreadable heartbeat: %s", exc)
        else:
            seen = self._latest.get(hb.worker_id)
            if seen is None or (seen[1].incarnation, seen[1].seq) != (hb.incarnation, hb.seq):
                self._latest[hb.worker_id] = (time.monotonic(), hb)
            self._first.set()
        await delivery.ack()
