"""``Client.infer_many``: many requests with a bounded number in flight, answers in input
order; leaving early cancels the requests still in flight."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Iterable,
    Mapping,
)
from typing import Any, Protocol

import numpy as np

from conveyor.errors import ConveyorError

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class Infer(Protocol):
    def __call__(
        self, inputs: Inputs, *, timeout: float | None = ..., key: str | None = ...
    ) -> Awaitable[Outputs]: ...


async def in_input_order(
    infer: Infer,
    inputs: Iterable[Inputs] | AsyncIterable[Inputs],
    concurrency: int,
    timeout: float | None,  # noqa: ASYNC109 (per request, passed to infer)
    keys: Iterable[str | None] | None,
    return_exceptions: bool,
) -> AsyncGenerator[Any, None]:
    key_iter = iter(keys) if keys is not None else None
    window: deque[asyncio.Task[Outputs]] = deque()
    try:
        async for item in _aiter(inputs):
            key = next(key_iter, None) if key_iter is not None else None
            window.append(asyncio.ensure_future(infer(item, timeout=timeout, key=key)))
            if len(window) >= concurrency:
                yield await _settle(window.popleft(), return_exceptions)
        while window:
            yield await _settle(window.popleft(), return_exceptions)
    finally:
        for task in window:
            task.cancel()
        if window:
            await asyncio.gather(*window, return_exceptions=True)


async def _settle(task: asyncio.Task[Outputs], return_exceptions: bool) -> Any:
    if not return_exceptions:
        return await task
    try:
        return await task
    except ConveyorError as exc:
        return exc


async def _aiter(items: Iterable[Inputs] | AsyncIterable[Inputs]) -> AsyncIterator[Inputs]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
