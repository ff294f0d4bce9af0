"""The controller's partition map (input routing key -> shard queue), and how it survives a
controller restart (docs/scheduling.md).

* The map is the one thing the broker cannot tell back (the Transport protocol has no
  "list bindings"). After every move it is published whole on the control exchange
  (``partitions``) into the retained-state queue ``<control>.state`` (max length 1,
  drop-head: it always holds the latest map). A starting controller reads it back and
  re-applies it.
* Re-applying ("reconciling") binds every routing key to its assigned shard and unbinds
  moved keys from their initial shard; the controller does it at start, whenever a worker
  incarnation it has not seen appears (a restarted worker re-ran the topology setup), and
  every ``reconcile_every`` periods.
* A move of a routing key unbinds it from the old shard first and then binds the new one,
  so a key reaches exactly one shard queue at any moment; a publish in the gap between the
  two calls raises ``UnroutableError`` (never lost silently) and may be retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from conveyor.control import (
    PARTITIONS_KEY,
    PartitionMap,
    decode_partition_map,
    encode_partition_map,
)
from conveyor.errors import ConveyorError
from conveyor.plan import Plan
from conveyor.topology import Topology, initial_bindings
from conveyor.transport import Delivery, Message, QueueSpec, Transport
from workers.control.policies import MovePartition

# the controller's logger: these lines are part of what the controller reports
log = logging.getLogger("workers.control.controller")


def state_queue(topology: Topology) -> str:
    return f"{topology.control_exchange}.state"


def initial_partitions(plan: Plan, topology: Topology) -> dict[str, str]:
    """Routing key -> shard queue as the topology setup binds them (empty for random)."""
    part = plan.partitioning
    if part.kind == "random":
        return {}
    return {
        key: topology.input_queue(shard)
        for shard, keys in initial_bindings(part).items()
        for key in keys
    }


class PartitionKeeper:
    """Holds the partition map in force, its epoch, and keeps the broker's bindings and the
    retained copy in step with it. Counts into the controller's ``metrics``."""

    def __init__(
        self, transport: Transport, plan: Plan, topology: Topology, metrics: Counter[str]
    ) -> None:
        self.transport = transport
        self.topology = topology
        self.metrics = metrics
        self.initial = initial_partitions(plan, topology)
        #: routing key -> shard queue now.
        self.partitions: dict[str, str] = dict(self.initial)
        self.epoch = 0

    def moved(self) -> dict[str, str]:
        """The keys not on their initial shard, with the shard they are on."""
        return {k: q for k, q in self.partitions.items() if self.initial.get(k) != q}

    async def declare(self, *, durable: bool) -> None:
        """The retained-state queue, bound to the map's routing key."""
        queue = state_queue(self.topology)
        await self.transport.declare_queue(
            QueueSpec(queue, durable=durable, max_length=1, overflow="drop-head")
        )
        await self.transport.bind_queue(queue, self.topology.control_exchange, PARTITIONS_KEY)

    async def load(self, period: float) -> None:
        """Read the retained map back (without consuming it: the delivery is never settled
        and goes back to the queue when the consumer is cancelled)."""
        body = await self._read_retained(period)
        if body is None:
            return
        try:
            pm = decode_partition_map(body)
        except ConveyorError as exc:
            log.warning("controller: ignoring an unreadable retained partition map: %s", exc)
            return
        if pm.exchange != self.topology.input_exchange:
            log.warning("controller: retained map is for %s, not this plan; ignored", pm.exchange)
            return
        for key, queue_name in pm.assignments.items():
            if key in self.partitions:
                self.partitions[key] = queue_name
        self.epoch = pm.epoch
        self.metrics["partition_map_loaded"] += 1
        log.info("controller: resumed partition map epoch %d (%d keys moved)",
                 pm.epoch, len(pm.assignments))

    async def _read_retained(self, period: float) -> bytes | None:
        queue = state_queue(self.topology)
        if (await self.transport.queue_stats(queue)).depth == 0:
            return None
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def take(delivery: Delivery) -> None:
            if not got.done():
                got.set_result(delivery.message.body)

        consumer = await self.transport.consume(queue, take, prefetch=1)
        try:
            return await asyncio.wait_for(got, timeout=max(5.0, 5 * period))
        except TimeoutError:
            log.warning("controller: the retained partition map did not arrive; starting fresh")
            return None
        finally:
            await consumer.cancel()

    async def move(self, d: MovePartition, now: float) -> None:
        log.info("controller: partition %s %s -> %s: %s", d.routing_key, d.from_queue,
                 d.to_queue, d.reason)
        exchange = self.topology.input_exchange
        # unbind first: the key reaches one shard at any moment (never two)
        await self.transport.unbind_queue(d.from_queue, exchange, d.routing_key)
        await self.transport.bind_queue(d.to_queue, exchange, d.routing_key)
        self.partitions[d.routing_key] = d.to_queue
        self.metrics["partition_moves"] += 1
        await self.publish(now, d.reason)

    async def publish(self, now: float, reason: str) -> None:
        self.epoch += 1
        pm = PartitionMap(self.epoch, self.topology.input_exchange, self.moved(), now, reason)
        await self.transport.publish(
            self.topology.control_exchange,
            Message(body=encode_partition_map(pm), type="partition_map"),
            PARTITIONS_KEY,
        )

    async def reconcile(self, why: str) -> None:
        """Make the broker's input bindings match the map (idempotent): every key bound to
        its assigned shard, moved keys unbound from their initial shard (where a topology
        setup run elsewhere may have bound them again)."""
        if not self.partitions:
            return
        exchange = self.topology.input_exchange
        for key, queue in sorted(self.partitions.items()):
            await self.transport.bind_queue(queue, exchange, key)
        moved = self.moved()
        for key in sorted(moved):
            await self.transport.unbind_queue(self.initial[key], exchange, key)
        self.metrics["partition_reconciles"] += 1
        if moved:
            log.info("controller: re-applied %d moved partition(s) (%s)", len(moved), why)
