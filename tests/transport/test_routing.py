"""Routing: every exchange type, on both brokers."""

from __future__ import annotations

import pytest

from conveyor.errors import TransportError, UnroutableError
from conveyor.transport import ExchangeSpec, ExchangeType, Message, QueueSpec, Transport
from tests.support.brokers import BrokerHandle

from .support import Collector, depths, publish_bodies


async def declare_queues(t: Transport, broker: BrokerHandle, *suffixes: str) -> list[str]:
    names = [broker.name(s) for s in suffixes]
    for name in names:
        await t.declare_queue(QueueSpec(name))
    return names


async def test_default_exchange_routes_by_queue_name(broker: BrokerHandle) -> None:
    t = await broker.connect()
    a, b = await declare_queues(t, broker, "a", "b")
    await publish_bodies(t, "", a, [b"1", b"2"])
    await publish_bodies(t, "", b, [b"3"])
    assert await depths(t, [a, b]) == {a: 2, b: 1}


async def test_direct_exchange_matches_the_key_exactly(broker: BrokerHandle) -> None:
    t = await broker.connect()
    ex = broker.name("direct")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.DIRECT))
    red, blue, both = await declare_queues(t, broker, "red", "blue", "both")
    await t.bind_queue(red, ex, "red")
    await t.bind_queue(blue, ex, "blue")
    await t.bind_queue(both, ex, "red")
    await t.bind_queue(both, ex, "blue")
    await publish_bodies(t, ex, "red", [b"r1", b"r2"])
    await publish_bodies(t, ex, "blue", [b"b1"])
    with pytest.raises(UnroutableError):
        await t.publish(ex, Message(body=b"x"), "red.extra")
    assert await depths(t, [red, blue, both]) == {red: 2, blue: 1, both: 3}


async def test_fanout_copies_to_every_bound_queue(broker: BrokerHandle) -> None:
    t = await broker.connect()
    ex = broker.name("fanout")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.FANOUT))
    queues = await declare_queues(t, broker, "f1", "f2", "f3")
    for q in queues:
        await t.bind_queue(q, ex, "ignored")
    await publish_bodies(t, ex, "anything", [b"1", b"2"])
    assert await depths(t, queues) == dict.fromkeys(queues, 2)


async def test_topic_wildcards(broker: BrokerHandle) -> None:
    t = await broker.connect()
    ex = broker.name("topic")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.TOPIC))
    orange, rabbit, lazy, everything = await declare_queues(
        t, broker, "orange", "rabbit", "lazy", "all"
    )
    await t.bind_queue(orange, ex, "*.orange.*")
    await t.bind_queue(rabbit, ex, "*.*.rabbit")
    await t.bind_queue(lazy, ex, "lazy.#")
    await t.bind_queue(everything, ex, "#")
    keys = [
        "quick.orange.rabbit",  # orange, rabbit, all
        "lazy.orange.elephant",  # orange, lazy, all
        "quick.orange.fox",  # orange, all
        "lazy.brown.fox",  # lazy, all
        "lazy",  # lazy (# matches zero words), all
        "quick.orange.male.rabbit",  # all only
        "orange",  # all only
    ]
    for key in keys:
        await t.publish(ex, Message(body=key.encode()), key)
    assert await depths(t, [orange, rabbit, lazy, everything]) == {
        orange: 3,
        rabbit: 1,
        lazy: 3,
        everything: len(keys),
    }
    await t.unbind_queue(everything, ex, "#")
    with pytest.raises(UnroutableError):
        await t.publish(ex, Message(body=b"x"), "quick.orange.male.rabbit")


async def _hash_setup(broker: BrokerHandle, spec: ExchangeSpec) -> tuple[Transport, list[str]]:
    t = await broker.connect()
    await t.declare_exchange(spec)
    queues = await declare_queues(t, broker, "h1", "h2", "h3")
    for q in queues:
        await t.bind_queue(q, spec.name, "10")
    return t, queues


async def test_consistent_hash_sends_one_key_to_one_queue(broker: BrokerHandle) -> None:
    ex = broker.name("hash")
    t, queues = await _hash_setup(broker, ExchangeSpec(ex, ExchangeType.HASH))
    keys = [f"request-{i}" for i in range(60)]
    for _round in range(3):
        for key in keys:
            await t.publish(ex, Message(body=key.encode()), key)
    collector = Collector()
    for q in queues:
        await t.consume(q, collector.handler(q), prefetch=50)
    await collector.wait_for(3 * len(keys))
    for key in keys:
        assert len(collector.queues_of(key.encode())) == 1, key
    used = {q for q, _ in collector.received}
    assert len(used) >= 2, "60 keys over three weighted bindings all hashed to one queue"


async def test_consistent_hash_on_a_header(broker: BrokerHandle) -> None:
    ex = broker.name("hashhdr")
    spec = ExchangeSpec(ex, ExchangeType.HASH, hash_header="request-key")
    t, queues = await _hash_setup(broker, spec)
    keys = [f"k{i}" for i in range(40)]
    for i, key in enumerate(keys * 2):
        # the routing key varies; only the header decides
        message = Message(body=key.encode(), headers={"request-key": key})
        await t.publish(ex, message, f"rk-{i}")
    collector = Collector()
    for q in queues:
        await t.consume(q, collector.handler(q), prefetch=50)
    await collector.wait_for(2 * len(keys))
    for key in keys:
        assert len(collector.queues_of(key.encode())) == 1, key
    assert len({q for q, _ in collector.received}) >= 2


async def test_random_exchange_spreads_over_bound_queues(broker: BrokerHandle) -> None:
    t = await broker.connect()
    ex = broker.name("random")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.RANDOM))
    queues = await declare_queues(t, broker, "r1", "r2", "r3")
    for q in queues:
        await t.bind_queue(q, ex, "")
    n = 300
    for i in range(n):
        await t.publish(ex, Message(body=str(i).encode()), "any")
    counts = await depths(t, queues)
    # each message reaches exactly one queue
    assert sum(counts.values()) == n
    # expected 100 each, standard deviation ~8.2: 50..150 is more than 6 sigma
    for q, count in counts.items():
        assert 50 <= count <= 150, (q, counts)


async def test_unroutable_mandatory_publish_raises(broker: BrokerHandle) -> None:
    t = await broker.connect()
    ex = broker.name("lonely")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.DIRECT))
    with pytest.raises(UnroutableError) as info:
        await t.publish(ex, Message(body=b"x"), "nobody")
    assert info.value.exchange == ex
    assert info.value.routing_key == "nobody"
    with pytest.raises(UnroutableError):
        await t.publish("", Message(body=b"x"), broker.name("no-such-queue"))
    # not mandatory: dropped quietly, the transport keeps working
    await t.publish(ex, Message(body=b"x"), "nobody", mandatory=False)
    (q,) = await declare_queues(t, broker, "after")
    await t.publish("", Message(body=b"y"), q)
    assert (await t.queue_stats(q)).depth == 1


async def test_publish_to_unknown_exchange_names_it(broker: BrokerHandle) -> None:
    t = await broker.connect()
    missing = broker.name("missing-exchange")
    with pytest.raises(TransportError, match=missing):
        await t.publish(missing, Message(body=b"x"), "k")
    # the connection survives the error
    (q,) = await declare_queues(t, broker, "still-usable")
    assert (await t.queue_stats(q)).depth == 0


async def test_unknown_queue_is_named_in_the_error(broker: BrokerHandle) -> None:
    t = await broker.connect()
    missing = broker.name("missing-queue")
    with pytest.raises(TransportError, match=missing):
        await t.queue_stats(missing)


async def test_redeclare_with_other_arguments_fails(broker: BrokerHandle) -> None:
    t = await broker.connect()
    q = broker.name("redeclare")
    await t.declare_queue(QueueSpec(q, max_length=10))
    await t.declare_queue(QueueSpec(q, max_length=10))  # same arguments: fine
    with pytest.raises(TransportError):
        await t.declare_queue(QueueSpec(q, max_length=20))
    ex = broker.name("redeclare-ex")
    await t.declare_exchange(ExchangeSpec(ex, ExchangeType.DIRECT))
    with pytest.raises(TransportError):
        await t.declare_exchange(ExchangeSpec(ex, ExchangeType.FANOUT))
    assert (await t.queue_stats(q)).depth == 0
