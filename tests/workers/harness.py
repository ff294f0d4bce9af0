"""A test client speaking the wire protocol directly: publish requests, collect replies."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from conveyor import wire
from conveyor.envelope import RequestMeta, read_reply
from conveyor.errors import ConveyorError
from conveyor.packs import REPLY_PACK_TYPE, pack_requests, unpack_replies
from conveyor.plan import Plan
from conveyor.topology import Topology, partition_routing_key
from conveyor.topology_setup import declare_plan_topology, delete_plan_topology
from conveyor.transport import Delivery, Message, QueueSpec, Transport

Result = Mapping[str, np.ndarray] | ConveyorError


@dataclass
class Harness:
    transport: Transport
    plan: Plan
    replies: dict[str, list[Result]] = field(default_factory=dict)
    dead: list[Message] = field(default_factory=list)
    #: The AMQP ``type`` of each reply message received (``conveyor.replies``: a pack).
    reply_types: list[str | None] = field(default_factory=list)
    #: Named by the plan's reply scheme (workers reply to nothing else); set in __post_init__.
    reply_queue: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if not self.reply_queue:
            self.reply_queue = Topology.of(self.plan).reply_queue(uuid.uuid4().hex[:8])

    @property
    def topology(self) -> Topology:
        return Topology.of(self.plan)

    async def open(self) -> Harness:
        await declare_plan_topology(self.transport, self.plan)
        await self.transport.declare_queue(QueueSpec(self.reply_queue, auto_delete=True))
        await self.transport.consume(self.reply_queue, self._on_reply, prefetch=1000)
        await self.transport.consume(self.topology.dead_letter_queue, self._on_dead, prefetch=1000)
        return self

    async def close(self) -> None:
        with contextlib.suppress(ConveyorError):
            await delete_plan_topology(self.transport, self.plan)
            await self.transport.delete_queue(self.reply_queue)

    async def _on_reply(self, delivery: Delivery) -> None:
        self.reply_types.append(delivery.message.type)
        if delivery.message.type == REPLY_PACK_TYPE:
            for request_id, tensors in unpack_replies(delivery.message):
                self.replies.setdefault(request_id, []).append(
                    {k: v.copy() for k, v in tensors.items()}
                )
            await delivery.ack()
            self._changed.set()
            return
        rid = delivery.message.correlation_id or "?"
        result: Result
        try:
            result = {k: v.copy() for k, v in read_reply(delivery.message).tensors.items()}
        except ConveyorError as exc:
            result = exc
        self.replies.setdefault(rid, []).append(result)
        await delivery.ack()
        self._changed.set()

    async def _on_dead(self, delivery: Delivery) -> None:
        self.dead.append(delivery.message)
        await delivery.ack()
        self._changed.set()

    async def send(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        request_id: str | None = None,
        key: str | None = None,
        deadline: float | None = None,
        plan_hash: str | None = "",
        body: bytes | None = None,
    ) -> str:
        rid = request_id or uuid.uuid4().hex
        meta = RequestMeta(
            rid,
            reply_to=self.reply_queue,
            deadline=deadline,
            plan_hash=self.plan.hash if plan_hash == "" else plan_hash,
            key=key,
        )
        message = meta.to_message(wire.encode(tensors) if body is None else body)
        await self.publish(message, key)
        return rid

    async def send_pack(
        self,
        requests: list[Mapping[str, np.ndarray]],
        *,
        deadlines: list[float | None] | None = None,
        packed_replies: bool = True,
    ) -> list[str]:
        """Publish ``requests`` as one request pack (conveyor.packs); their ids."""
        metas = [
            RequestMeta(
                uuid.uuid4().hex,
                reply_to=self.reply_queue,
                deadline=None if deadlines is None else deadlines[i],
                plan_hash=self.plan.hash,
                packed_replies=packed_replies,
            )
            for i in range(len(requests))
        ]
        message = pack_requests(self.plan.hash, list(zip(metas, requests, strict=True)))
        await self.publish(message)
        return [m.request_id for m in metas]

    async def publish(self, message: Message, key: str | None = None) -> None:
        routing_key = partition_routing_key(self.plan.partitioning, key)
        await self.transport.publish(self.topology.input_exchange, message, routing_key)

    async def wait_for(self, ids: list[str], within: float = 20.0, dead: int = 0) -> None:
        """Until every id has a reply and ``dead`` messages were dead-lettered."""
        until = time.monotonic() + within
        while not (all(i in self.replies for i in ids) and len(self.dead) >= dead):
            left = until - time.monotonic()
            if left <= 0:
                missing = [i for i in ids if i not in self.replies]
                raise AssertionError(
                    f"{len(missing)} of {len(ids)} replies missing, {len(self.dead)}/{dead} dead"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def one(self, rid: str) -> Result:
        """The reply for ``rid`` (duplicates must agree)."""
        results = self.replies[rid]
        return results[0]
