"""Exchange types: given a message and its routing key, which queues get a copy.

Each exchange keeps its bindings as ``(queue, binding_key)`` pairs and answers
``route`` with queue names (each at most once). RabbitMQ's behaviour is the reference:

* direct: binding key equals the routing key.
* fanout: every bound queue; keys are ignored.
* topic: dot-separated words; ``*`` matches exactly one word, ``#`` zero or more.
* x-consistent-hash: the binding key is an integer weight; each binding puts
  ``weight * POINTS_PER_WEIGHT`` points on a hash ring and a message goes to the owner
  of the first point at or after the hash of its routing key (or of the header named by
  ``hash_header``; a message without that header reaches no queue). The same key reaches
  the same queue while the bindings do not change. (The ring differs from RabbitMQ's,
  so brokerless and RabbitMQ may pick different queues for one key.)
* x-random: one bound queue, uniformly at random; the routing key is ignored.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from bisect import bisect_left

from conveyor.errors import TransportError
from conveyor.transport import ExchangeSpec, ExchangeType, Message

POINTS_PER_WEIGHT = 64
_TOPIC_CACHE_LIMIT = 10_000


class Exchange(ABC):
    def __init__(self, spec: ExchangeSpec) -> None:
        self.spec = spec
        self.bindings: dict[tuple[str, str], None] = {}  # ordered set

    @property
    def name(self) -> str:
        return self.spec.name

    def bind(self, queue: str, key: str) -> None:
        self.bindings[(queue, key)] = None
        self._changed()

    def unbind(self, queue: str, key: str) -> None:
        if (queue, key) in self.bindings:
            del self.bindings[(queue, key)]
            self._changed()

    def unbind_queue(self, queue: str) -> None:
        gone = [b for b in self.bindings if b[0] == queue]
        for binding in gone:
            del self.bindings[binding]
        if gone:
            self._changed()

    @abstractmethod
    def _changed(self) -> None:
        """Bindings changed: rebuild derived lookup structures."""

    @abstractmethod
    def route(self, message: Message, routing_key: str) -> list[str]: ...


class DirectExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        super().__init__(spec)
        self._by_key: dict[str, list[str]] = {}

    def _changed(self) -> None:
        by_key: dict[str, list[str]] = {}
        for queue, key in self.bindings:
            by_key.setdefault(key, []).append(queue)
        self._by_key = by_key

    def route(self, message: Message, routing_key: str) -> list[str]:
        return self._by_key.get(routing_key, [])


class FanoutExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        super().__init__(spec)
        self._queues: list[str] = []

    def _changed(self) -> None:
        self._queues = list(dict.fromkeys(queue for queue, _ in self.bindings))

    def route(self, message: Message, routing_key: str) -> list[str]:
        return self._queues


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic match: ``*`` is one word, ``#`` is zero or more words."""
    words = pattern.split(".")
    states = _topic_closure(words, {0})
    for word in routing_key.split("."):
        step: set[int] = set()
        for i in states:
            if i < len(words):
                if words[i] == "#":
                    step.add(i)
                elif words[i] == "*" or words[i] == word:
                    step.add(i + 1)
        states = _topic_closure(words, step)
        if not states:
            return False
    return len(words) in states


def _topic_closure(words: list[str], states: set[int]) -> set[int]:
    closed = set(states)
    for i in sorted(states):
        j = i
        while j < len(words) and words[j] == "#":
            j += 1
            closed.add(j)
    return closed


class TopicExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        super().__init__(spec)
        self._cache: dict[str, list[str]] = {}

    def _changed(self) -> None:
        self._cache = {}

    def route(self, message: Message, routing_key: str) -> list[str]:
        cached = self._cache.get(routing_key)
        if cached is None:
            cached = list(
                dict.fromkeys(
                    q for q, pattern in self.bindings if topic_matches(pattern, routing_key)
                )
            )
            if len(self._cache) >= _TOPIC_CACHE_LIMIT:
                self._cache.clear()
            self._cache[routing_key] = cached
        return cached


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHashExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        super().__init__(spec)
        self._points: list[int] = []
        self._owners: list[str] = []

    def bind(self, queue: str, key: str) -> None:
        try:
            weight = int(key)
        except ValueError:
            weight = 0
        if weight < 1:
            raise TransportError(
                f"x-consistent-hash exchange {self.name!r}: binding key {key!r} for queue "
                f"{queue!r} must be a positive integer weight"
            )
        super().bind(queue, key)

    def _changed(self) -> None:
        ring: list[tuple[int, str]] = []
        for queue, key in self.bindings:
            for i in range(int(key) * POINTS_PER_WEIGHT):
                ring.append((_hash64(f"{queue}\x00{key}\x00{i}".encode()), queue))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]

    def route(self, message: Message, routing_key: str) -> list[str]:
        if not self._points:
            return []
        if self.spec.hash_header is None:
            data = routing_key.encode()
        else:
            value = message.headers.get(self.spec.hash_header)
            if value is None:
                return []
            data = value if isinstance(value, bytes) else str(value).encode()
        index = bisect_left(self._points, _hash64(data))
        return [self._owners[index % len(self._owners)]]


class RandomExchange(FanoutExchange):
    """Like fanout over the distinct bound queues, but one of them per message."""

    def route(self, message: Message, routing_key: str) -> list[str]:
        return [random.choice(self._queues)] if self._queues else []


_TYPES: dict[ExchangeType, type[Exchange]] = {
    ExchangeType.DIRECT: DirectExchange,
    ExchangeType.FANOUT: FanoutExchange,
    ExchangeType.TOPIC: TopicExchange,
    ExchangeType.HASH: ConsistentHashExchange,
    ExchangeType.RANDOM: RandomExchange,
}


def make_exchange(spec: ExchangeSpec) -> Exchange:
    return _TYPES[ExchangeType(spec.type)](spec)
