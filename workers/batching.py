"""Micro-batching: Triton's dynamic batcher / Ray Serve's ``@serve.batch`` for one stage.

Requests wait in groups of compatible shape (same dtype and non-batch dims for every
input). A group is released as one batch when it holds ``max_batch`` rows, or when
``max_delay_ms`` has passed since its first request arrived; the oldest due group goes
first. A request that alone has more than ``max_batch`` rows runs alone. ``concat`` and
``split`` join a batch's tensors along axis 0 and cut outputs back per request by rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from conveyor.errors import ConfigError

T = TypeVar("T")


def shape_key(tensors: Mapping[str, np.ndarray]) -> Hashable:
    """What must match for two requests to share a batch: per input, dtype and dims 1..n."""
    key = tuple((name, a.dtype, a.shape[1:]) for name, a in tensors.items())
    return key if len(key) == 1 else tuple(sorted(key, key=lambda k: k[0]))


def batch_rows(tensors: Mapping[str, np.ndarray]) -> int:
    """Rows (batch dim) of a request; every input must agree."""
    rows = {int(a.shape[0]) for a in tensors.values() if a.ndim > 0}
    if len(rows) > 1:
        raise ValueError(f"inputs disagree on the batch dimension: {sorted(rows)}")
    return rows.pop() if rows else 1


def concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack requests along the batch axis (no copy for a batch of one)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut batch outputs back into per-request pieces (views) by ``rows``."""
    total = sum(rows)
    for name, a in outputs.items():
        if a.ndim == 0 or a.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {a.shape}; expected {total} rows to split per request"
            )
    cuts = np.cumsum([0, *rows])
    return [
        {name: a[int(cuts[i]) : int(cuts[i + 1])] for name, a in outputs.items()}
        for i in range(len(rows))
    ]


@dataclass
class _Group(Generic[T]):
    first_arrival: float
    items: list[T] = field(default_factory=list)
    rows: int = 0


class MicroBatcher(Generic[T]):
    """Collect items into batches of compatible shape; ``next_batch`` awaits the next one."""

    def __init__(self, max_batch: int, max_delay_ms: float) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        # Insertion order = order of first arrival, so the first due group is found first.
        self._groups: OrderedDict[Hashable, _Group[T]] = OrderedDict()
        self._ready: list[list[T]] = []
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return sum(len(g.items) for g in self._groups.values()) + sum(map(len, self._ready))

    def put(self, item: T, key: Hashable, rows: int = 1) -> None:
        group = self._groups.get(key)
        if group is not None and group.rows + rows > self.max_batch:
            self._release(key)
            group = None
        if group is None:
            group = _Group(time.monotonic())
            self._groups[key] = group
        group.items.append(item)
        group.rows += rows
        if group.rows >= self.max_batch:
            self._release(key)
        self._changed.set()

    def _release(self, key: Hashable) -> None:
        self._ready.append(self._groups.pop(key).items)

    async def next_batch(self) -> list[T]:
        """The next batch; an empty list once the batcher is closed and drained."""
        while True:
            if self._ready:
                return self._ready.pop(0)
            if self._closed:
                return self.drain_one()
            timeout: float | None = None
            if self._groups:
                key, group = next(iter(self._groups.items()))
                wait = group.first_arrival + self.max_delay - time.monotonic()
                if wait <= 0:
                    self._release(key)
                    continue
                timeout = wait
            self._changed.clear()
            # On timeout the oldest group is due; the next turn of the loop releases it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def drain_one(self) -> list[T]:
        if self._ready:
            return self._ready.pop(0)
        if self._groups:
            key = next(iter(self._groups))
            return self._groups.pop(key).items
        return []

    def close(self) -> None:
        """No more items; ``next_batch`` hands out what is left, then empty lists."""
        self._closed = True
        self._changed.set()

    def take_all(self) -> list[T]:
        """Remove and return every waiting item (shutdown: they will be redelivered)."""
        items = [i for batch in self._ready for i in batch]
        items += [i for g in self._groups.values() for i in g.items]
        self._ready.clear()
        self._groups.clear()
        return items
