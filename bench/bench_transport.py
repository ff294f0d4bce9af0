"""Transport benchmark: one-hop latency and confirmed throughput, brokerless and RabbitMQ.

    CONVEYOR_AMQP_URL=amqp://user:pass@127.0.0.1:5672/ python -m bench.bench_transport
    python -m bench.bench_transport --only brokerless          # no RabbitMQ needed
    CONVEYOR_AMQP_SPEEDUPS=0 python -m bench.bench_transport --only rabbitmq  # plain aiormq

Each transport is measured beside a baseline in the same run:

* brokerless beside ``asyncio.Queue`` (put, get, wake the waiter: the in-process floor);
* ``workers.amqp.AmqpTransport`` beside plain aio-pika (confirm channel, ``mandatory``,
  ``Queue.consume`` and ``IncomingMessage.ack``) doing the same work on the same broker.

One hop = publish (returns once confirmed), route, deliver to a consumer, its handler
acks; the next message is published when the previous hop is complete. Latency is
reported as p50 / p99 over ``--hops`` hops after a warm-up.

Throughput = ``--messages`` messages published with their confirms kept in flight
(``asyncio.gather`` over windows of ``--window`` publishes), consumed (prefetch 256) and
acked; the clock stops when the last message has been acked. "publish" columns time the
confirmed publishes alone (the consumer drains afterwards).

The CPU column is this process's CPU time per message over the end-to-end run: the
publisher and the consumer both run here (RabbitMQ's own CPU is not in it).

Targets (issue 3): brokerless p50 <= 50 us; RabbitMQ p50 <= 1 ms; RabbitMQ >= 5,000 msg/s
for 1 KB messages with confirms in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conveyor.transport import Consumer, Delivery, Message, QueueSpec, Transport

KB = 1024
MB = 1024 * 1024
PREFETCH = 256


@dataclass
class Latency:
    name: str
    p50_us: float
    p99_us: float


@dataclass
class Throughput:
    name: str
    size: int
    messages: int
    end_to_end_per_s: float
    publish_per_s: float
    #: Process CPU (publisher and consumer both run here) per message, end to end.
    cpu_ms_per_msg: float = float("nan")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one hop ---------------------------------------------------------------------------

HopFn = Callable[[], Awaitable[None]]


async def time_hops(hop: HopFn, hops: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        await hop()
    samples = []
    gc.disable()
    try:
        for _ in range(hops):
            start = time.perf_counter()
            await hop()
            samples.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6


async def transport_hop_fn(transport: Transport, queue: str, body: bytes) -> tuple[HopFn, Consumer]:
    """A hop through ``transport``: publish to ``queue``, the handler acks, done."""
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[None]] = []

    async def handler(delivery: Delivery) -> None:
        await delivery.ack()
        waiter.pop().set_result(None)

    consumer = await transport.consume(queue, handler, prefetch=PREFETCH)
    message = Message(body)

    async def hop() -> None:
        done = loop.create_future()
        waiter.append(done)
        await transport.publish("", message, queue)
        await done

    return hop, consumer


async def asyncio_queue_hop_fn(body: bytes) -> tuple[HopFn, asyncio.Task[None]]:
    """The in-process floor: a consumer task takes the body from an asyncio.Queue."""
    queue: asyncio.Queue[tuple[bytes, asyncio.Future[None]]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def consumer() -> None:
        while True:
            _, done = await queue.get()
            done.set_result(None)

    task = asyncio.create_task(consumer())

    async def hop() -> None:
        done = loop.create_future()
        queue.put_nowait((body, done))
        await done

    return hop, task


# -- throughput ------------------------------------------------------------------------


class Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


async def publish_windows(
    publish: Callable[[], Awaitable[None]], messages: int, window: int
) -> float:
    start = time.perf_counter()
    sent = 0
    while sent < messages:
        batch = min(window, messages - sent)
        await asyncio.gather(*(publish() for _ in range(batch)))
        sent += batch
    return time.perf_counter() - start


async def transport_throughput(
    connect: Callable[[], Awaitable[Transport]], size: int, messages: int, window: int
) -> tuple[float, float, float]:
    """(end-to-end msg/s, publish-only msg/s, end-to-end CPU ms/msg) through a Transport."""
    body = os.urandom(size)
    results = []
    cpu_ms = float("nan")
    for consume_while_publishing in (True, False):
        transport = await connect()
        queue = f"bench.{uuid.uuid4().hex[:8]}"
        await transport.declare_queue(QueueSpec(queue))
        counter = Counter(messages)

        async def handler(delivery: Delivery, counter: Counter = counter) -> None:
            await delivery.ack()
            counter.hit()

        async def publish(transport: Transport = transport, queue: str = queue) -> None:
            await transport.publish("", Message(body), queue)

        if consume_while_publishing:
            consumer = await transport.consume(queue, handler, prefetch=PREFETCH)
            start, cpu = time.perf_counter(), time.process_time()
            await publish_windows(publish, messages, window)
            await counter.done.wait()
            results.append(messages / (time.perf_counter() - start))
            cpu_ms = (time.process_time() - cpu) / messages * 1e3
        else:
            elapsed = await publish_windows(publish, messages, window)
            results.append(messages / elapsed)
            consumer = await transport.consume(queue, handler, prefetch=PREFETCH)
            await counter.done.wait()
        await consumer.cancel()
        await transport.delete_queue(queue)
        await transport.close(grace=1.0)
    return results[0], results[1], cpu_ms


# -- plain aio-pika baseline -----------------------------------------------------------


async def aio_pika_runs(
    url: str, hops: int, warmup: int, sizes: dict[int, int], window: int
) -> tuple[Latency, list[Throughput]]:
    import aio_pika

    connection = await aio_pika.connect_robust(url)
    consume_connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consume_channel = await consume_connection.channel()
        await consume_channel.set_qos(prefetch_count=PREFETCH)
        loop = asyncio.get_running_loop()

        async def new_queue() -> aio_pika.abc.AbstractQueue:
            return await consume_channel.declare_queue(f"bench.{uuid.uuid4().hex[:8]}")

        # latency
        queue = await new_queue()
        waiter: list[asyncio.Future[None]] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            waiter.pop().set_result(None)

        tag = await queue.consume(on_message)
        body = os.urandom(KB)

        async def hop() -> None:
            done = loop.create_future()
            waiter.append(done)
            await channel.default_exchange.publish(
                aio_pika.Message(body), routing_key=queue.name, mandatory=True
            )
            await done

        p50, p99 = await time_hops(hop, hops, warmup)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        latency = Latency("aio-pika (baseline)", p50, p99)

        # throughput, end to end only
        rows = []
        for size, messages in sizes.items():
            queue = await new_queue()
            counter = Counter(messages)
            payload = os.urandom(size)

            async def counting(
                message: aio_pika.abc.AbstractIncomingMessage, counter: Counter = counter
            ) -> None:
                await message.ack()
                counter.hit()

            async def publish(name: str = queue.name, payload: bytes = payload) -> None:
                await channel.default_exchange.publish(
                    aio_pika.Message(payload), routing_key=name, mandatory=True
                )

            tag = await queue.consume(counting)
            start, cpu = time.perf_counter(), time.process_time()
            await publish_windows(publish, messages, window)
            await counter.done.wait()
            rate = messages / (time.perf_counter() - start)
            cpu_ms = (time.process_time() - cpu) / messages * 1e3
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
            rows.append(
                Throughput("aio-pika (baseline)", size, messages, rate, float("nan"), cpu_ms)
            )
        return latency, rows
    finally:
        await consume_connection.close()
        await connection.close()


# -- runs ------------------------------------------------------------------------------


async def brokerless_runs(
    hops: int, warmup: int, sizes: dict[int, int], window: int
) -> tuple[list[Latency], list[Throughput]]:
    from brokerless import Broker

    body = os.urandom(KB)
    floor, task = await asyncio_queue_hop_fn(body)
    p50, p99 = await time_hops(floor, hops, warmup)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    latencies = [Latency("asyncio.Queue (baseline)", p50, p99)]

    broker = Broker()
    transport = broker.connect()
    queue = "bench.hop"
    await transport.declare_queue(QueueSpec(queue))
    hop, _ = await transport_hop_fn(transport, queue, body)
    p50, p99 = await time_hops(hop, hops, warmup)
    await transport.close(grace=1.0)
    latencies.append(Latency("brokerless", p50, p99))

    async def connect() -> Transport:
        return broker.connect()

    rows = []
    for size, messages in sizes.items():
        e2e, pub, cpu_ms = await transport_throughput(connect, size, messages, window)
        rows.append(Throughput("brokerless", size, messages, e2e, pub, cpu_ms))
    return latencies, rows


async def rabbitmq_runs(
    url: str, hops: int, warmup: int, sizes: dict[int, int], window: int
) -> tuple[list[Latency], list[Throughput]]:
    from workers.amqp import AmqpTransport, speedups

    # The baseline runs first: AmqpTransport's first connection patches aiormq's body
    # framing for the whole process when the speedups are on (workers/amqp/speedups.py).
    name = "AmqpTransport" if speedups.decide(True).on else "AmqpTransport speedups off"
    base_latency, base_rows = await aio_pika_runs(url, hops, warmup, sizes, window)

    transport = await AmqpTransport.connect(url)
    queue = f"bench.{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(QueueSpec(queue))
    hop, consumer = await transport_hop_fn(transport, queue, os.urandom(KB))
    p50, p99 = await time_hops(hop, hops, warmup)
    await consumer.cancel()
    await transport.delete_queue(queue)
    await transport.close(grace=1.0)
    latencies = [base_latency, Latency(name, p50, p99)]

    async def connect() -> Transport:
        return await AmqpTransport.connect(url)

    rows = list(base_rows)
    for size, messages in sizes.items():
        e2e, pub, cpu_ms = await transport_throughput(connect, size, messages, window)
        rows.append(Throughput(name, size, messages, e2e, pub, cpu_ms))
    return latencies, rows


def print_tables(latencies: list[Latency], rows: list[Throughput]) -> None:
    print("\none hop, 1 KB (publish confirmed + deliver + ack)")
    print(f"{'transport':<26}{'p50 us':>10}{'p99 us':>10}")
    for lat in latencies:
        print(f"{lat.name:<26}{lat.p50_us:>10.0f}{lat.p99_us:>10.0f}")
    print("\nthroughput, confirms in flight")
    print(
        f"{'transport':<26}{'size':>8}{'msgs':>8}{'end-to-end/s':>14}{'publish/s':>12}"
        f"{'MB/s':>8}{'CPU ms/msg':>12}"
    )
    for row in rows:
        size = f"{row.size // MB} MB" if row.size >= MB else f"{row.size // KB} KB"
        mbps = row.end_to_end_per_s * row.size / MB
        print(
            f"{row.name:<26}{size:>8}{row.messages:>8}{row.end_to_end_per_s:>14,.0f}"
            f"{row.publish_per_s:>12,.0f}{mbps:>8.1f}{row.cpu_ms_per_msg:>12.3f}"
        )


async def main(args: argparse.Namespace) -> None:
    sizes = {KB: args.messages, MB: args.big_messages, 3 * MB: args.pack_messages}
    latencies: list[Latency] = []
    rows: list[Throughput] = []
    if args.only in (None, "brokerless"):
        lat, thr = await brokerless_runs(args.hops, args.warmup, sizes, args.window)
        latencies += lat
        rows += thr
    if args.only in (None, "rabbitmq"):
        url = args.url or os.environ.get("CONVEYOR_AMQP_URL")
        if not url:
            print("RabbitMQ skipped: set CONVEYOR_AMQP_URL or pass --url")
        else:
            lat, thr = await rabbitmq_runs(url, args.hops, args.warmup, sizes, args.window)
            latencies += lat
            rows += thr
    print_tables(latencies, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["brokerless", "rabbitmq"])
    parser.add_argument("--url", help="RabbitMQ URL (default: $CONVEYOR_AMQP_URL)")
    parser.add_argument("--hops", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20000, help="1 KB messages")
    parser.add_argument("--big-messages", type=int, default=200, help="1 MB messages")
    parser.add_argument("--pack-messages", type=int, default=100,
                        help="3 MB messages (a W2 request pack is 3.6 MB)")
    parser.add_argument("--window", type=int, default=256, help="publishes in flight")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
