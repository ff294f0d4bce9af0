"""RabbitMQ-only behaviour of ``workers.amqp.AmqpTransport`` (the shared semantics are in
tests/transport/): connect failures, broker refusals, quorum delivery counts, stale
deliveries after a channel or connection dies, reconnects, prefetch changes, close."""

from __future__ import annotations

import asyncio
import socket

import pytest

from conveyor.errors import BrokerUnreachable, TransportClosed, TransportError
from conveyor.transport import Delivery, ExchangeSpec, ExchangeType, Message, QueueSpec
from tests.support.amqp import Management, Rabbit
from workers.amqp import AmqpDelivery, AmqpTransport, Settlement
from workers.amqp.consumer import ConsumerState

WAIT = 10.0  # seconds any single expected event may take on a loaded 2-core machine


class Inbox:
    """Collects deliveries; tests wait on counts, never on sleeps."""

    def __init__(self) -> None:
        self.deliveries: list[AmqpDelivery] = []
        self._changed = asyncio.Condition()

    async def handler(self, delivery: Delivery) -> None:
        assert isinstance(delivery, AmqpDelivery)
        async with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()

    async def wait_for(self, count: int) -> list[AmqpDelivery]:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries

    def pending(self) -> list[AmqpDelivery]:
        return [d for d in self.deliveries if d.settlement is Settlement.PENDING]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


async def test_unreachable_broker_fails_fast_naming_address_and_cause() -> None:
    port = free_port()
    with pytest.raises(BrokerUnreachable, match=rf"127\.0\.0\.1:{port}.*(refused|failed)"):
        await AmqpTransport.connect(f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=3")


@pytest.mark.rabbitmq
async def test_bad_credentials_are_unreachable_without_leaking_the_password(
    rabbitmq_url: str,
) -> None:
    url = rabbitmq_url.replace("guest:guest@", "nobody:wrong-pw@", 1)
    with pytest.raises(BrokerUnreachable) as info:
        await AmqpTransport.connect(url)
    assert "wrong-pw" not in str(info.value)


@pytest.mark.rabbitmq
async def test_inequivalent_redeclare_names_the_queue_and_reason_and_the_transport_recovers(
    rabbit: Rabbit,
) -> None:
    transport = await rabbit.connect()
    name = rabbit.name("q")
    await transport.declare_queue(QueueSpec(name, max_length=2))
    with pytest.raises(TransportError, match=rf"{name}.*PRECONDITION_FAILED.*x-max-length"):
        await transport.declare_queue(QueueSpec(name, max_length=3))
    # the broker closed that channel; the next operation gets a fresh one
    await transport.declare_queue(QueueSpec(name, max_length=2))
    assert (await transport.queue_stats(name)).depth == 0


@pytest.mark.rabbitmq
async def test_missing_queue_and_exchange_are_named(rabbit: Rabbit) -> None:
    transport = await rabbit.connect()
    missing = rabbit.name("missing")
    with pytest.raises(TransportError, match=rf"queue '{missing}'.*NOT_FOUND"):
        await transport.queue_stats(missing)
    with pytest.raises(TransportError, match=rf"exchange '{missing}'.*NOT_FOUND"):
        await transport.publish(missing, Message(b"x"), "k")
    with pytest.raises(TransportError, match=rf"queue '{missing}'"):
        await transport.consume(missing, Inbox().handler, prefetch=1)


@pytest.mark.rabbitmq
async def test_hash_header_routes_by_the_header(rabbit: Rabbit) -> None:
    transport = await rabbit.connect()
    exchange, queues = rabbit.name("hx"), [rabbit.name(f"hq{i}") for i in range(3)]
    await transport.declare_exchange(ExchangeSpec(exchange, ExchangeType.HASH, hash_header="key"))
    for queue in queues:
        await transport.declare_queue(QueueSpec(queue))
        await transport.bind_queue(queue, exchange, "1")
    for i in range(30):
        # the routing key varies, the header does not: all must land in one queue
        await transport.publish(exchange, Message(b"x", headers={"key": "same"}), f"rk{i}")
    depths = sorted([(await transport.queue_stats(q)).depth for q in queues])
    assert depths[-1] == 30 and sum(depths) == 30


@pytest.mark.rabbitmq
async def test_quorum_queue_counts_deliveries_and_dead_letters_past_the_limit(
    rabbit: Rabbit,
) -> None:
    transport = await rabbit.connect()
    dlx, dlq, queue = rabbit.name("dlx"), rabbit.name("dlq"), rabbit.name("quorum")
    await transport.declare_exchange(ExchangeSpec(dlx, ExchangeType.FANOUT))
    await transport.declare_queue(QueueSpec(dlq))
    await transport.bind_queue(dlq, dlx)
    await transport.declare_queue(
        QueueSpec(queue, durable=True, quorum=True, delivery_limit=1, dead_letter_exchange=dlx)
    )
    inbox, dead = Inbox(), Inbox()
    await transport.consume(queue, inbox.handler, prefetch=1)
    await transport.consume(dlq, dead.handler, prefetch=1)
    await transport.publish("", Message(b"poison"), queue)

    first = (await inbox.wait_for(1))[0]
    assert (first.delivery_count, first.redelivered) == (1, False)
    await first.requeue()
    second = (await inbox.wait_for(2))[1]
    assert (second.delivery_count, second.redelivered) == (2, True)
    await second.requeue()  # the second return exceeds delivery_limit=1

    (dead_letter,) = await dead.wait_for(1)
    assert dead_letter.message.body == b"poison"
    await dead_letter.ack()
    assert len(inbox.deliveries) == 2


@pytest.mark.rabbitmq
async def test_delivery_on_a_dead_channel_is_not_settled_and_comes_back(rabbit: Rabbit) -> None:
    transport = await rabbit.connect(reconnect_interval_s=0.2)
    queue = rabbit.name("q")
    await transport.declare_queue(QueueSpec(queue))
    inbox = Inbox()
    await transport.consume(queue, inbox.handler, prefetch=1)
    await transport.publish("", Message(b"m"), queue)
    (old,) = await inbox.wait_for(1)

    # Kill the consumer's channel from the broker's side: ack a tag it never sent.
    await old._channel.basic_ack((old._incoming.delivery_tag or 0) + 1000)
    again = (await inbox.wait_for(2))[1]  # aio-pika reopened the channel and re-consumed

    assert old.stale and not again.stale
    await old.ack()  # a no-op: its tag died with the channel
    assert old.settlement is Settlement.STALE
    assert again.message.body == b"m" and again.redelivered
    await again.ack()
    assert again.settlement is Settlement.ACKED
    stats = await transport.queue_stats(queue)
    assert (stats.depth, stats.consumers) == (0, 1)


@pytest.mark.rabbitmq
async def test_consumer_and_publisher_survive_the_broker_closing_their_connections(
    rabbit: Rabbit, management: Management
) -> None:
    name = rabbit.name("conn")
    transport = await rabbit.connect(reconnect_interval_s=0.2, connection_name=name)
    queue = rabbit.name("q")
    await transport.declare_queue(QueueSpec(queue, durable=True))
    inbox = Inbox()
    await transport.consume(queue, inbox.handler, prefetch=4)
    await transport.publish("", Message(b"before"), queue)
    (held,) = await inbox.wait_for(1)

    await management.close_connection(f"{name}-con")
    redelivered = (await inbox.wait_for(2))[1]
    assert held.stale and redelivered.redelivered and redelivered.message.body == b"before"
    await held.ack()
    await redelivered.ack()

    await management.close_connection(f"{name}-pub")
    async with asyncio.timeout(WAIT):
        while True:  # a publish racing the reconnect may fail; the next one must not
            try:
                await transport.publish("", Message(b"after"), queue)
                break
            except TransportError:
                await asyncio.sleep(0.1)
    after = (await inbox.wait_for(3))[-1]
    assert after.message.body == b"after"
    await after.ack()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["classic", "declared-elsewhere", "quorum"])
async def test_set_prefetch_takes_effect_on_a_running_consumer(rabbit: Rabbit, kind: str) -> None:
    # classic: channel limit; the others: per-consumer limit and consume again
    transport = await rabbit.connect()
    owner = await rabbit.connect() if kind == "declared-elsewhere" else transport
    queue = rabbit.name("q")
    await owner.declare_queue(QueueSpec(queue, durable=kind == "quorum", quorum=kind == "quorum"))
    for i in range(10):
        await transport.publish("", Message(str(i).encode()), queue)
    inbox = Inbox()
    consumer = await transport.consume(queue, inbox.handler, prefetch=1)
    await inbox.wait_for(1)
    assert (await transport.queue_stats(queue)).depth == 9  # prefetch 1 holds the rest back

    await consumer.set_prefetch(3)  # raise: more arrive without any ack
    await inbox.wait_for(3)
    assert consumer.prefetch == 3

    await consumer.set_prefetch(1)  # lower, then drain everything
    while True:
        for delivery in inbox.pending():
            await delivery.ack()
        if len(inbox.deliveries) == 10:
            break
        await inbox.wait_for(len(inbox.deliveries) + 1)
    assert [d.message.body for d in inbox.deliveries] == [str(i).encode() for i in range(10)]
    stats = await transport.queue_stats(queue)
    assert (stats.depth, stats.consumers) == (0, 1)


@pytest.mark.rabbitmq
async def test_failing_handler_dead_letters_its_message(rabbit: Rabbit) -> None:
    transport = await rabbit.connect()
    dlx, dlq, queue = rabbit.name("dlx"), rabbit.name("dlq"), rabbit.name("q")
    await transport.declare_exchange(ExchangeSpec(dlx, ExchangeType.FANOUT))
    await transport.declare_queue(QueueSpec(dlq))
    await transport.bind_queue(dlq, dlx)
    await transport.declare_queue(QueueSpec(queue, dead_letter_exchange=dlx))

    async def broken(delivery: Delivery) -> None:
        raise RuntimeError("model exploded")

    dead = Inbox()
    await transport.consume(queue, broken, prefetch=1)
    await transport.consume(dlq, dead.handler, prefetch=1)
    await transport.publish("", Message(b"bad"), queue)
    (letter,) = await dead.wait_for(1)
    assert letter.message.body == b"bad"
    await letter.ack()


@pytest.mark.rabbitmq
async def test_close_lets_handlers_finish_within_grace_and_requeues_the_rest(
    rabbit: Rabbit,
) -> None:
    transport = await rabbit.connect()
    queue, out = rabbit.name("q"), rabbit.name("out")
    await transport.declare_queue(QueueSpec(queue))
    await transport.declare_queue(QueueSpec(out))
    release, started = asyncio.Event(), Inbox()

    async def handler(delivery: Delivery) -> None:
        await started.handler(delivery)
        if delivery.message.body == b"quick":
            await release.wait()
            await transport.publish("", Message(b"result"), out)  # still allowed while closing
            await delivery.ack()
        else:
            await asyncio.Event().wait()  # never finishes: cancelled after grace

    await transport.consume(queue, handler, prefetch=2)
    await transport.publish("", Message(b"quick"), queue)
    await transport.publish("", Message(b"stuck"), queue)
    await started.wait_for(2)

    closing = asyncio.create_task(transport.close(grace=0.5))
    release.set()
    await closing

    check = await rabbit.connect()
    assert (await check.queue_stats(out)).depth == 1
    again = Inbox()
    await check.consume(queue, again.handler, prefetch=5)
    (stuck,) = await again.wait_for(1)
    assert stuck.message.body == b"stuck" and stuck.redelivered
    await stuck.ack()


@pytest.mark.rabbitmq
async def test_consumer_ends_when_its_queue_is_deleted(rabbit: Rabbit) -> None:
    transport = await rabbit.connect()
    queue = rabbit.name("q")
    await transport.declare_queue(QueueSpec(queue))
    consumer = await transport.consume(queue, Inbox().handler, prefetch=1)
    await transport.delete_queue(queue)
    async with asyncio.timeout(WAIT):
        await consumer.wait_closed()
    assert consumer.state is ConsumerState.CLOSED
    # the transport is unaffected
    await transport.declare_queue(QueueSpec(queue))
    await transport.publish("", Message(b"x"), queue)
    assert (await transport.queue_stats(queue)).depth == 1


@pytest.mark.rabbitmq
async def test_operations_after_close_raise_transport_closed(rabbit: Rabbit) -> None:
    transport = await rabbit.connect()
    await transport.close(grace=0)
    with pytest.raises(TransportClosed, match="closed"):
        await transport.publish("", Message(b"x"), "anything")
    with pytest.raises(TransportClosed):
        await transport.declare_queue(QueueSpec(rabbit.name("q")))
    await transport.close()  # a second close is a no-op


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["classic", "declared-elsewhere"])
async def test_prefetch_from_unlimited_to_a_limit(rabbit: Rabbit, kind: str) -> None:
    transport = await rabbit.connect()
    owner = await rabbit.connect() if kind == "declared-elsewhere" else transport
    queue = rabbit.name("q")
    await owner.declare_queue(QueueSpec(queue))
    inbox = Inbox()
    consumer = await transport.consume(queue, inbox.handler, prefetch=0)  # 0 = unlimited
    await consumer.set_prefetch(3)
    for i in range(30):
        await transport.publish("", Message(str(i).encode()), queue)
    await inbox.wait_for(3)
    assert (await transport.queue_stats(queue)).depth == 27
