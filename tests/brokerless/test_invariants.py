"""Property test: whatever consumers do, the broker neither loses nor duplicates a message.

Hypothesis drives random publishes, consumers (on several connections), settlements,
prefetch changes, cancels and closes against one queue with a dead-letter queue and a
delivery limit; after every step the counts must add up, and at the end every message
was acked exactly once or dead-lettered exactly once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brokerless import Broker, BrokerlessConsumer, BrokerlessDelivery, BrokerlessTransport
from brokerless.transport import ConsumerState, DeliveryState
from conveyor.transport import Delivery, ExchangeSpec, ExchangeType, Message, QueueSpec

BODY_SIZE = 8

ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 5)),
        st.tuples(st.just("consume"), st.integers(0, 4)),
        st.tuples(st.sampled_from(["ack", "reject", "requeue"]), st.integers(0, 99)),
        st.tuples(st.just("prefetch"), st.integers(0, 4)),
        st.tuples(st.just("cancel"), st.integers(0, 99)),
        st.tuples(st.just("close"), st.integers(0, 99)),
    ),
    max_size=40,
)


@dataclass
class World:
    broker: Broker = field(default_factory=lambda: Broker(max_bytes=1 << 20))
    connections: list[BrokerlessTransport] = field(default_factory=list)
    consumers: list[BrokerlessConsumer] = field(default_factory=list)
    pending: list[BrokerlessDelivery] = field(default_factory=list)
    #: the highest prefetch each consumer ever had (0 = unlimited counts as infinite)
    ceilings: dict[int, float] = field(default_factory=dict)
    published: int = 0
    acked: list[bytes] = field(default_factory=list)

    async def handler(self, delivery: Delivery) -> None:
        assert isinstance(delivery, BrokerlessDelivery)
        assert delivery.redelivered == (delivery.delivery_count > 1)
        self.pending.append(delivery)

    def check_counts(self) -> None:
        q = self.broker.queue_statistics("q")
        dead = self.broker.queue_statistics("dead")
        held = q.ready + q.unacked + dead.ready
        assert self.published == len(self.acked) + held
        assert self.broker.statistics().memory.used_bytes == BODY_SIZE * held
        for consumer in self.consumers:
            # a lowered prefetch may leave more in flight, but never more than ever allowed
            assert consumer.unsettled <= self.ceilings[id(consumer)]

    def allow(self, consumer: BrokerlessConsumer, prefetch: int) -> None:
        limit = float("inf") if prefetch == 0 else prefetch
        self.ceilings[id(consumer)] = max(self.ceilings.get(id(consumer), 0), limit)


async def step(world: World, op: str, arg: int) -> None:
    if op == "publish":
        for _ in range(arg):
            body = f"m{world.published:07d}".encode()
            await world.connections[0].publish("", Message(body=body), "q")
            world.published += 1
    elif op == "consume":
        connection = world.broker.connect()
        world.connections.append(connection)
        consumer = await connection.consume("q", world.handler, prefetch=arg)
        world.allow(consumer, arg)
        world.consumers.append(consumer)
    elif op in ("ack", "reject", "requeue"):
        settleable = [d for d in world.pending if d.state is DeliveryState.PENDING]
        if settleable:
            delivery = settleable[arg % len(settleable)]
            world.pending.remove(delivery)
            if op == "ack":
                await delivery.ack()
                world.acked.append(delivery.message.body)
            elif op == "reject":
                await delivery.reject()
            else:
                await delivery.requeue()
    elif op == "prefetch" and world.consumers:
        world.allow(world.consumers[-1], arg)
        await world.consumers[-1].set_prefetch(arg)
    elif op == "cancel" and world.consumers:
        await world.consumers.pop(arg % len(world.consumers)).cancel()
    elif op == "close" and len(world.connections) > 1:
        connection = world.connections.pop(1 + arg % (len(world.connections) - 1))
        await connection.close(grace=0)
        world.consumers = [c for c in world.consumers if c.state is ConsumerState.ACTIVE]


async def scenario(steps: list[tuple[str, int]]) -> None:
    world = World()
    admin = world.broker.connect()
    world.connections.append(admin)
    await admin.declare_exchange(ExchangeSpec("dlx", ExchangeType.FANOUT))
    await admin.declare_queue(QueueSpec("dead"))
    await admin.bind_queue("dead", "dlx")
    await admin.declare_queue(QueueSpec("q", dead_letter_exchange="dlx", delivery_limit=3))
    for op, arg in steps:
        await step(world, op, arg)
        world.check_counts()

    for connection in world.connections[1:]:
        await connection.close(grace=0)
    drained: list[bytes] = []
    done = asyncio.Event()
    expected = world.published - len(world.acked)

    async def drain(delivery: Delivery) -> None:
        await delivery.ack()
        drained.append(delivery.message.body)
        if len(drained) == expected:
            done.set()

    if expected:
        await admin.consume("q", drain, prefetch=0)
        await admin.consume("dead", drain, prefetch=0)
        await asyncio.wait_for(done.wait(), 5)
    everything = sorted(world.acked + drained)
    assert everything == [f"m{i:07d}".encode() for i in range(world.published)]
    await admin.close(grace=0)
    assert world.broker.statistics().memory.used_bytes == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_no_message_is_lost_or_duplicated(steps: list[tuple[str, int]]) -> None:
    asyncio.run(scenario(steps))
